"""The receipt tap for POS software that prints to a serial port: a serial port or a pty in, the
TCP tap proxy (tap_proxy.py) behind it.

Rules this module keeps:
- the bridge holds one long-lived TCP connection to the proxy and relays bytes both ways as they
  come: POS -> proxy (where jobs end at idle gaps at command boundaries, exactly as for a TCP
  POS) and proxy -> POS (printer status replies: DLE EOT, GS r, ASB), so nothing about jobs,
  injection or fail-open is decided twice;
- `pty` mode creates a pseudo-terminal in raw mode and (optionally) a stable symlink to it, for
  POS software (or `socat`, or a VM's serial port) configured with a device path; the link is
  removed at stop;
- a serial line has no "connection close", so after `idle_close_s` of silence both ways the
  bridge closes its proxy connection (the proxy has ended the job at the idle gap by then, so
  each print job gets its own record) and opens a new one at the POS's next byte; should the POS
  still be mid-command then, the proxy flushes what it got as sent (fail-open, nothing lost);
- when the proxy connection drops (proxy restart), the bridge reconnects and keeps reading the
  POS; bytes read while there is no proxy go to the next connection, never lost or reordered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import selectors
import socket
import threading
import time
import tty
from pathlib import Path

import serial

log = logging.getLogger("hexiao.tap")


class SerialBridge:
    """POS side on `device` (a serial port, pyserial URL or "pty"), proxy at `proxy_addr`."""

    def __init__(self, device: str, proxy_addr: tuple[str, int], *, baud: int = 9600,
                 link: str | None = None, reconnect_s: float = 0.5,
                 idle_close_s: float = 4.0) -> None:
        self.proxy_addr, self.reconnect_s = proxy_addr, reconnect_s
        self.idle_close_s = idle_close_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._link = Path(link) if link else None
        self._pending = b""
        self.bytes_in = self.bytes_out = 0
        if device == "pty":
            self._master, slave = os.openpty()
            tty.setraw(slave)
            self.path = os.ttyname(slave)
            self._slave: int | None = slave  # kept open: the pty stays up between POS opens
            self._port: serial.SerialBase | None = None
            self._fd = self._master
        else:
            self._port = serial.serial_for_url(device, baudrate=baud, timeout=0, exclusive=True)
            self._slave = None
            self.path = device
            self._fd = self._port.fileno()
        if self._link is not None:
            with contextlib.suppress(FileNotFoundError):
                if self._link.is_symlink():
                    self._link.unlink()
            self._link.symlink_to(self.path)

    def start(self) -> SerialBridge:
        self._thread = threading.Thread(target=self._run, name="hexiao-tap-serial", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._port is not None:
            self._port.close()
        else:
            for fd in (self._master, self._slave):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
        if self._link is not None and self._link.is_symlink():
            self._link.unlink()

    def _read_pos(self) -> bytes:
        try:
            return os.read(self._fd, 4096)
        except BlockingIOError:
            return b""
        except OSError:  # a pty whose POS side closed reads EIO until it is opened again
            return b""

    def _run(self) -> None:
        os.set_blocking(self._fd, False)
        while not self._stop.is_set():
            if not self._pending:  # connect when the POS has something to print
                if not select.select([self._fd], [], [], 0.2)[0]:
                    continue
                self._pending = self._read_pos()
                if not self._pending:
                    self._stop.wait(0.05)  # a pty with no POS attached: EIO, not data
                    continue
            try:
                conn = socket.create_connection(self.proxy_addr, timeout=2)
            except OSError as e:
                log.warning("tap serial: proxy %s:%d unreachable: %s", *self.proxy_addr, e)
                self._stop.wait(self.reconnect_s)
                continue
            with conn:
                conn.setblocking(False)
                self._relay(conn)

    def _relay(self, conn: socket.socket) -> None:
        last = time.monotonic()
        with selectors.DefaultSelector() as sel:
            sel.register(self._fd, selectors.EVENT_READ, "pos")
            sel.register(conn, selectors.EVENT_READ, "proxy")
            while not self._stop.is_set():
                if self._pending:
                    last = time.monotonic()
                elif time.monotonic() - last >= self.idle_close_s:
                    return  # quiet both ways: this job is over (see the rules above)
                if self._pending:
                    try:
                        n = conn.send(self._pending)
                    except BlockingIOError:
                        n = 0
                    except OSError:
                        return  # proxy gone: reconnect; _pending goes to the next one
                    self.bytes_in += n
                    self._pending = self._pending[n:]
                for key, _ in sel.select(0.1):
                    if key.data == "pos":
                        self._pending += self._read_pos()
                    else:
                        try:
                            back = conn.recv(4096)
                        except BlockingIOError:
                            continue
                        except OSError:
                            return
                        if not back:
                            return  # the proxy closed (e.g. a stall): a new connection
                        os.write(self._fd, back)
                        self.bytes_out += len(back)
                        last = time.monotonic()
