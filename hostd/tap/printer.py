"""Where the receipt tap sends a job: the real printer over TCP, a serial port, USB, or a file.

Rules this module keeps:
- One `open()` per job; a connection is written in order and closed gracefully (TCP: FIN, then
  replies drained for at most `linger` seconds, so unread replies never turn the close into a
  reset that would discard bytes still in flight).
- `open()` never writes anything: retrying it (the proxy's debounce of a brief printer drop)
  can never print a byte twice. Any OSError from `open`, `write` or `read` means the printer is
  unusable for this job; the caller decides (the proxy never resends written bytes).
- `fileno()` is None when the target cannot answer (a file, a USB printer without a bulk IN
  endpoint): there are no status replies. Otherwise it is a descriptor the proxy selects on, and
  `read()` is called only once it is readable (so it never blocks): a socket, a serial port, or
  for USB (no descriptor of its own) a pipe fed by a reader thread (tap_usb.py).
- USB lives in tap_usb.py, imported only for a usb: spec: pyusb and libusb are needed by nothing
  else.
"""

from __future__ import annotations

import os
import re
import selectors
import socket
import time
from dataclasses import dataclass
from typing import Protocol


class PrinterConn(Protocol):
    def write(self, data: bytes) -> None: ...
    def fileno(self) -> int | None: ...
    def read(self) -> bytes: ...          # b"": the printer went away
    def close(self, linger: float) -> bytes: ...  # graceful; returns replies drained meanwhile


class Target(Protocol):
    def open(self) -> PrinterConn: ...
    def describe(self) -> str: ...


class _TcpConn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)

    def fileno(self) -> int | None:
        return self.sock.fileno()

    def read(self) -> bytes:
        return self.sock.recv(4096)

    def close(self, linger: float) -> bytes:
        got = bytearray()
        # a selector, not select(): a busy tap has descriptors above select's 1023 limit
        with selectors.DefaultSelector() as sel:
            try:
                self.sock.shutdown(socket.SHUT_WR)
                sel.register(self.sock, selectors.EVENT_READ)
                deadline = time.monotonic() + linger
                while (left := deadline - time.monotonic()) > 0:
                    if not sel.select(left):
                        break
                    chunk = self.sock.recv(4096)
                    if not chunk:
                        break
                    got += chunk
            except OSError:
                pass
            finally:
                self.sock.close()
        return bytes(got)


@dataclass(frozen=True)
class TcpTarget:
    host: str
    port: int
    timeout: float = 30.0  # connect and per-write bound: a printer stuck longer is lost

    def open(self) -> PrinterConn:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return _TcpConn(sock)

    def describe(self) -> str:
        return f"tcp:{self.host}:{self.port}"


class _FileConn:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def fileno(self) -> int | None:
        return None

    def read(self) -> bytes:
        return b""

    def close(self, linger: float) -> bytes:
        os.close(self.fd)
        return b""


@dataclass(frozen=True)
class FileTarget:
    path: str

    def open(self) -> PrinterConn:
        return _FileConn(self.path)

    def describe(self) -> str:
        return f"file:{self.path}"


class _SerialConn:
    def __init__(self, port: object) -> None:
        self.port = port

    def write(self, data: bytes) -> None:
        self.port.write(data)  # type: ignore[attr-defined]
        self.port.flush()  # type: ignore[attr-defined]

    def fileno(self) -> int | None:
        try:
            return int(self.port.fileno())  # type: ignore[attr-defined]
        except (AttributeError, OSError, ValueError):
            return None  # URL handlers without a descriptor: no status replies

    def read(self) -> bytes:
        return bytes(self.port.read(self.port.in_waiting or 1))  # type: ignore[attr-defined]

    def close(self, linger: float) -> bytes:
        try:
            got = bytes(self.port.read(self.port.in_waiting))  # type: ignore[attr-defined]
        except OSError:
            got = b""
        self.port.close()  # type: ignore[attr-defined]
        return got


@dataclass(frozen=True)
class SerialTarget:
    url: str              # a device path or any pyserial URL (rfc2217://, socket://, loop://)
    baudrate: int = 19200
    timeout: float = 30.0

    def open(self) -> PrinterConn:
        import serial

        try:
            port = serial.serial_for_url(self.url, baudrate=self.baudrate, timeout=0,
                                         write_timeout=self.timeout)
        except serial.SerialException as exc:  # an OSError to the proxy: printer unusable
            raise OSError(str(exc)) from exc
        return _SerialConn(port)

    def describe(self) -> str:
        return f"serial:{self.url}"


_USB = re.compile(r"([0-9a-fA-F]{1,4}):([0-9a-fA-F]{1,4})(?::(.+))?")
SPECS = ("the printer is tcp:HOST:PORT, file:PATH, serial:DEVICE[@BAUD] or usb:VID:PID[:SERIAL] "
         "(USB ids in hex as lsusb shows them, e.g. usb:0416:5011)")


def parse_target(spec: str, timeout: float = 30.0) -> Target:
    """`tcp:HOST:PORT`, `file:PATH`, `serial:DEVICE_OR_URL[@BAUD]` or `usb:VID:PID[:SERIAL]`
    (hex USB ids; SERIAL: the printer's USB serial number, to pick one of several alike);
    ValueError otherwise."""
    kind, _, rest = spec.partition(":")
    if kind == "tcp":
        host, _, port = rest.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{spec!r}: use tcp:HOST:PORT, e.g. tcp:192.168.1.50:9100")
        return TcpTarget(host.strip("[]"), int(port), timeout)
    if kind == "file" and rest:
        return FileTarget(rest)
    if kind == "serial" and rest:
        url, _, baud = rest.rpartition("@") if "@" in rest else (rest, "", "")
        if baud and not baud.isdigit():
            raise ValueError(f"{spec!r}: the baud rate after @ must be a number")
        return SerialTarget(url, int(baud) if baud else 19200, timeout)
    if kind == "usb" and (m := _USB.fullmatch(rest)):
        try:  # here, not at the top: pyusb is needed for USB printers only
            from hexiao.hostd.tap.printer_usb import UsbTarget
        except ImportError as exc:
            raise ValueError(f"{spec!r}: USB printers need pyusb (pip install pyusb): "
                             f"{exc}") from exc
        return UsbTarget(int(m[1], 16), int(m[2], 16), m[3], timeout)
    raise ValueError(f"{spec!r}: {SPECS}")
