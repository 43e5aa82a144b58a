"""`hexiao bench-hostd`: what hostd itself adds to a redemption, and how many it does per second.

1. Added latency: redeem.Engine.redeem against the WeChat simulator (its own process, loopback
   HTTP, the real httpx client) with the SQLite journal in WAL/synchronous=FULL. A transport
   wrapper times every HTTP exchange (request out, whole reply read); wall time minus that is
   hostd's own time, journal fsyncs included. The journal on disk and on tmpfs are timed
   interleaved (one redemption each, in turn), and one journal commit alone on each.
2. Throughput: the real Daemon with N devices, each a CPython linkpeer process (the firmware's
   link code) on its own pty, every lane redeeming its own distinct codes at once. The simulator
   runs in a separate process so its work does not share hostd's GIL, as a real backend would
   not. Exactly-once: every code's committed consume count, from the simulator's state.
3. End to end: scans through the real link on one lane, as the device sees them.

Benchmarks are not tests: nothing here fails on a slow number. DESIGN target: own time p99 <= 5 ms.
"""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import httpx
from hexiao.hostd import journal as jr
from hexiao.hostd.backends.sim.seed import EXAMPLE, read
from hexiao.hostd.backends.wechat_card import WeChatCardClient
from hexiao.hostd.config import from_dict
from hexiao.hostd.daemon import Daemon
from hexiao.hostd.keystore import Keystore
from hexiao.hostd.redeem import Engine, LaneConfig, Verdict
from hexiao.tools.bench.stats import fs_type, summary
from hexiao.tools.sim.relay import set_raw

TARGET_P99_MS = 5.0
CARD = "pHexiaoSimCash100minus20xxxx"
WARMUP = 10  # per engine: token fetch, card/get cache, SQLite page cache
LONG = 300.0  # a guard against hangs, not a performance claim





class TimedTransport(httpx.BaseTransport):
    """Times each exchange, reply body included, so it can be subtracted. One per client."""

    def __init__(self) -> None:
        self._inner = httpx.HTTPTransport()
        self.spent = 0.0
        self.calls = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        t = time.perf_counter()
        reply = self._inner.handle_request(request)
        reply.read()  # the client reads it again from memory
        self.spent += time.perf_counter() - t
        self.calls += 1
        return reply

    def close(self) -> None:
        self._inner.close()


# -- the simulator, in its own process ---------------------------------------------------------

def seed(codes: list[str]) -> dict[str, Any]:
    base = read(EXAMPLE)
    return {"apps": base["apps"][:1], "behaviour": base["behaviour"],
            "cards": [c for c in base["cards"] if c["card_id"] == CARD],
            "codes": [{"code": c, "card_id": CARD} for c in codes]}


class SimProcess:
    def __init__(self, codes: list[str], workdir: Path) -> None:
        path = workdir / "seed.json"
        path.write_text(json.dumps(seed(codes)))
        self.app = read(EXAMPLE)["apps"][0]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from hexiao.tools.sim.cli import main; main()", "wechat",
             "--port", "0", "--seed", str(path), "--quiet"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout is not None
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http://"):
            self.stop()
            raise click.ClickException("the WeChat simulator did not start")

    def client(self, transport: httpx.BaseTransport | None = None) -> WeChatCardClient:
        return WeChatCardClient(self.url, self.app["appid"], self.app["secret"],
                                transport=transport)

    def consumes(self) -> dict[str, int]:
        codes = httpx.get(f"{self.url}/_sim/state", timeout=30).json()["codes"]
        return {c: v["consume_count"] for c, v in codes.items()}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def codes_for(prefix: int, n: int) -> list[str]:
    return [f"{prefix:03d}{i:09d}" for i in range(n)]


# -- 1. added latency ----------------------------------------------------------------------------

