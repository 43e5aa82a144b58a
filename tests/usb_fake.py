"""Fake USB printers behind pyusb's real code path: an implementation of usb.backend.IBackend.

pyusb's own Device / Configuration / Interface / Endpoint objects, find(), claim, read and write
run unchanged on top of this backend; only the libusb calls are replaced, with libusb's error
codes and messages (USBError errno 13 / 16 / 19, USBTimeoutError). No libusb is loaded.

A FakeUsbPrinter has one configuration with one printer-class interface (class 7, subclass 1,
protocol 2: bidirectional) holding a bulk OUT and (optionally) a bulk IN endpoint, and string
descriptors (manufacturer, product, serial). What it records: every open..close of the device
with the interface claimed, as one job's bytes; DLE EOT n is answered on the IN endpoint.
Faults: `unplug_after` (ENODEV once that many bytes of a job arrived), `kernel_driver` (usblp
bound: claiming fails with EBUSY until it is detached), `busy` (another program has claimed the
interface), `deny` (open fails with EACCES, as without a udev rule).
"""

from __future__ import annotations

import array
import errno
import threading
from types import SimpleNamespace

import usb.backend
from usb.core import USBError, USBTimeoutError

STATUS = {1: 0x16, 2: 0x12, 3: 0x12, 4: 0x12}  # DLE EOT n replies, as test_tap_proxy's printer
LONG = 20.0

# libusb's messages for its error codes (libusb_strerror), as pyusb's libusb1 backend raises them
NO_DEVICE = ("No such device (it may have been disconnected)", -4, errno.ENODEV)
ACCESS = ("Access denied (insufficient permissions)", -3, errno.EACCES)
BUSY = ("Resource busy", -6, errno.EBUSY)
TIMEOUT = ("Operation timed out", -7, errno.ETIMEDOUT)


def _desc(**fields: object) -> SimpleNamespace:
    return SimpleNamespace(extra_descriptors=[], **fields)


class FakeUsbPrinter:
    def __init__(self, vid: int = 0x0416, pid: int = 0x5011, serial: str | None = "P58-0001",
                 product: str = "POS58 Printer", bus: int = 1, address: int = 5,
                 bulk_in: bool = True, cls: int = 7) -> None:
        self.vid, self.pid, self.serial, self.product = vid, pid, serial, product
        self.bus, self.address = bus, address
        self.strings = {1: "Winbond", 2: product, **({3: serial} if serial else {})}
        eps = [_desc(bLength=7, bDescriptorType=5, bEndpointAddress=0x01, bmAttributes=2,
                     wMaxPacketSize=64, bInterval=0, bRefresh=0, bSynchAddress=0)]
        if bulk_in:
            eps.append(_desc(bLength=7, bDescriptorType=5, bEndpointAddress=0x82, bmAttributes=2,
                             wMaxPacketSize=64, bInterval=0, bRefresh=0, bSynchAddress=0))
        self.endpoints = eps
        self.interface = _desc(bLength=9, bDescriptorType=4, bInterfaceNumber=0,
                               bAlternateSetting=0, bNumEndpoints=len(eps), bInterfaceClass=cls,
                               bInterfaceSubClass=1, bInterfaceProtocol=2 if bulk_in else 1,
                               iInterface=0)
        self.config = _desc(bLength=9, bDescriptorType=2, wTotalLength=9 + 9 + 7 * len(eps),
                            bNumInterfaces=1, bConfigurationValue=1, iConfiguration=0,
                            bmAttributes=0xC0, bMaxPower=50)
        self.device = _desc(bLength=18, bDescriptorType=1, bcdUSB=0x0200, bDeviceClass=0,
                            bDeviceSubClass=0, bDeviceProtocol=0, bMaxPacketSize0=64,
                            idVendor=vid, idProduct=pid, bcdDevice=0x0100, iManufacturer=1,
                            iProduct=2, iSerialNumber=3 if serial else 0, bNumConfigurations=1,
                            address=address, bus=bus, port_number=1, port_numbers=(1,), speed=3)
        # faults
        self.unplug_after: int | None = None
        self.kernel_driver = False
        self.busy = False
        self.deny = False
        # what happened
        self.plugged = True
        self.jobs: list[bytes] = []           # one entry per open..close, in order
        self.writes: list[int] = []           # the size of every bulk write
        self.current: bytearray | None = None
        self.replies = bytearray()            # waiting on the IN endpoint
        self.claimed = False
        self.detached = self.reattached = 0
        self.cond = threading.Condition()
        self._scanned = 0

    def unplug(self) -> None:
        with self.cond:
            self.plugged = False
            self.cond.notify_all()

    def replug(self) -> None:
        with self.cond:
            self.plugged, self.unplug_after = True, None

    def check(self) -> None:
        if not self.plugged:
            raise USBError(*NO_DEVICE)

    def wait_jobs(self, n: int) -> list[bytes]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.jobs) >= n, LONG), self.jobs
            return list(self.jobs)

    def receive(self, data: bytes) -> int:
        with self.cond:
            self.check()
            buf = self.current
            self.writes.append(len(data))
            assert buf is not None and self.claimed, "bulk write without an open, claimed device"
            take = data
            if self.unplug_after is not None:
                take = data[:max(0, self.unplug_after - len(buf))]
            buf += take
            while (j := buf.find(b"\x10\x04", self._scanned)) >= 0 and j + 2 < len(buf):
                self.replies.append(STATUS.get(buf[j + 2], 0x12))
                self._scanned = j + 3
            self._scanned = max(self._scanned, len(buf) - 2)
            if len(take) < len(data):
                self.plugged = False  # pulled out mid-transfer
            self.cond.notify_all()
            self.check()
            return len(data)

    def reply(self, size: int, timeout_ms: int) -> bytes:
        with self.cond:
            self.cond.wait_for(lambda: self.replies or not self.plugged, timeout_ms / 1000)
            self.check()
            if not self.replies:
                raise USBTimeoutError(*TIMEOUT)
            out = bytes(self.replies[:size])
            del self.replies[:size]
            self.cond.notify_all()
            return out


