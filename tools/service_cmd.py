"""`hexiao service install|show`: the systemd unit for hexiao-hostd (see tools/install.py)."""

from __future__ import annotations

from hexiao.tools.install import service_main as main

__all__ = ["main"]

if __name__ == "__main__":
    main()