def latency(sim: SimProcess, codes: dict[str, list[str]], dirs: dict[str, Path]) -> dict[str, Any]:
    """Interleaved: one redemption on each journal in turn, so drift hits both alike."""
    engines: dict[str, tuple[Engine, TimedTransport]] = {}
    for name, d in dirs.items():
        t = TimedTransport()
        engines[name] = (Engine(jr.Journal(d / "journal.sqlite3"), sim.client(t),
                                LaneConfig(lane=f"bench-{name}")), t)
    own: dict[str, list[float]] = {n: [] for n in dirs}
    http: dict[str, list[float]] = {n: [] for n in dirs}
    accepted = dict.fromkeys(dirs, 0)
    commits = 0
    try:
        for i in range(len(next(iter(codes.values())))):
            for name, (engine, t) in engines.items():
                spent, calls = t.spent, t.calls
                start = time.perf_counter()
                v = engine.redeem(codes[name][i], time.time())
                wall = time.perf_counter() - start
                accepted[name] += v.outcome == "accepted"  # warm-up ones too: they consume
                if i < WARMUP:
                    continue
                own[name].append(wall - (t.spent - spent))
                http[name].append((t.spent - spent) / max(1, t.calls - calls))
                if v.entry_id is not None and not commits:
                    commits = len(engine.journal.steps(v.entry_id))
        out: dict[str, Any] = {"journal_commits_per_redemption": commits}
        for name, d in dirs.items():
            out[name] = {"fs": fs_type(d), "own": summary(own[name]),
                         "http_per_call": summary(http[name]), "accepted": accepted[name]}
        return out
    finally:
        for engine, _ in engines.values():
            engine.journal.close()
            engine.client.close()


def commit_cost(d: Path, n: int) -> dict[str, float]:
    """One journal commit (a step record) alone: SQLite's WAL write and fsync."""
    with jr.Journal(d / "commit.sqlite3") as journal:
        eid = journal.begin("bench-commit", "bench", time.time()).id
        xs = []
        for _ in range(n):
            t = time.perf_counter()
            journal.note(eid, "bench", time.time())
            xs.append(time.perf_counter() - t)
    return summary(xs)


# -- 2./3. the real daemon with device processes -----------------------------------------------

class BenchDaemon(Daemon):
    """The Daemon, recording when each verdict was handed to its lane and how long it took."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.done: list[tuple[float, float, str]] = []  # (verdict at, seconds since scan, outcome)
        self.cond = threading.Condition()

    def _verdict_done(self, device: str, v: Verdict, seconds: float) -> None:
        with self.cond:
            self.done.append((time.monotonic(), seconds, v.outcome))
            self.cond.notify_all()


class Device:
    """A CPython linkpeer on the master end of a raw pty; hostd opens the slave's path."""

    def __init__(self, kid: str, key: bytes, codes: list[str], workdir: Path) -> None:
        cfg, codes_file = workdir / f"{kid}.json", workdir / f"{kid}.codes"
        cfg.write_text(json.dumps({"id": kid, "key": key.hex()}))
        codes_file.write_text("".join(c + "\n" for c in codes))
        master, self._slave = pty.openpty()
        set_raw(self._slave)  # the slave stays open here too: its settings hold, no EIO
        self.port = os.ttyname(self._slave)
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hexiao.firmware.linkpeer", f"cfg={cfg}",
             f"codes={codes_file}"], stdin=master, stdout=master, stderr=subprocess.PIPE)
        os.close(master)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                self.events.append((time.monotonic(), json.loads(line)))
            except ValueError:
                continue

    def stop(self) -> None:
        os.close(self._slave)
        self.proc.terminate()
        self.proc.wait(10)


@contextmanager
def daemon(sim: SimProcess, work: Path, codes: list[list[str]]) -> Iterator[
        tuple[BenchDaemon, list[Device]]]:
    secret = work / "wechat.secret"
    secret.write_text(sim.app["secret"])
    secret.chmod(0o600)
    state = work / "state"
    state.mkdir(mode=0o700)
    keystore = Keystore(state / "keystore.jsonl", create=True)
    devices: list[Device] = []
    bd: BenchDaemon | None = None
    try:
        for i, mine in enumerate(codes):
            key = os.urandom(32)
            keystore.add(f"hx-{i + 1:04d}".encode(), key)
            devices.append(Device(f"hx-{i + 1:04d}", key, mine, work))
        cfg = from_dict({
            "hostd": {"state_dir": str(state), "control_socket": str(work / "hostd.sock")},
            "backend": {"kind": "wechat_card", "base_url": sim.url, "appid": sim.app["appid"],
                        "secret_file": str(secret)},
            "lane": [{"name": f"lane-{i + 1}"} for i in range(len(codes))],
            "device": [{"id": f"hx-{i + 1:04d}", "port": d.port, "lane": f"lane-{i + 1}"}
                       for i, d in enumerate(devices)]})
        bd = BenchDaemon(cfg)
        bd.start()
        total = sum(len(c) for c in codes)
        with bd.cond:
            if not bd.cond.wait_for(lambda: len(bd.done) >= total, LONG):
                raise click.ClickException(f"only {len(bd.done)} of {total} verdicts arrived")
        yield bd, devices
    finally:
        if bd is not None:
            bd.stop()
        for d in devices:
            d.stop()


