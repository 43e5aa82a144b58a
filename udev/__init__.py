"""Data only: the udev rules and the systemd unit that `hexiao udev|service install` write."""
