"""The receipt tap proxy with real pieces: python-escpos as the POS over real TCP sockets on
127.0.0.1, a loopback fake printer (a TCP server that records every connection's bytes and answers
DLE EOT n with a status byte), a pty standing in for a serial printer, and a file target.

No timed assertions: tests wait for events (a connection ended, a job recorded) with generous
deadlines that only guard against hangs; timeouts that are configured short (idle, connect) only
make the proxy reach the path under test sooner.
"""

from __future__ import annotations

import io
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Callable, Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout, suppress
from pathlib import Path

import pytest
import zxingcpp
from escpos.printer import Dummy, Network
from hexiao.hostd.tap.inject import Content, Injector, remove_blocks, verify_token
from hexiao.hostd.tap.printer import FileTarget, SerialTarget, TcpTarget, parse_target
from hexiao.hostd.tap.proxy import TapProxy
from hexiao.hostd.tap.render import render

KEY = bytes(range(32))
URL = "https://hexiao.example/r/{token}"
DLE_EOT_1 = b"\x10\x04\x01"
STATUS = {1: 0x16, 2: 0x12, 3: 0x12, 4: 0x12}
LONG = 20.0  # a guard against hangs, never a performance claim


class FakePrinter:
    """A loopback printer: one thread per connection, bytes recorded, DLE EOT n answered."""

    def __init__(self, port: int = 0) -> None:
        self.jobs: list[bytes] = []        # finished connections, in the order they ended
        self.current: list[bytearray] = []  # connections still open
        self.active = self.max_active = 0
        self.drop_after: int | None = None  # close a connection after this many bytes
        self.dropped = threading.Event()
        self.cond = threading.Condition()
        self.port = port
        self.listen()

    def listen(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", self.port))
        self.port = self.sock.getsockname()[1]
        self.sock.listen(8)
        threading.Thread(target=self._accept, args=(self.sock,), daemon=True).start()

    def down(self) -> None:
        """Stop listening: connections are refused (shutdown wakes the blocked accept)."""
        with suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    def _accept(self, lsock: socket.socket) -> None:
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        with self.cond:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.current.append(buf)
        scanned = 0
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                with self.cond:
                    buf += data
                    self.cond.notify_all()
                while (j := buf.find(b"\x10\x04", scanned)) >= 0 and j + 2 < len(buf):
                    conn.sendall(bytes((STATUS.get(buf[j + 2], 0x12),)))
                    scanned = j + 3
                scanned = max(scanned, len(buf) - 2)
                if self.drop_after is not None and len(buf) >= self.drop_after:
                    self.dropped.set()
                    break
            with self.cond:  # recorded before the close: jobs are listed in the order they ended
                self.active -= 1
                self.current.remove(buf)
                self.jobs.append(bytes(buf))
                self.cond.notify_all()

    def wait_jobs(self, n: int) -> list[bytes]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.jobs) >= n, LONG), self.jobs
            return list(self.jobs)

    def wait_receiving(self, nbytes: int) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: sum(map(len, self.current)) >= nbytes, LONG)