def throughput(sim: SimProcess, work: Path, lanes: list[list[str]]) -> dict[str, Any]:
    # this process is hostd alone (devices and the simulator are processes of their own), so
    # its CPU time per redemption says what hostd costs, whatever the machine's other load
    cpu0 = time.process_time()
    with daemon(sim, work, lanes) as (bd, _):
        done = list(bd.done)
    cpu_ms = (time.process_time() - cpu0) * 1000 / max(1, len(done))
    first = min(at - s for at, s, _ in done)
    span = max(at for at, _, _ in done) - first
    return {"lanes": len(lanes), "redemptions": len(done),
            "accepted": sum(o == "accepted" for _, _, o in done),
            "seconds": round(span, 3), "per_s": round(len(done) / span, 1),
            "scan_to_verdict": summary([s for _, s, _ in done]),
            "hostd_cpu_ms_per_redemption": round(cpu_ms, 3),
            "hostd_capacity_per_core_s": round(1000 / cpu_ms, 1) if cpu_ms else None}


def end_to_end(sim: SimProcess, work: Path, codes: list[str]) -> dict[str, Any]:
    """One lane; per scan, from the device's later of (its scan acked, previous verdict) to its
    verdict: hostd's redemption plus the verdict's way back over the link, as the device sees."""
    with daemon(sim, work, [codes]) as (_, (dev,)):
        end = time.monotonic() + 10
        while sum(e["ev"] == "verdict" for _, e in dev.events) < len(codes) and \
                time.monotonic() < end:
            time.sleep(0.02)
        events = list(dev.events)
    acked = {e["scan_id"]: at for at, e in events if e["ev"] == "acked" and e["type"] == "scan"}
    xs, prev = [], 0.0
    for at, e in events:
        if e["ev"] == "verdict" and e["scan_id"] in acked:
            if e["scan_id"] > 1:  # the first one fetches the lane's token and card
                xs.append(at - max(acked[e["scan_id"]], prev))
            prev = at
    return {"scans": len(codes), **summary(xs)} if xs else {"scans": len(codes), "n": 0}


# -- the run and its report ----------------------------------------------------------------------

