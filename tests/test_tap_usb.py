"""The receipt tap's USB printer target: pyusb's real code (find, descriptors, claim, bulk
transfers) on a fake backend (usb_fake.py), behind the real proxy on real loopback sockets with
python-escpos as the POS. No libusb is loaded: CI machines may not have it.

No timed assertions: waits are for events, with deadlines that only guard against hangs.
"""

from __future__ import annotations

import dataclasses
import errno
import select
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import suppress

import pytest
import usb.backend.libusb0
import usb.backend.libusb1
import usb.backend.openusb
from hexiao.hostd.tap.inject import remove_blocks, verify_token
from hexiao.hostd.tap.printer import SPECS, FileTarget, parse_target
from hexiao.hostd.tap.printer_usb import CHUNK, UsbTarget
from hexiao.hostd.tap.proxy import TapProxy
from test_tap_proxy import (
    DLE_EOT_1,
    KEY,
    LONG,
    decoded_qr,
    make_injector,
    pos_print,
    receipt_bytes,
)
from usb_fake import FakeBackend, FakeUsbPrinter

CUT = b"\x1dV\x00"
UDEV = ('give the service user access with a udev rule: SUBSYSTEM=="usb", '
        'ATTR{idVendor}=="0416", ATTR{idProduct}=="5011", MODE="0660", GROUP="hexiao" '
        "(then replug the printer)")


@pytest.fixture
def fake() -> FakeUsbPrinter:
    return FakeUsbPrinter()


@pytest.fixture
def bus(fake: FakeUsbPrinter) -> FakeBackend:
    keyboard = FakeUsbPrinter(0x046D, 0xC31C, None, "USB Keyboard", address=2, cls=3)
    return FakeBackend(keyboard, fake)


@pytest.fixture
def target(bus: FakeBackend) -> UsbTarget:
    return dataclasses.replace(parse_target("usb:0416:5011", timeout=LONG), backend=bus)


@pytest.fixture
def proxy(target: UsbTarget) -> Iterator[Callable[..., TapProxy]]:
    started: list[TapProxy] = []

    def start(tgt: UsbTarget | None = None, **kw: object) -> TapProxy:
        kw.setdefault("idle_timeout", 60.0)
        kw.setdefault("linger", 2.0)
        px = TapProxy(tgt or target, make_injector(), ("127.0.0.1", 0), **kw)  # type: ignore
        px.start()
        started.append(px)
        return px

    yield start
    for px in started:
        px.stop()


# ---- specs -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("spec", "expect", "name"), [
    ("usb:0416:5011", UsbTarget(0x0416, 0x5011), "usb:0416:5011"),
    ("usb:04b8:0E15", UsbTarget(0x04B8, 0x0E15), "usb:04b8:0e15"),
    ("usb:416:5011:SN:0042", UsbTarget(0x0416, 0x5011, "SN:0042"),  # serials may hold colons
     "usb:0416:5011:SN:0042"),
])
def test_usb_specs(spec: str, expect: UsbTarget, name: str) -> None:
    got = parse_target(spec)
    assert got == expect and got.describe() == name


@pytest.mark.parametrize("spec", ["usb:", "usb:0416", "usb:0416:", "usb:10416:5011",
                                  "usb:0x0416:5011", "usb:04g6:5011", "usb:0416:5011:", "lpt:1"])
def test_bad_usb_specs_say_what_to_use(spec: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_target(spec)
    assert str(exc.value) == (
        f"{spec!r}: the printer is tcp:HOST:PORT, file:PATH, serial:DEVICE[@BAUD] or "
        "usb:VID:PID[:SERIAL] (USB ids in hex as lsusb shows them, e.g. usb:0416:5011)")
    assert SPECS in str(exc.value)


def test_without_pyusb_only_usb_specs_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "hexiao.hostd.tap.printer_usb")
    for name in ("usb", "usb.core", "usb.util"):
        monkeypatch.setitem(sys.modules, name, None)  # import usb -> ImportError
    assert parse_target("file:/tmp/x") == FileTarget("/tmp/x")
    with pytest.raises(ValueError, match=r"^'usb:0416:5011': USB printers need pyusb "
                                         r"\(pip install pyusb\): "):
        parse_target("usb:0416:5011")


