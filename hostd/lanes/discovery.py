"""Where a configured device is now: a fixed port, or a USB serial number looked up each time.

Rules this module keeps:
- a USB match is looked up at every (re)connect through pyserial's list_ports (sysfs on Linux:
  the same vendor/product/serial udev sees), so a device unplugged and plugged into another
  socket is found again under its new ttyACM name; the udev rules' /dev/hexiao/<serial> link is
  preferred when it exists;
- a fixed port that does not exist yet is "not found" (the lane waits and retries), except
  pyserial URLs (loop://, socket://, rfc2217://), which only opening can judge;
- ports are opened exclusively (SerialLink: pyserial's exclusive=True), so a second hostd or a
  second device entry naming the same port fails to open it and says so.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from hexiao.hostd.config import Device, UsbMatch
from serial.tools import list_ports

UDEV_DIR = "/dev/hexiao"


def _hex_eq(want: str | None, have: int | None) -> bool:
    return want is None or (have is not None and int(want, 16) == have)


def find_usb(match: UsbMatch, ports: Iterable[object] | None = None,
             udev_dir: str = UDEV_DIR) -> str | None:
    """The port of the USB device whose serial number (and vid/pid, when given) match."""
    stable = os.path.join(udev_dir, match.serial)
    if os.path.exists(stable):
        return stable
    for p in ports if ports is not None else list_ports.comports():
        if (getattr(p, "serial_number", None) == match.serial
                and _hex_eq(match.vendor, getattr(p, "vid", None))
                and _hex_eq(match.product, getattr(p, "pid", None))):
            return str(getattr(p, "device"))  # noqa: B009 (ListPortInfo has no type stubs)
    return None


def finder(device: Device) -> Callable[[], str | None]:
    """A function that says where `device` is now, or None if it is not there."""
    if device.port is not None:
        port = device.port
        if "://" in port:
            return lambda: port
        return lambda: port if os.path.exists(port) else None
    match = device.match
    assert match is not None  # config guarantees port or match
    return lambda: find_usb(match)