def run(lanes: int = 50, redemptions: int = 2000, per_lane: int = 20, e2e_scans: int = 10,
        disk: Path | None = None) -> dict[str, Any]:
    """Everything, in one run; the dict --json prints."""
    disk = disk or Path(tempfile.gettempdir())
    lat_n = redemptions + WARMUP
    lane_codes = [codes_for(300 + i, per_lane) for i in range(lanes)]
    all_codes = (codes_for(100, lat_n) + codes_for(200, lat_n) + codes_for(299, e2e_scans)
                 + [c for cs in lane_codes for c in cs])
    with tempfile.TemporaryDirectory(dir=disk) as on_disk, \
            tempfile.TemporaryDirectory(dir="/dev/shm") as on_tmpfs, \
            tempfile.TemporaryDirectory() as work:
        sim = SimProcess(all_codes, Path(work))
        try:
            lat = latency(sim, {"disk": codes_for(100, lat_n), "tmpfs": codes_for(200, lat_n)},
                          {"disk": Path(on_disk), "tmpfs": Path(on_tmpfs)})
            commit = {"disk": commit_cost(Path(on_disk), max(50, redemptions // 4)),
                      "tmpfs": commit_cost(Path(on_tmpfs), max(50, redemptions // 4))}
            (Path(work) / "e2e").mkdir()
            e2e = end_to_end(sim, Path(work) / "e2e", codes_for(299, e2e_scans))
            (Path(work) / "load").mkdir()
            load = throughput(sim, Path(work) / "load", lane_codes)
            consumes = sim.consumes()
        finally:
            sim.stop()
    p99 = lat["disk"]["own"]["p99_ms"]
    return {
        "target_p99_ms": TARGET_P99_MS, "target_met": p99 <= TARGET_P99_MS,
        "latency": lat, "journal_commit": commit, "end_to_end": e2e, "throughput": load,
        "exactly_once": {"codes": len(all_codes),
                         "double_consumes": sum(n > 1 for n in consumes.values()),
                         "consumed": sum(n == 1 for n in consumes.values()),
                         "expected_consumed": sum(r["accepted"] for r in
                                                  (lat["disk"], lat["tmpfs"], load))
                         + e2e["scans"]},
        "python": sys.version.split()[0], "cpus": os.cpu_count(),
    }


def render(r: dict[str, Any]) -> str:
    lat, load, once = r["latency"], r["throughput"], r["exactly_once"]

    def row(name: str, s: dict[str, Any]) -> str:
        if not s.get("n"):
            return f"  {name:<34} (no samples)"
        return (f"  {name:<34} p50 {s['p50_ms']:>7.3f}  p99 {s['p99_ms']:>7.3f}  "
                f"max {s['max_ms']:>7.3f} ms  (n={s['n']})")

    lines = [f"hostd benchmark (Python {r['python']}, {r['cpus']} CPUs)", "",
             "Added latency per redemption (wall time minus HTTP time; "
             f"{lat['journal_commits_per_redemption']} journal commits each)"]
    for name in ("disk", "tmpfs"):
        lines.append(row(f"own time, journal on {name} ({lat[name]['fs']})", lat[name]["own"]))
    lines.append(row("HTTP exchange (subtracted), each", lat["disk"]["http_per_call"]))
    lines += ["", "Journal commit alone (WAL, synchronous=FULL)"]
    lines += [row(f"on {n}", r["journal_commit"][n]) for n in ("disk", "tmpfs")]
    e2e = r["end_to_end"]
    lines += ["", f"End to end through the link (1 lane, CPython linkpeer on a pty, "
                  f"{e2e['scans']} scans, first left out)",
              row("scan acked -> verdict at device", e2e)]
    lines += ["", f"Throughput: Daemon with {load['lanes']} devices (CPython linkpeer processes "
                  "on ptys), simulator in its own process",
              f"  {load['redemptions']} redemptions in {load['seconds']} s = "
              f"{load['per_s']} redemptions/s ({load['accepted']} accepted)",
              row("scan received -> verdict (hostd)", load["scan_to_verdict"]),
              f"  hostd CPU per redemption {load['hostd_cpu_ms_per_redemption']} ms (start and "
              f"stop included): one core would carry ~{load['hostd_capacity_per_core_s']}/s; "
              "the rest of the wall time is the devices and the simulator sharing the CPUs"]
    lines += ["", f"Exactly once: {once['double_consumes']} double consumes; "
                  f"{once['consumed']} codes consumed, {once['expected_consumed']} accepted",
              "", f"Target: own time p99 <= {r['target_p99_ms']:g} ms (journal on disk): "
                  f"{lat['disk']['own']['p99_ms']:.3f} ms -> "
                  + ("MET" if r["target_met"] else "MISSED")]
    return "\n".join(lines)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--lanes", type=click.IntRange(1, 200), default=50, show_default=True,
              help="Devices (each its own lane) on one hostd for the throughput run.")
@click.option("--redemptions", type=click.IntRange(10), default=2000, show_default=True,
              help="Redemptions timed for the added latency, on each journal.")
@click.option("--per-lane", type=click.IntRange(1), default=20, show_default=True,
              help="Distinct codes each lane redeems in the throughput run.")
@click.option("--dir", "disk", type=click.Path(file_okay=False, exists=True, path_type=Path),
              default=None, help="Where the on-disk journal goes (default: the temp folder).")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def main(lanes: int, redemptions: int, per_lane: int, disk: Path | None, as_json: bool) -> None:
    """Measure hostd's own latency per redemption and its throughput with many lanes."""
    r = run(lanes, redemptions, per_lane, disk=disk)
    click.echo(json.dumps(r, indent=2) if as_json else render(r))


if __name__ == "__main__":
    main()