class FakeBackend(usb.backend.IBackend):
    """The USB bus: what enumerate_devices() lists is every plugged device."""

    def __init__(self, *devices: FakeUsbPrinter) -> None:
        super().__init__()
        self.devices = list(devices)

    def enumerate_devices(self) -> list[FakeUsbPrinter]:
        return [d for d in self.devices if d.plugged]

    def get_device_descriptor(self, dev: FakeUsbPrinter) -> SimpleNamespace:
        return dev.device

    def get_configuration_descriptor(self, dev: FakeUsbPrinter, config: int) -> SimpleNamespace:
        if config != 0:
            raise IndexError(config)
        return dev.config

    def get_interface_descriptor(self, dev: FakeUsbPrinter, intf: int, alt: int,
                                 config: int) -> SimpleNamespace:
        if (config, intf, alt) != (0, 0, 0):
            raise IndexError((config, intf, alt))
        return dev.interface

    def get_endpoint_descriptor(self, dev: FakeUsbPrinter, ep: int, intf: int, alt: int,
                                config: int) -> SimpleNamespace:
        self.get_interface_descriptor(dev, intf, alt, config)
        return dev.endpoints[ep]

    def open_device(self, dev: FakeUsbPrinter) -> FakeUsbPrinter:
        with dev.cond:
            dev.check()
            if dev.deny:
                raise USBError(*ACCESS)
            return dev

    def close_device(self, h: FakeUsbPrinter) -> None:
        with h.cond:
            h.claimed = False
            if h.current is not None:
                h.jobs.append(bytes(h.current))
                h.current = None
                h.cond.notify_all()

    def set_configuration(self, h: FakeUsbPrinter, config_value: int) -> None:
        h.check()

    def get_configuration(self, h: FakeUsbPrinter) -> int:
        h.check()
        return 1

    def set_interface_altsetting(self, h: FakeUsbPrinter, intf: int, alt: int) -> None:
        h.check()

    def claim_interface(self, h: FakeUsbPrinter, intf: int) -> None:
        with h.cond:
            h.check()
            if h.busy or h.kernel_driver:
                raise USBError(*BUSY)
            h.claimed = True  # a job starts (reading strings opens the device, claims nothing)
            h.current, h._scanned = bytearray(), 0
            h.replies.clear()

    def release_interface(self, h: FakeUsbPrinter, intf: int) -> None:
        with h.cond:
            h.check()
            h.claimed = False

    def bulk_write(self, h: FakeUsbPrinter, ep: int, intf: int, data: array.array,
                   timeout: int) -> int:
        assert ep == 0x01, hex(ep)
        return h.receive(data.tobytes())

    def bulk_read(self, h: FakeUsbPrinter, ep: int, intf: int, buff: array.array,
                  timeout: int) -> int:
        assert ep == 0x82, hex(ep)
        got = h.reply(len(buff), timeout)
        buff[:len(got)] = array.array("B", got)
        return len(got)

    def ctrl_transfer(self, h: FakeUsbPrinter, bmRequestType: int, bRequest: int, wValue: int,
                      wIndex: int, data: array.array, timeout: int) -> int:
        h.check()
        if (bmRequestType, bRequest, wValue >> 8) != (0x80, 6, 3):  # GET_DESCRIPTOR(STRING)
            raise USBError("Pipe error", -9, errno.EPIPE)
        index = wValue & 0xFF
        text = b"\x09\x04" if index == 0 else h.strings[index].encode("utf-16-le")
        desc = bytes((2 + len(text), 3)) + text
        n = min(len(desc), len(data))
        data[:n] = array.array("B", desc[:n])
        return n

    def is_kernel_driver_active(self, h: FakeUsbPrinter, intf: int) -> bool:
        h.check()
        return h.kernel_driver

    def detach_kernel_driver(self, h: FakeUsbPrinter, intf: int) -> None:
        h.check()
        h.kernel_driver, h.detached = False, h.detached + 1

    def attach_kernel_driver(self, h: FakeUsbPrinter, intf: int) -> None:
        h.check()
        h.kernel_driver, h.reattached = True, h.reattached + 1