def test_libusb_is_not_loaded_by_import_or_by_a_fake_backend_job() -> None:
    code = ("import sys; sys.path.insert(0, 'tests'); from usb_fake import *\n"
            "from hexiao.hostd.tap.printer import parse_target\n"
            "import dataclasses\n"
            "t = dataclasses.replace(parse_target('usb:0416:5011'), "
            "backend=FakeBackend(FakeUsbPrinter()))\n"
            "c = t.open(); c.write(b'x'); c.close(0)\n"
            "print(sorted(m for m in sys.modules if m.startswith('usb.backend.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=LONG, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ---- jobs through the proxy ---------------------------------------------------------------------

def test_python_escpos_receipt_through_the_tap_to_a_usb_printer(
        fake: FakeUsbPrinter, proxy: Callable[..., TapProxy]) -> None:
    fake.kernel_driver = True  # usblp holds the printer, as on Linux
    px = proxy()
    reply = pos_print(px.address[1], status=True)
    assert reply == b"\x16"  # DLE EOT 1 answered on the bulk IN endpoint, back through the tap
    rec, = px.wait_finished(1)
    job, = fake.wait_jobs(1)
    sent = DLE_EOT_1 + receipt_bytes()
    assert rec.end == "closed" and rec.errors == [] and rec.replies == 1
    assert rec.bytes_in == len(sent) and rec.bytes_out == len(job)
    assert len(rec.injections) == 1 and remove_blocks(job, rec.injections) == sent
    off, n = rec.injections[0]
    assert job.endswith(CUT) and job.count(CUT) == 1 and off + n <= len(job) - len(CUT)
    qr, = decoded_qr(job)
    assert qr == rec.receipts[0].content
    assert str(verify_token([KEY], qr.rsplit("/", 1)[1]).total) == "32.50"
    # usblp was detached for the job and given back after it
    assert (fake.detached, fake.reattached, fake.kernel_driver, fake.claimed) == (1, 1, True, False)


def test_a_large_job_goes_out_in_chunks_byte_exact(fake: FakeUsbPrinter,
                                                   proxy: Callable[..., TapProxy]) -> None:
    logo = b"\x1dv0\x00" + (72).to_bytes(2, "little") + (1000).to_bytes(2, "little") \
        + bytes(range(256)) * (72 * 1000 // 256) + b"\x1dV\x00" * (72 * 1000 % 256 // 3)
    sent = b"\x1b@" + logo + receipt_bytes()[2:]
    px = proxy()
    with socket.create_connection(px.address, timeout=LONG) as pos:
        pos.sendall(sent)
        pos.shutdown(socket.SHUT_WR)
        assert pos.recv(16) == b""
    rec, = px.wait_finished(1)
    job, = fake.wait_jobs(1)
    assert rec.end == "closed" and len(rec.injections) == 1
    assert remove_blocks(job, rec.injections) == sent
    assert max(fake.writes) <= CHUNK  # however the proxy's writes were split
    conn = dataclasses.replace(px.target, serial="P58-0001").open()  # type: ignore[arg-type]
    fake.writes.clear()
    conn.write(bytes(3 * CHUNK + 7))
    conn.close(0)
    assert fake.writes == [CHUNK, CHUNK, CHUNK, 7] and fake.jobs[1] == bytes(3 * CHUNK + 7)


def test_status_requests_mid_job_are_answered_in_order(fake: FakeUsbPrinter,
                                                       proxy: Callable[..., TapProxy]) -> None:
    px = proxy()
    with socket.create_connection(px.address, timeout=LONG) as pos:
        got = b""
        for n in (1, 2, 4, 1):  # the POS waits for each answer, as real POS software does
            pos.sendall(b"\x10\x04" + bytes((n,)))
            got += pos.recv(16)
        pos.sendall(receipt_bytes())
        pos.shutdown(socket.SHUT_WR)
        assert pos.recv(16) == b""
    assert got == b"\x16\x12\x12\x16"
    rec, = px.wait_finished(1)
    assert rec.replies == 4 and rec.counters["status_requests"] == 4


def test_a_printer_without_a_bulk_in_endpoint_still_prints(bus: FakeBackend,
                                                           proxy: Callable[..., TapProxy]) -> None:
    oneway = FakeUsbPrinter(0x0FE6, 0x811E, "OW-1", bulk_in=False, address=9)
    bus.devices.append(oneway)
    conn = UsbTarget(0x0FE6, 0x811E, backend=bus).open()
    assert conn.fileno() is None and conn.read() == b""
    conn.close(0)
    px = proxy(UsbTarget(0x0FE6, 0x811E, "OW-1", backend=bus))
    pos_print(px.address[1])
    rec, = px.wait_finished(1)
    job = oneway.wait_jobs(2)[1]
    assert rec.end == "closed" and remove_blocks(job, rec.injections) == receipt_bytes()


def test_unplugged_mid_job_is_counted_never_resent_and_the_next_job_prints(
        fake: FakeUsbPrinter, proxy: Callable[..., TapProxy]) -> None:
    px = proxy(connect_timeout=0.1)
    head, tail = b"\x1b@" + b"\x1dv0\x00\x30\x00\xe8\x03" + bytes(48 * 1000), receipt_bytes()[2:]
    fake.unplug_after = 20_000
    with socket.create_connection(px.address, timeout=LONG) as pos:
        pos.sendall(head)
        job, = fake.wait_jobs(1)  # the device was closed after the failed write
        with suppress(OSError):  # the proxy drains what the POS still sends before closing
            pos.sendall(tail)
        assert pos.recv(16) == b""  # a FIN, not a reset
    rec, = px.wait_finished(1)
    assert job == head[:20_000]  # a prefix: nothing written twice
    assert rec.end == "printer-lost" and px.counters["printer_lost"] == 1
    assert rec.errors == [
        f"printer lost mid-job after {rec.bytes_out} bytes, nothing resent: [Errno 19] "
        "usb:0416:5011: the USB printer went away writing (unplugged or switched off)"]
    assert px.errors[0] == f"{rec.peer}: {rec.errors[0]}"
    # still unplugged: the next job is refused with the printers that are there
    with socket.create_connection(px.address, timeout=LONG) as pos:
        pos.sendall(receipt_bytes())
        assert pos.recv(16) == b""
    rec2 = px.wait_finished(2)[1]
    assert rec2.end == "printer-refused" and rec2.errors == [
        "printer refused the job: usb:0416:5011: [Errno 19] usb:0416:5011: no such USB printer; "
        "no USB printer is present (plugged in and switched on? `lsusb` lists USB devices)"]
    fake.replug()
    pos_print(px.address[1])
    rec3 = px.wait_finished(3)[2]
    jobs = fake.wait_jobs(2)
    assert len(jobs) == 2 and remove_blocks(jobs[1], rec3.injections) == receipt_bytes()
    assert rec3.end == "closed" and px.counters["jobs"] == 3


def test_unplugged_while_idle_mid_job_ends_the_job_via_the_status_reader(
        fake: FakeUsbPrinter, proxy: Callable[..., TapProxy]) -> None:
    px = proxy()
    with socket.create_connection(px.address, timeout=LONG) as pos:
        # mid-image (no idle end); the parser passes the command on and keeps the 100 data
        # bytes for a fuller piece: the proxy has nothing to write and waits on the printer
        pos.sendall(b"\x1b@\x1dv0\x00\x30\x00\xe8\x03" + bytes(100))
        with fake.cond:
            assert fake.cond.wait_for(lambda: fake.current is not None
                                      and len(fake.current) == 10, LONG)
        fake.unplug()
        assert pos.recv(16) == b""
    rec, = px.wait_finished(1)
    assert rec.end == "printer-lost" and rec.errors == [
        "printer lost mid-job after 10 bytes, nothing resent: [Errno 19] usb:0416:5011: "
        "the USB printer went away reading its status (unplugged or switched off)"]


# ---- open() failures: the message says what to do ---------------------------------------------

def test_not_found_lists_the_usb_printers_that_are_present(bus: FakeBackend) -> None:
    bus.devices.append(FakeUsbPrinter(0x0483, 0x5743, None, "XP-58", address=7))
    for spec in ("usb:0416:5012", "usb:0416:5011:OTHER"):
        with pytest.raises(OSError) as exc:
            dataclasses.replace(parse_target(spec), backend=bus).open()
        assert exc.value.errno == errno.ENODEV and exc.value.strerror == (
            f"{spec}: no such USB printer; USB printers present: "
            'usb:0416:5011:P58-0001 "POS58 Printer", usb:0483:5743 "XP-58"')


def test_a_device_that_is_not_a_printer_is_not_found(bus: FakeBackend) -> None:
    with pytest.raises(OSError, match=r"^\[Errno 19\] usb:046d:c31c: no such USB printer; "
                                      r'USB printers present: usb:0416:5011:P58-0001 "POS58'):
        UsbTarget(0x046D, 0xC31C, backend=bus).open()


def test_a_printer_class_device_without_a_printer_interface_says_so(bus: FakeBackend) -> None:
    odd = FakeUsbPrinter(0x28E9, 0x0289, None, "Vendor-class POS", address=8, cls=0xFF)
    odd.device.bDeviceClass = 7  # says "printer" on the device, not on its interface
    bus.devices.append(odd)
    with pytest.raises(OSError) as exc:
        UsbTarget(0x28E9, 0x0289, backend=bus).open()
    assert exc.value.strerror == ("usb:28e9:0289: the device has no printer interface (class 7) "
                                  "with a bulk OUT endpoint in its active configuration")
    assert odd.jobs == [] and not odd.claimed


def test_permission_denied_names_the_udev_rule(fake: FakeUsbPrinter, target: UsbTarget) -> None:
    fake.deny = True
    with pytest.raises(OSError) as exc:
        target.open()
    assert exc.value.errno == errno.EACCES and exc.value.strerror == (
        "usb:0416:5011: permission denied opening the USB printer (/dev/bus/usb/001/005): " + UDEV)
    with pytest.raises(OSError) as exc:  # with a serial, reading it is what fails first
        dataclasses.replace(target, serial="P58-0001").open()
    assert exc.value.strerror == ("usb:0416:5011:P58-0001: permission denied reading the serial "
                                  "number of the USB printer (/dev/bus/usb/001/005): " + UDEV)
    with pytest.raises(OSError) as exc:  # the listing says it cannot read the serial either
        dataclasses.replace(target, pid=0x5012).open()
    assert exc.value.strerror == (
        "usb:0416:5012: no such USB printer; USB printers present: usb:0416:5011 (serial "
        "unreadable: [Errno 13] Access denied (insufficient permissions))")


def test_permission_denied_is_a_refused_job_that_prints_nothing(
        fake: FakeUsbPrinter, proxy: Callable[..., TapProxy]) -> None:
    fake.deny = True
    px = proxy(connect_timeout=0.1)
    with socket.create_connection(px.address, timeout=LONG) as pos:
        pos.sendall(receipt_bytes())
        assert pos.recv(16) == b""
    rec, = px.wait_finished(1)
    assert rec.end == "printer-refused" and px.counters["printer_refused"] == 1
    assert rec.errors == ["printer refused the job: usb:0416:5011: [Errno 13] usb:0416:5011: "
                          "permission denied opening the USB printer (/dev/bus/usb/001/005): "
                          + UDEV]
    assert fake.jobs == []


def test_busy_interface_says_who_may_hold_it(fake: FakeUsbPrinter, target: UsbTarget) -> None:
    fake.busy = True
    with pytest.raises(OSError) as exc:
        target.open()
    assert exc.value.errno == errno.EBUSY and exc.value.strerror == (
        "usb:0416:5011: the printer interface is busy opening: another program holds it "
        "(CUPS's usb backend, another tap?); stop it or give the printer to the tap alone")
    assert not fake.claimed


def test_busy_after_detaching_usblp_gives_the_printer_back(fake: FakeUsbPrinter,
                                                           target: UsbTarget) -> None:
    fake.kernel_driver = fake.busy = True
    with pytest.raises(OSError, match="busy"):
        target.open()
    assert (fake.detached, fake.reattached, fake.kernel_driver) == (1, 1, True)


def test_without_libusb_the_message_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for mod in (usb.backend.libusb1, usb.backend.openusb, usb.backend.libusb0):
        monkeypatch.setattr(mod, "get_backend", lambda *a, **k: None)  # as with no library
    with pytest.raises(OSError) as exc:
        parse_target("usb:0416:5011").open()
    assert exc.value.strerror == ("usb:0416:5011: libusb is not installed: install libusb-1.0 "
                                  "(Debian/Ubuntu: apt install libusb-1.0-0)")


def test_close_returns_a_late_reply_and_releases_the_printer(fake: FakeUsbPrinter,
                                                             target: UsbTarget) -> None:
    conn = target.open()
    fd = conn.fileno()
    assert fd is not None and fake.claimed
    conn.write(DLE_EOT_1)
    assert select.select([fd], [], [], LONG)[0] and conn.read() == b"\x16"
    conn.write(b"\x10\x04\x02")
    with fake.cond:  # the reader took the reply into the pipe: close() still returns it
        assert fake.cond.wait_for(lambda: not fake.replies, LONG)
    assert conn.close(LONG) == b"\x12"
    assert not fake.claimed and fake.jobs == [DLE_EOT_1 + b"\x10\x04\x02"]
