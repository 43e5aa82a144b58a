"""Where a configured device is now: a fixed port, or a USB serial number looked up each time.

Rules this module keeps:
- a USB match is looked up at every (re)connect through pyserial's list_ports (sysfs on Linux:
  the same vendor/product/serial udev sees), so a device unplugged and plugged into another
  socket is found again under its new ttyACM name; the udev rules' /dev/hexiao/<serial> link is
  preferred when it exists;
- a fixed port that does not exist yet is "not found" (the lane waits and retries), except
  pyserial URLs (loop://, socket://, rfc2217://), which only opening can judge;
- ports are opened exclusively (SerialLink: pyserial's exclusive=True), so a second hostd or a
  second device entry naming the same port fails to open it and says so;
- which USB ids are hexiao boards is read from the shipped udev rules (udev/99-hexiao.rules), the
  one place they are written down, so `hexiao device ports` finds what udev tags.
"""

from __future__ import annotations

import importlib.resources
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

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


_RULE = re.compile(r'ATTRS\{idVendor\}=="([0-9a-fA-F]{4})".*ATTRS\{idProduct\}=="([0-9a-fA-F]{4})"'
                   r'.*ENV\{HEXIAO_BOARD\}="([^"]+)"')


def known_boards(rules: str | None = None) -> dict[tuple[int, int], str]:
    """(vid, pid) -> board name, from the udev rules hexiao ships."""
    if rules is None:
        rules = (importlib.resources.files("hexiao.udev") / "99-hexiao.rules").read_text("utf-8")
    return {(int(v, 16), int(p, 16)): board for v, p, board in _RULE.findall(rules)}


@dataclass(frozen=True)
class Port:
    device: str          # /dev/ttyACM0
    board: str           # rp2-dev, esp32s3-dev
    vid: int
    pid: int
    serial: str | None   # the USB serial number: what [[device]] match.serial names
    stable: str | None   # /dev/hexiao/<serial> when the udev rules are installed

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "vid": f"{self.vid:04x}", "pid": f"{self.pid:04x}"}


def hexiao_ports(ports: Iterable[object] | None = None, udev_dir: str = UDEV_DIR,
                 boards: dict[tuple[int, int], str] | None = None) -> list[Port]:
    """The serial ports of hexiao boards plugged in now, by device name."""
    boards = known_boards() if boards is None else boards
    found = []
    for p in ports if ports is not None else list_ports.comports():
        board = boards.get((getattr(p, "vid", None) or -1, getattr(p, "pid", None) or -1))
        if board is None:
            continue
        serial = getattr(p, "serial_number", None)
        stable = os.path.join(udev_dir, serial) if serial else None
        found.append(Port(str(getattr(p, "device")), board, getattr(p, "vid"),  # noqa: B009
                          getattr(p, "pid"), serial,  # noqa: B009
                          stable if stable and os.path.exists(stable) else None))
    return sorted(found, key=lambda port: port.device)