def wait_until(cond: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + LONG
    while not cond():
        assert time.monotonic() < deadline, "gave up waiting"
        time.sleep(0.005)
    return True


def quiet(fn: Callable[[], object]) -> object:
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        return fn()


def chinese_receipt(p: object, shop: str = "好又多超市 (天河店)", total: str = "32.50") -> None:
    """A Chinese receipt as a POS would print it with python-escpos (GB18030 text sent raw)."""
    raw = p._raw  # type: ignore[attr-defined]
    raw(b"\x1b@")
    p.set(align="center", double_height=True, double_width=True)  # type: ignore[attr-defined]
    raw(f"{shop}\n".encode("gb18030"))
    p.set(align="left", normal_textsize=True)  # type: ignore[attr-defined]
    for i, (name, price) in enumerate([("可口可乐 330ml", "3.50"), ("康师傅红烧牛肉面", "4.50"),
                                       ("农夫山泉 550ml", "2.00"), ("鸡蛋 (10枚)", "12.50"),
                                       ("𠮷野家 便当", "10.00")]):
        raw(f"{i + 1:02d} {name:<16} ¥{price}\n".encode("gb18030"))
    raw(f"合计: ¥{total}\n实收: ¥50.00\n找零: ¥{50 - float(total):.2f}\n".encode("gb18030"))
    p.barcode("6901234567892", "EAN13")  # type: ignore[attr-defined]
    p.text("Thank you\n")  # type: ignore[attr-defined]
    p.cut()  # type: ignore[attr-defined]


def receipt_bytes(*more: str, **kw: str) -> bytes:
    """What python-escpos sends for one receipt, or for several on one printer object (its
    text encoder remembers the code page it selected, so later receipts can differ)."""
    dummy = quiet(Dummy)
    quiet(lambda: chinese_receipt(dummy, **kw))
    for total in more:
        quiet(lambda t=total: chinese_receipt(dummy, total=t))  # type: ignore[misc]
    return dummy.output  # type: ignore[attr-defined]


def pos_print(port: int, status: bool = False, **kw: str) -> bytes:
    """Print one receipt through the proxy with python-escpos over TCP; the status byte if asked."""
    p = Network("127.0.0.1", port, timeout=LONG)
    quiet(p.open)
    reply = b""
    if status:
        reply = p.query_status(DLE_EOT_1)
    quiet(lambda: chinese_receipt(p, **kw))
    p.close()
    return reply


def printed(px: TapProxy, n: int) -> list:
    """The first `n` connection records, in the order their jobs reached the printer (records
    are kept in the order connections ended, which can differ by a thread switch)."""
    return sorted(px.wait_finished(n), key=lambda rec: rec.job_ids[:1] or [0])


def make_injector(content: Content | None = None) -> Callable[[], Injector]:
    return lambda: Injector(content=content or Content(URL, "lane-9", KEY))


@pytest.fixture
def printer() -> Iterator[FakePrinter]:
    fp = FakePrinter()
    yield fp
    fp.down()


@pytest.fixture
def proxy(printer: FakePrinter) -> Iterator[Callable[..., TapProxy]]:
    started: list[TapProxy] = []

    def start(make: Callable[[], Injector] | None = None, **kw: object) -> TapProxy:
        kw.setdefault("idle_timeout", 60.0)
        kw.setdefault("linger", 2.0)
        px = TapProxy(TcpTarget("127.0.0.1", printer.port, timeout=LONG),
                      make or make_injector(), ("127.0.0.1", 0), **kw)  # type: ignore[arg-type]
        px.start()
        started.append(px)
        return px

    yield start
    for px in started:
        px.stop()


def decoded_qr(data: bytes) -> list[str]:
    img = render(data, width=576)
    return [r.text for r in zxingcpp.read_barcodes(img, formats=zxingcpp.BarcodeFormat.QRCode)]


# ---- a whole receipt through the proxy -------------------------------------------------------

def test_python_escpos_receipt_gets_one_qr_before_its_cut_and_status_passes(
        printer: FakePrinter, proxy: Callable[..., TapProxy]) -> None:
    px = proxy()
    reply = pos_print(px.address[1], status=True)
    assert reply == b"\x16"  # the printer's answer to DLE EOT 1 came back through the tap
    rec, = px.wait_finished(1)
    job, = printer.wait_jobs(1)
    sent = DLE_EOT_1 + receipt_bytes()
    assert rec.end == "closed" and rec.bytes_in == len(sent) and rec.bytes_out == len(job)
    assert rec.replies == 1 and rec.counters["status_requests"] == 1
    assert len(rec.injections) == 1 and remove_blocks(job, rec.injections) == sent
    off, n = rec.injections[0]
    cut = b"\x1dV\x00"
    assert job.endswith(cut) and job.count(cut) == 1 and off + n <= len(job) - len(cut)
    assert "合计" in "".join(rec.receipts[0].lines) and str(rec.receipts[0].total) == "32.50"
    qr, = decoded_qr(job)
    assert qr == rec.receipts[0].content and qr.startswith("https://hexiao.example/r/")
    info = verify_token([KEY], qr.rsplit("/", 1)[1])
    assert info.lane == "lane-9" and str(info.total) == "32.50"
    assert px.counters["jobs"] == 1 and px.counters["injector_injected"] == 1


def test_jobs_in_a_row_each_get_their_qr(printer: FakePrinter,
                                         proxy: Callable[..., TapProxy]) -> None:
    px = proxy()
    totals = ["1.00", "22.00", "333.00"]
    for total in totals:
        pos_print(px.address[1], total=total)
    recs = printed(px, 3)
    jobs = printer.wait_jobs(3)
    for rec, job, total in zip(recs, jobs, totals, strict=True):
        assert remove_blocks(job, rec.injections) == receipt_bytes(total=total)
        assert len(rec.injections) == 1 and str(rec.receipts[0].total) == total


def test_concurrent_connections_are_serialized_not_interleaved(
        printer: FakePrinter, proxy: Callable[..., TapProxy]) -> None:
    px = proxy()
    a_bytes, b_bytes = receipt_bytes(shop="甲店"), receipt_bytes(shop="乙店", total="9.90")
    half = len(a_bytes) // 2
    a = Network("127.0.0.1", px.address[1], timeout=LONG)
    quiet(a.open)
    a._raw(a_bytes[:half])
    printer.wait_receiving(1)             # A holds the printer, mid-receipt
    b = threading.Thread(target=pos_print, args=(px.address[1],),
                         kwargs={"shop": "乙店", "total": "9.90"})
    b.start()
    wait_until(lambda: px.waiting == 1)   # B's job is queued behind A's
    a._raw(a_bytes[half:])
    a.close()
    b.join(LONG)
    recs = printed(px, 2)
    jobs = printer.wait_jobs(2)
    assert printer.max_active == 1
    assert [remove_blocks(j, r.injections) for j, r in zip(jobs, recs, strict=True)] == \
        [a_bytes, b_bytes]
    assert all(len(r.injections) == 1 for r in recs)


def test_idle_gap_ends_a_job_on_a_connection_that_stays_open(
        printer: FakePrinter, proxy: Callable[..., TapProxy]) -> None:
    px = proxy(idle_timeout=0.05)
    one, two = receipt_bytes(total="5.00"), receipt_bytes(total="6.00")
    p = Network("127.0.0.1", px.address[1], timeout=LONG)
    quiet(p.open)
    p._raw(one)    # each receipt in one write: a slow machine cannot put an idle gap inside it
    first, = printer.wait_jobs(1)          # the idle gap released the printer
    p._raw(two)
    p.close()
    rec, = px.wait_finished(1)
    jobs = printer.wait_jobs(2)
    assert rec.jobs == 2 and rec.end == "closed" and len(rec.injections) == 2
    assert remove_blocks(b"".join(jobs), rec.injections) == one + two
    assert jobs[0] == first


# ---- bad input and failures ------------------------------------------------------------------

def test_printer_down_closes_the_pos_cleanly_and_the_next_job_prints_once(
        printer: FakePrinter, proxy: Callable[..., TapProxy]) -> None:
    px = proxy(connect_timeout=0.2)
    printer.down()
    sent = receipt_bytes()
    with socket.create_connection(px.address, timeout=LONG) as pos:
        pos.sendall(sent)
        assert pos.recv(16) == b""        # a FIN, not a reset: recv would raise on a reset
    rec, = px.wait_finished(1)
    assert rec.end == "printer-refused" and rec.bytes_out == 0
    assert px.counters["printer_refused"] == 1 and "refused" in px.errors[0]
    printer.listen()                      # the printer is back, same port
    pos_print(px.address[1])
    recs = px.wait_finished(2)
    jobs = printer.wait_jobs(1)
    assert len(jobs) == 1 and remove_blocks(jobs[0], recs[1].injections) == sent
    assert recs[1].end == "closed" and px.counters["jobs"] == 2


def test_printer_lost_mid_job_is_counted_never_resent_and_serving_goes_on(
        printer: FakePrinter, proxy: Callable[..., TapProxy]) -> None:
    px = proxy()
    logo = b"\x1dv0\x00" + (72).to_bytes(2, "little") + (2000).to_bytes(2, "little") \
        + bytes(range(256)) * (72 * 2000 // 256) + b"\x55" * (72 * 2000 % 256)
    head, tail = b"\x1b@" + logo[:100_000], logo[100_000:] + receipt_bytes()[2:]
    printer.drop_after = 50_000
    with socket.create_connection(px.address, timeout=LONG) as pos:
        pos.sendall(head)
        assert printer.dropped.wait(LONG)
        job, = printer.wait_jobs(1)
        with suppress(OSError):  # the proxy drains what the POS still sends before closing
            pos.sendall(tail)
        assert pos.recv(16) == b""
    rec, = px.wait_finished(1)
    assert rec.end == "printer-lost" and px.counters["printer_lost"] == 1
    assert job == head[:len(job)] and rec.bytes_out >= len(job)  # a prefix, nothing doubled
    printer.drop_after = None
    pos_print(px.address[1])
    recs = px.wait_finished(2)
    jobs = printer.wait_jobs(2)
    assert len(jobs) == 2 and remove_blocks(jobs[1], recs[1].injections) == receipt_bytes()


class FailingContent(Content):
    def fields(self, rc: object, now: float) -> dict[str, str]:  # type: ignore[override]
        raise RuntimeError("template backend down")


def test_template_failure_prints_the_original_unchanged(
        printer: FakePrinter, proxy: Callable[..., TapProxy]) -> None:
    px = proxy(make_injector(FailingContent("{digest}")))
    pos_print(px.address[1])
    rec, = px.wait_finished(1)
    job, = printer.wait_jobs(1)
    assert job == receipt_bytes() and rec.injections == []
    assert rec.counters["errors"] == 1 and px.counters["injector_errors"] == 1
    assert "template backend down" in rec.errors[0]


def test_injector_internal_error_fails_open(printer: FakePrinter,
                                            proxy: Callable[..., TapProxy],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: Injector, *a: object) -> None:
        raise KeyError("parser state")

    monkeypatch.setattr(Injector, "_event", broken)
    px = proxy()
    pos_print(px.address[1])
    rec, = px.wait_finished(1)
    job, = printer.wait_jobs(1)
    assert job == receipt_bytes() and rec.counters["failopen"] == 1
    assert px.counters["injector_failopen"] == 1


class RaisingInjector(Injector):
    def feed(self, data: bytes, now: float) -> bytes:
        raise MemoryError("injector broke its promise")


def test_an_injector_that_raises_is_bypassed(printer: FakePrinter,
                                             proxy: Callable[..., TapProxy]) -> None:
    px = proxy(lambda: RaisingInjector())
    pos_print(px.address[1], status=True)
    rec, = px.wait_finished(1)
    job, = printer.wait_jobs(1)
    assert job == DLE_EOT_1 + receipt_bytes() and px.counters["proxy_failopen"] == 1
    assert rec.replies == 1


def test_truncated_command_at_close_is_forwarded_as_sent(
        printer: FakePrinter, proxy: Callable[..., TapProxy]) -> None:
    px = proxy()
    sent = receipt_bytes()[:-3] + "小计 ¥3.00\n".encode("gb18030") + b"\x1dv0\x00\x48\x00\x10"
    with socket.create_connection(px.address, timeout=LONG) as pos:
        pos.sendall(sent)
    rec, = px.wait_finished(1)
    job, = printer.wait_jobs(1)
    assert job == sent and rec.injections == []   # uncertain framing: no QR, bytes as sent
    assert rec.receipts[-1].uncertain and rec.end == "closed"


def test_pos_closing_early_flushes_everything_it_sent(
        printer: FakePrinter, proxy: Callable[..., TapProxy]) -> None:
    px = proxy()
    full = receipt_bytes()
    sent = full[:full.index("合计".encode("gb18030")) + 4]  # mid-receipt, no cut
    with socket.create_connection(px.address, timeout=LONG) as pos:
        pos.sendall(sent)
    rec, = px.wait_finished(1)
    job, = printer.wait_jobs(1)
    assert remove_blocks(job, rec.injections) == sent and len(rec.injections) == 1


def test_pos_silent_mid_command_is_flushed_after_the_stall_timeout(
        printer: FakePrinter, proxy: Callable[..., TapProxy]) -> None:
    px = proxy(idle_timeout=0.02, stall_timeout=0.1)
    sent = receipt_bytes()[:-3] + b"\x1d(k\x10"  # a GS ( k header cut short: never a boundary
    with socket.create_connection(px.address, timeout=LONG) as pos:
        pos.sendall(sent)
        assert pos.recv(16) == b""
    rec, = px.wait_finished(1)
    job, = printer.wait_jobs(1)
    assert rec.end == "stalled" and rec.jobs == 1 and job == sent
    assert px.counters["stalled"] == 1


def test_a_pos_that_connects_and_leaves_costs_nothing(printer: FakePrinter,
                                                      proxy: Callable[..., TapProxy]) -> None:
    px = proxy()
    socket.create_connection(px.address, timeout=LONG).close()
    rec, = px.wait_finished(1)
    assert rec.end == "closed" and rec.jobs == 0 and printer.jobs == []


def test_pos_that_resets_mid_receipt_still_gets_what_it_sent_printed(
        printer: FakePrinter, proxy: Callable[..., TapProxy]) -> None:
    px = proxy()
    full = receipt_bytes()
    sent = full[:full.index("合计".encode("gb18030"))]  # ends with a printed line
    pos = socket.create_connection(px.address, timeout=LONG)
    pos.sendall(sent)
    printer.wait_receiving(len(sent))       # the proxy has read (and forwarded) it all
    pos.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    pos.close()                              # linger 0: a reset, not a FIN
    rec, = px.wait_finished(1)
    job, = printer.wait_jobs(1)
    assert rec.end == "closed" and remove_blocks(job, rec.injections) == sent
    assert len(rec.injections) == 1          # the uncut receipt got its QR at the job end


def test_an_injector_that_cannot_be_made_leaves_a_plain_pipe(
        printer: FakePrinter, proxy: Callable[..., TapProxy]) -> None:
    def no_injector() -> Injector:
        raise ValueError("bad profile file")

    px = proxy(no_injector)
    reply = pos_print(px.address[1], status=True)
    rec, = px.wait_finished(1)
    job, = printer.wait_jobs(1)
    assert reply == b"\x16" and job == DLE_EOT_1 + receipt_bytes()
    assert px.counters["proxy_failopen"] == 1 and rec.end == "closed"


def test_stop_flushes_an_open_connection_and_ends_it(printer: FakePrinter) -> None:
    px = TapProxy(TcpTarget("127.0.0.1", printer.port), make_injector(), ("127.0.0.1", 0),
                  idle_timeout=60.0)
    px.start()
    sent = receipt_bytes()[:-3]  # no cut yet; the POS keeps its connection open
    with socket.create_connection(px.address, timeout=LONG) as pos:
        pos.sendall(sent)
        printer.wait_receiving(1)
        px.stop()
        assert pos.recv(16) == b""
    rec, = px.wait_finished(1)
    job, = printer.wait_jobs(1)
    assert remove_blocks(job, rec.injections) == sent and rec.end == "closed"


def test_records_are_bounded_but_every_end_is_counted(printer: FakePrinter,
                                                      proxy: Callable[..., TapProxy]) -> None:
    seen: list[str] = []
    px = proxy(keep=2, on_finish=lambda rec: seen.append(rec.end))
    for _ in range(4):
        socket.create_connection(px.address, timeout=LONG).close()
    assert len(px.wait_finished(4)) == 2 and px.ended == 4
    wait_until(lambda: len(seen) == 4)
    assert px.counters["end_closed"] == 4


# ---- other targets -----------------------------------------------------------------------------

def test_file_target_gets_the_job(tmp_path: Path) -> None:
    out = tmp_path / "printer.bin"
    with TapProxy(FileTarget(str(out)), make_injector(), ("127.0.0.1", 0)) as px:
        pos_print(px.address[1])
        pos_print(px.address[1], total="7.00")
        recs = printed(px, 2)
    data = out.read_bytes()
    first_len = recs[0].bytes_out
    assert remove_blocks(data[:first_len], recs[0].injections) == receipt_bytes()
    assert remove_blocks(data[first_len:], recs[1].injections) == receipt_bytes(total="7.00")


def test_serial_printer_on_a_pty_answers_status_through_the_tap() -> None:
    master, slave = os.openpty()
    tty.setraw(master)
    got = bytearray()
    stop = threading.Event()

    def serial_printer() -> None:  # the far end of the serial cable
        while not stop.is_set():
            if select.select([master], [], [], 0.05)[0]:
                try:
                    data = os.read(master, 4096)
                except OSError:
                    return
                got.extend(data)
                if b"\x10\x04\x01" in data:
                    os.write(master, b"\x16")

    t = threading.Thread(target=serial_printer, daemon=True)
    t.start()
    try:
        with TapProxy(SerialTarget(os.ttyname(slave)), make_injector(), ("127.0.0.1", 0),
                      linger=0.5) as px:
            assert pos_print(px.address[1], status=True) == b"\x16"
            rec, = px.wait_finished(1)
            wait_until(lambda: len(got) >= rec.bytes_out)
    finally:
        stop.set()
        t.join(LONG)
        os.close(master)
        os.close(slave)
    assert remove_blocks(bytes(got), rec.injections) == DLE_EOT_1 + receipt_bytes()
    assert rec.replies == 1 and len(rec.injections) == 1


def test_serial_target_that_cannot_open_is_refused(tmp_path: Path) -> None:
    sent = receipt_bytes()
    with TapProxy(SerialTarget(str(tmp_path / "no-such-tty")), make_injector(),
                  ("127.0.0.1", 0), connect_timeout=0.1) as px:
        with socket.create_connection(px.address, timeout=LONG) as pos:
            pos.sendall(sent)
            assert pos.recv(16) == b""
        rec, = px.wait_finished(1)
    assert rec.end == "printer-refused" and px.counters["printer_refused"] == 1


@pytest.mark.parametrize(("spec", "expect"), [
    ("tcp:192.168.1.50:9100", TcpTarget("192.168.1.50", 9100)),
    ("tcp:[::1]:9100", TcpTarget("::1", 9100)),
    ("file:/tmp/x.bin", FileTarget("/tmp/x.bin")),
    ("serial:/dev/ttyUSB0", SerialTarget("/dev/ttyUSB0")),
    ("serial:/dev/ttyUSB0@115200", SerialTarget("/dev/ttyUSB0", 115200)),
])
def test_printer_specs(spec: str, expect: object) -> None:
    assert parse_target(spec) == expect


@pytest.mark.parametrize("spec", ["tcp:host", "tcp:host:99999", "tcp::9100", "file:", "usb:1",
                                  "serial:/dev/x@fast", "9100"])
def test_bad_printer_specs_say_what_to_use(spec: str) -> None:
    with pytest.raises(ValueError, match=r"tcp:HOST:PORT|baud"):
        parse_target(spec)


# ---- the CLI -----------------------------------------------------------------------------------

@contextmanager
def tap_serve(printer: FakePrinter, *args: str) -> Iterator[tuple[subprocess.Popen[str], dict]]:
    """`hexiao tap serve --json` in its own process, printing to `printer`: yields it and its
    first line (where it listens); killed if the test did not stop it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "from hexiao.tools.cli import main; main()", "tap", "serve",
         "--printer", f"tcp:127.0.0.1:{printer.port}", "--content", "https://x.example/{digest}",
         "--json", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc, json.loads(proc.stdout.readline())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=LONG)


def test_cli_serve_prints_a_job_and_stops_on_sigterm(printer: FakePrinter, tmp_path: Path) -> None:
    with tap_serve(printer, "--listen", "127.0.0.1:0", "--idle-timeout", "5") as (proc, started):
        assert proc.stdout is not None
        assert started["listening"].startswith("127.0.0.1:")
        pos_print(int(started["listening"].rsplit(":", 1)[1]))
        done = json.loads(proc.stdout.readline())
        job, = printer.wait_jobs(1)
        proc.terminate()
        out, err = proc.communicate(timeout=LONG)
    assert proc.returncode == 0, err
    assert done["end"] == "closed" and done["injected"] == 1
    assert remove_blocks(job, [tuple(i) for i in done["injections"]]) == receipt_bytes()
    assert decoded_qr(job) == [done["receipts"][0]["content"]]
    assert json.loads(out.splitlines()[-1])["summary"]["jobs"] == 1


def test_cli_serve_stall_timeout_flushes_a_pos_silent_mid_command(printer: FakePrinter) -> None:
    with tap_serve(printer, "--listen", "127.0.0.1:0", "--idle-timeout", "0.05",
                   "--stall-timeout", "0.2") as (proc, started):
        assert proc.stdout is not None
        port = int(started["listening"].rsplit(":", 1)[1])
        sent = receipt_bytes()[:-3] + b"\x1d(k\x10"  # a GS ( k header cut short
        with socket.create_connection(("127.0.0.1", port), timeout=LONG) as pos:
            pos.sendall(sent)
            assert pos.recv(16) == b""  # closed by the tap after the stall, not by us
        done = json.loads(proc.stdout.readline())
        job, = printer.wait_jobs(1)
        proc.terminate()
        proc.communicate(timeout=LONG)
    assert done["end"] == "stalled" and job == sent


@pytest.mark.parametrize(("args", "message"), [
    (["--printer", "usb:1"], "tcp:HOST:PORT"),
    (["--printer", "tcp:127.0.0.1:9100", "--listen", "9100"], "HOST:PORT"),
    (["--printer", "tcp:127.0.0.1:9100", "--content", "{token}"], "--key-file"),
])
def test_cli_serve_refuses_bad_options(args: list[str], message: str) -> None:
    from click.testing import CliRunner
    from hexiao.tools.tap import main

    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 2 and message in result.output


def test_cli_serve_says_when_the_port_is_taken(printer: FakePrinter) -> None:
    from click.testing import CliRunner
    from hexiao.tools.tap import main

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--listen", f"127.0.0.1:{port}",
                                           "--printer", f"tcp:127.0.0.1:{printer.port}",
                                           "--content", "{digest}"])
    assert result.exit_code == 1 and "cannot listen" in result.output


def test_cli_proxybench_reports_figures_for_intact_jobs() -> None:
    from click.testing import CliRunner
    from hexiao.tools.tap import main

    result = CliRunner().invoke(main, ["proxybench", "--jobs", "10", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["jobs"] == 10 and {"added_p50_ms", "added_p99_ms"} <= set(figures)


# ---- a POS that prints to a serial port: the pty bridge ------------------------------------------

def test_serial_pos_through_a_pty_gets_its_qr_and_its_status_reply(printer: FakePrinter,
                                                                   tmp_path: Path) -> None:
    """POS software configured with a serial device (here the pty the tap creates, by its
    symlink) prints a receipt and asks for status: the printer gets the job with our QR, the
    POS gets the printer's status byte back through the same port."""
    link = tmp_path / "ttyPOS"
    with tap_serve(printer, "--listen", f"pty:{link}", "--idle-timeout", "0.3") as (proc,
                                                                                 started):
        assert proc.stdout is not None
        assert started["listening"].startswith("/dev/pts/") and link.is_symlink()
        fd = os.open(link, os.O_RDWR | os.O_NOCTTY)
        try:
            tty.setraw(fd)
            os.write(fd, DLE_EOT_1)
            ready, _, _ = select.select([fd], [], [], LONG)
            status = os.read(fd, 1) if ready else b""
            os.write(fd, receipt_bytes())
            done = json.loads(proc.stdout.readline())  # the job ended at the idle gap
        finally:
            os.close(fd)
        job, = printer.wait_jobs(1)
        proc.terminate()
        proc.communicate(timeout=LONG)
    assert status == bytes((STATUS[1],))
    assert done["injected"] == 1 and decoded_qr(job) == [done["receipts"][0]["content"]]
    assert remove_blocks(job, [tuple(i) for i in done["injections"]]) == (
        DLE_EOT_1 + receipt_bytes())
    assert not link.exists()  # the symlink goes with the tap


def test_cli_serve_refuses_a_serial_pos_port_it_cannot_open(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from hexiao.tools.tap import main

    r = CliRunner().invoke(main, ["serve", "--listen", f"serial:{tmp_path}/ttyNONE",
                                  "--printer", "tcp:127.0.0.1:9", "--content", "{digest}"])
    assert r.exit_code == 1 and f"cannot open serial:{tmp_path}/ttyNONE" in r.output
