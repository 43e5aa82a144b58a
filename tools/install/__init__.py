"""For installers: signing keys, firmware bundles, flashing, provisioning with its self-test, the
udev rules and the systemd unit.
"""
