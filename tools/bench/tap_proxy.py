"""What the receipt tap proxy adds to a print job, measured on loopback (a benchmark, not a test).

Rules this module keeps:
- Real sockets on 127.0.0.1 only: a POS client, the tap as hostd runs it (TapService, in its own
  process, as deployed: in one process its threads and the harness's would queue on the GIL's
  5 ms switch interval), and a sink printer that records when each job's cut arrives. The same
  jobs are timed straight to the sink and through the tap; the added latency is the difference
  of the p50s and p99s.
- A job is timed from the POS connecting to the printer receiving the receipt's cut: the moment
  paper comes out. The figure includes the proxy's extra connection to the printer, the parse,
  the QR block and (with a key) the signed token.
- Each figure only counts if the printer got the receipt intact with its QR block (checked).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from hexiao.hostd.config.types import Tap
from hexiao.hostd.tap.inject import remove_blocks
from hexiao.hostd.tap.proxy import ConnRecord
from hexiao.hostd.tap.service import TapService

CUT = b"\x1dV\x00"
URL = "https://hexiao.example/r/{token}"
KEY = b"bench-key-not-secret-32-bytes..."


def typical_receipt(lines: int = 30, logo_rows: int = 0) -> bytes:
    """A Chinese supermarket receipt in GB18030, optionally under a raster logo, ending in a cut."""
    parts = [b"\x1b@\x1ba\x01"]
    if logo_rows:
        parts.append(b"\x1dv0\x00" + (72).to_bytes(2, "little") + logo_rows.to_bytes(2, "little")
                     + bytes(range(256)) * (72 * logo_rows // 256)
                     + b"\xaa" * (72 * logo_rows % 256))
    parts.append("好又多超市 (天河店)\n".encode("gb18030") + b"\x1ba\x00")
    for i in range(lines):
        parts.append(f"{i + 1:02d} 可口可乐 330ml x{i % 3 + 1}      ¥{i * 1.5 + 3:.2f}\n"
                     .encode("gb18030"))
    parts.append("合计: ¥128.50\n实收: ¥150.00\n".encode("gb18030"))
    parts.append(b"\x1bd\x05" + CUT)
    return b"".join(parts)


class _Sink:
    """A printer that notes when a job's cut arrives (the job ends with it)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.done: list[tuple[float, bytes]] = []
        self.cond = threading.Condition()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf, cut_at = bytearray(), 0.0
        with conn:
            while data := conn.recv(65536):
                buf += data
                if not cut_at and buf.endswith(CUT):
                    cut_at = time.perf_counter()
        with self.cond:
            self.done.append((cut_at, bytes(buf)))
            self.cond.notify_all()

    def wait(self, n: int) -> tuple[float, bytes]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.done) >= n, 30):
                raise TimeoutError("the sink printer got no job in 30 s")
            return self.done[n - 1]

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _run(port: int, sink: _Sink, receipt: bytes, jobs: int,
         check: Callable[[int, bytes], None]) -> list[float]:
    times, start = [], len(sink.done)
    for i in range(start, start + jobs):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as pos:
            pos.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pos.sendall(receipt)
        cut_at, got = sink.wait(i + 1)
        check(i, got)
        times.append((cut_at - t0) * 1e3)
    return times


def _proxy_child(printer_port: int, profile: str) -> None:
    """The tap in its own process, as deployed (hostd's TapService): its threads never share a
    GIL with the harness. Prints its port, then one JSON line per finished connection; exits on
    stdin EOF."""
    def report(rec: ConnRecord) -> None:
        print(json.dumps({"injections": rec.injections, "end": rec.end}), flush=True)

    cfg = Tap(enabled=True, listen="127.0.0.1:0", printer=f"tcp:127.0.0.1:{printer_port}",
              profile=profile, content=URL, idle_timeout_s=5.0)
    tap = TapService(cfg, on_finish=report, key=KEY, keep=1).start()
    print(json.dumps({"port": tap.address[1]}), flush=True)
    sys.stdin.read()
    os._exit(0)


def proxy_latency(jobs: int = 200, profile: str = "generic-80",
                  receipt: bytes | None = None) -> dict[str, object]:
    """Time `jobs` receipts POS -> printer directly and through the proxy; milliseconds."""
    receipt = receipt or typical_receipt()
    direct_sink, proxied_sink = _Sink(), _Sink()
    child = subprocess.Popen(
        [sys.executable, "-c", "from hexiao.tools.bench.tap_proxy import _proxy_child; "
         f"_proxy_child({proxied_sink.port}, {profile!r})"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    out = child.stdout
    try:
        port = json.loads(out.readline())["port"]

        def same(i: int, got: bytes) -> None:
            if got != receipt:
                raise AssertionError(f"direct job {i} arrived changed")

        def injected(i: int, got: bytes) -> None:
            rec = json.loads(out.readline())
            blocks = [(off, n) for off, n in rec["injections"]]
            if remove_blocks(got, blocks) != receipt or len(blocks) != 1:
                raise AssertionError(f"proxied job {i} is not the receipt plus one QR block")

        _run(direct_sink.port, direct_sink, receipt, 5, same)  # warm the paths and imports
        _run(port, proxied_sink, receipt, 5, injected)
        direct = _run(direct_sink.port, direct_sink, receipt, jobs, same)
        proxied = _run(port, proxied_sink, receipt, jobs, injected)
    finally:
        child.stdin.close()
        child.wait(30)
        direct_sink.close()
        proxied_sink.close()
    return {
        "jobs": jobs, "receipt_bytes": len(receipt), "profile": profile,
        "direct_p50_ms": round(statistics.median(direct), 3),
        "direct_p99_ms": round(_pct(direct, 0.99), 3),
        "proxied_p50_ms": round(statistics.median(proxied), 3),
        "proxied_p99_ms": round(_pct(proxied, 0.99), 3),
        "added_p50_ms": round(statistics.median(proxied) - statistics.median(direct), 3),
        "added_p99_ms": round(_pct(proxied, 0.99) - _pct(direct, 0.99), 3),
    }
