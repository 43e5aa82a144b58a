"""The receipt tap's USB printer target (pyusb): `usb:VID:PID[:SERIAL]`.

Rules this module keeps:
- Only parse_target imports this module, and only for a usb: spec: other targets never need
  pyusb. libusb itself is loaded at the first open() (usb.core.find), never at import; a target
  with its own `backend` (tests: a fake printer behind pyusb's real code) never loads it.
- The printer is an interface of class 7 (printer) in the device's active configuration; an
  alternate setting with a bulk IN endpoint (bidirectional) is preferred, so status replies work.
  Linux binds usblp to printers: open() detaches it from that interface, close() gives it back.
- Writes go to the bulk OUT endpoint in chunks, each bounded by `timeout`: a printer that takes
  nothing for that long is lost for the job, as for TCP.
- USB has no descriptor to select on, so a reader thread polls the bulk IN endpoint (`poll`
  seconds per read) and copies replies into a pipe whose read end is fileno(): the proxy's
  selector loop is unchanged. An error ends the thread and closes the pipe; read() then raises
  it (the printer went away). close() stops the thread within `poll` and returns what it read.
- Every failure is an OSError whose message says what to do: not found (lists the USB printers
  that are present), permission (the udev rule), busy (who may hold it), unplugged, stuck.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import usb.core
import usb.util

log = logging.getLogger("hexiao.tap")

PRINTER_CLASS = 7
CHUNK = 16384  # bytes per bulk write: each one is bounded by the write timeout


def _ids(dev: Any) -> str:
    return f"{dev.idVendor:04x}:{dev.idProduct:04x}"


def _bulk(intf: Any, direction: int) -> Any:
    return usb.util.find_descriptor(intf, custom_match=lambda e: (
        usb.util.endpoint_type(e.bmAttributes) == usb.util.ENDPOINT_TYPE_BULK
        and usb.util.endpoint_direction(e.bEndpointAddress) == direction))


def _is_printer(dev: Any) -> bool:
    return dev.bDeviceClass == PRINTER_CLASS or any(
        usb.util.find_descriptor(cfg, bInterfaceClass=PRINTER_CLASS) is not None for cfg in dev)


def _serial(dev: Any) -> str | None:
    """The serial number string; USBError if the device cannot be opened (permission)."""
    if not dev.iSerialNumber:
        return None
    langids = usb.util.get_langids(dev)  # opens the device: errors surface here, not as ""
    return usb.util.get_string(dev, dev.iSerialNumber, langids[0]) if langids else None


def _label(dev: Any) -> str:
    try:
        serial = _serial(dev)
        product = usb.util.get_string(dev, dev.iProduct) if dev.iProduct else None
    except (usb.core.USBError, ValueError) as exc:
        return f"usb:{_ids(dev)} (serial unreadable: {exc})"
    finally:
        usb.util.dispose_resources(dev)
    return f"usb:{_ids(dev)}" + (f":{serial}" if serial else "") + (
        f' "{product}"' if product else "")


@dataclass(frozen=True)
class UsbTarget:
    vid: int
    pid: int
    serial: str | None = None
    timeout: float = 30.0  # per chunk written: a printer that takes nothing this long is lost
    poll: float = 0.05     # the reader thread's IN read timeout: bounds close()
    backend: Any = field(default=None, compare=False, repr=False)  # a pyusb IBackend; None: libusb

    def describe(self) -> str:
        return f"usb:{self.vid:04x}:{self.pid:04x}" + (f":{self.serial}" if self.serial else "")

    def error(self, exc: usb.core.USBError, doing: str, dev: Any = None) -> OSError:
        """`exc` as an OSError that says what to do about it."""
        code, where = exc.errno, self.describe()
        if code == errno.EACCES:
            node = f" ({dev_node(dev)})" if dev is not None and dev_node(dev) else ""
            msg = (f"permission denied {doing} the USB printer{node}: give the service user "
                   f'access with a udev rule: SUBSYSTEM=="usb", '
                   f'ATTR{{idVendor}}=="{self.vid:04x}", ATTR{{idProduct}}=="{self.pid:04x}", '
                   f'MODE="0660", GROUP="hexiao" '
                   f"(then replug the printer)")
        elif code == errno.EBUSY:
            msg = (f"the printer interface is busy {doing}: another program holds it (CUPS's "
                   "usb backend, another tap?); stop it or give the printer to the tap alone")
        elif code == errno.ENODEV:
            msg = f"the USB printer went away {doing} (unplugged or switched off)"
        elif isinstance(exc, usb.core.USBTimeoutError) or code == errno.ETIMEDOUT:
            msg = (f"the printer took no data for {self.timeout:g} s {doing} "
                   "(out of paper, cover open or offline?)")
        else:
            msg = f"USB error {doing}: {exc}"
        return OSError(code or errno.EIO, f"{where}: {msg}")

    def open(self) -> _UsbConn:
        dev = self._find()
        try:
            return _open(self, dev)
        except BaseException as exc:
            usb.util.dispose_resources(dev)
            if isinstance(exc, usb.core.USBError):
                raise self.error(exc, "opening", dev) from exc
            raise

    def _find(self) -> Any:
        try:
            found = list(usb.core.find(find_all=True, backend=self.backend,
                                       idVendor=self.vid, idProduct=self.pid))
        except usb.core.NoBackendError as exc:
            raise OSError(errno.ENOENT, f"{self.describe()}: libusb is not installed: install "
                          "libusb-1.0 (Debian/Ubuntu: apt install libusb-1.0-0)") from exc
        for dev in found:
            if not _is_printer(dev):
                continue
            if self.serial is None:
                return dev
            try:
                serial = _serial(dev)
            except usb.core.USBError as exc:
                raise self.error(exc, "reading the serial number of", dev) from exc
            if serial == self.serial:
                return dev
            usb.util.dispose_resources(dev)
        present = [_label(d) for d in usb.core.find(find_all=True, backend=self.backend,
                                                     custom_match=_is_printer)]
        raise OSError(errno.ENODEV, f"{self.describe()}: no such USB printer; " + (
            f"USB printers present: {', '.join(present)}" if present else
            "no USB printer is present (plugged in and switched on? `lsusb` lists USB devices)"))


def dev_node(dev: Any) -> str:
    return f"/dev/bus/usb/{dev.bus:03d}/{dev.address:03d}" if dev.bus and dev.address else ""


def _open(t: UsbTarget, dev: Any) -> _UsbConn:
    try:
        cfg = dev.get_active_configuration()
    except usb.core.USBError as exc:
        if exc.errno is not None:
            raise
        dev.set_configuration()  # unconfigured (never the case once a kernel driver bound it)
        cfg = dev.get_active_configuration()
    intfs = [i for i in cfg
             if i.bInterfaceClass == PRINTER_CLASS and _bulk(i, usb.util.ENDPOINT_OUT)]
    if not intfs:
        raise OSError(errno.ENODEV, f"{t.describe()}: the device has no printer interface "
                      "(class 7) with a bulk OUT endpoint in its active configuration")
    intf = min(intfs, key=lambda i: (_bulk(i, usb.util.ENDPOINT_IN) is None,
                                     i.bInterfaceNumber, i.bAlternateSetting))
    n, detached = intf.bInterfaceNumber, False
    try:
        try:
            if dev.is_kernel_driver_active(n):
                dev.detach_kernel_driver(n)
                detached = True
        except NotImplementedError:
            pass  # a backend without kernel drivers
        except usb.core.USBError as exc:
            if exc.errno != errno.ENOSYS:  # libusb off Linux: no kernel driver to detach
                raise
        usb.util.claim_interface(dev, n)
        if intf.bAlternateSetting:
            dev.set_interface_altsetting(n, intf.bAlternateSetting)
    except BaseException:
        _release(t, dev, n, detached)
        raise
    return _UsbConn(t, dev, n, _bulk(intf, usb.util.ENDPOINT_OUT),
                    _bulk(intf, usb.util.ENDPOINT_IN), detached)


def _release(t: UsbTarget, dev: Any, n: int, detached: bool) -> None:
    try:
        with suppress(usb.core.USBError):  # unplugged, or never claimed: nothing to release
            usb.util.release_interface(dev, n)
        if detached:
            dev.attach_kernel_driver(n)  # give the printer back to usblp (/dev/usb/lp*)
    except (usb.core.USBError, NotImplementedError) as exc:
        if getattr(exc, "errno", None) != errno.ENODEV:  # unplugged: nothing to give back
            log.warning("%s: could not give the printer back to its kernel driver: %s",
                        t.describe(), exc)
    finally:
        usb.util.dispose_resources(dev)


class _UsbConn:
    """One job's claim on the printer; see the module rules."""

    def __init__(self, t: UsbTarget, dev: Any, n: int, ep_out: Any, ep_in: Any,
                 detached: bool) -> None:
        self.t, self.dev, self.n, self.ep_out, self.ep_in = t, dev, n, ep_out, ep_in
        self.detached = detached
        self.failure: OSError | None = None  # why the reader stopped, if it failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if ep_in is not None:
            self._r, self._w = os.pipe()
            self._thread = threading.Thread(target=self._reader, daemon=True,
                                            name=f"tap-{t.describe()}")
            self._thread.start()

    def write(self, data: bytes) -> None:
        ms = max(1, int(self.t.timeout * 1000))
        pos = 0
        while pos < len(data):
            try:  # a timed-out write that moved some bytes returns their count: go on from there
                pos += self.dev.write(self.ep_out, data[pos:pos + CHUNK], ms)
            except usb.core.USBError as exc:
                raise self.t.error(exc, "writing", self.dev) from exc

    def fileno(self) -> int | None:
        return self._r if self._thread is not None else None

    def read(self) -> bytes:
        if self._thread is None:
            return b""
        data = os.read(self._r, 4096)
        if not data and self.failure is not None:
            raise self.failure
        return data

    def _reader(self) -> None:
        size, ms = max(64, self.ep_in.wMaxPacketSize), max(1, int(self.t.poll * 1000))
        try:
            while not self._stop.is_set():
                try:
                    data = self.dev.read(self.ep_in, size, ms)
                except usb.core.USBError as exc:
                    if isinstance(exc, usb.core.USBTimeoutError) or exc.errno == errno.ETIMEDOUT:
                        continue  # the printer has nothing to say: poll again
                    self.failure = self.t.error(exc, "reading its status", self.dev)
                    return
                if data:
                    os.write(self._w, bytes(data))
        except OSError:
            pass  # the pipe's read end is closed: the job is over
        finally:
            os.close(self._w)  # EOF for the proxy: with `failure`, the printer is gone

    def close(self, linger: float) -> bytes:
        got = bytearray()
        if self._thread is not None:
            self._stop.set()
            deadline = time.monotonic() + self.t.poll + linger
            while (left := deadline - time.monotonic()) > 0 and \
                    select.select([self._r], [], [], left)[0]:
                chunk = os.read(self._r, 4096)
                if not chunk:
                    break  # the thread is done with the device
                got += chunk
            os.close(self._r)
            self._thread.join(max(0.0, deadline - time.monotonic()))
        _release(self.t, self.dev, self.n, self.detached)
        return bytes(got)
