"""`hexiao udev install|show`: the udev rules for hexiao devices (see tools/install.py)."""

from __future__ import annotations

from hexiao.tools.install import udev_main as main

__all__ = ["main"]

if __name__ == "__main__":
    main()
