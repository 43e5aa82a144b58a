"""Issue 17, hostd's link: a lane cannot be taken down by a replayed hello, a port serves only
its configured device, and every configured device needs its key.

The protocol rules are checked sans-I/O in simulated time (protocol/link_host.py); the attacks
themselves for real: hostd (Daemon) with the MicroPython device peer on a pty cable whose relay
injects the replayed frames (tools/sim/relay.py). Every wait is bounded; nothing asserts a
duration."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from hexiao.hostd.backends.sim.seed import EXAMPLE, read
from hexiao.hostd.backends.sim.server import WeChatSim
from hexiao.hostd.daemon import Daemon
from hexiao.hostd.keystore import Keystore
from hexiao.hostd.main import main as hostd_main
from hexiao.protocol import link_host
from hexiao.protocol.link import (
    DEVICE,
    EV_CLOSED,
    EV_EXPIRED,
    EV_MESSAGE,
    EV_OPEN,
    EV_REJECTED,
    HOST,
    Link,
)
from hexiao.tools import micropython
from hexiao.tools.sim import relay
from sim_config import sim_config

KID = b"lane-01"
DKEY = bytes(range(100, 132))
HELLO_INFO = {"firmware": "1.2.3", "board": "sim"}
LONG = 60.0  # a guard against hangs, never a performance claim


# -- sans-I/O: a device and a host in simulated time ---------------------------------------------


def device(seed: int) -> Link:
    return Link(DEVICE, random_bytes(seed), device_id=KID, device_key=DKEY, hello=HELLO_INFO)


def random_bytes(seed: int) -> Callable[[int], bytes]:
    return random.Random(seed).randbytes


class Pair:
    """A device and a host joined without loss; `now` moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = 0
        self.host = Link(HOST, random_bytes(2), keystore={KID: DKEY}.get)
        self.dev = device(1)
        self.ev: dict[str, list[Any]] = {DEVICE: [], HOST: []}

    def pump(self) -> None:
        for _ in range(1000):
            a, b = self.dev.data_to_send(), self.host.data_to_send()
            if not a and not b:
                return
            if a:
                self.ev[HOST] += self.host.receive(a, self.now)
            if b:
                self.ev[DEVICE] += self.dev.receive(b, self.now)
        raise AssertionError("the link never went quiet")

    def boot(self, seed: int) -> bytes:
        """A device (re)boots and opens a session; returns its hello's wire bytes."""
        self.dev = device(seed)
        self.ev[DEVICE] = self.dev.connect(self.now)
        hello = self.dev.data_to_send()
        self.ev[HOST] += self.host.receive(hello, self.now)
        self.pump()
        assert self.dev.is_open() and self.host.is_open()
        return hello

    def attack(self, wire: bytes) -> list[Any]:
        """Bytes from the attacker into the host; what the host answers reaches the device."""
        ev = self.host.receive(wire, self.now)
        self.ev[HOST] += ev
        self.pump()
        return ev

    def exchange(self, i: int) -> None:
        """A scan and its verdict cross the session."""
        assert self.dev.send({"type": "scan", "scan_id": i, "symbology": "]Q1",
                              "data": b"code-%d" % i, "time_ms": i}, self.now)
        self.pump()
        assert self.host.send({"type": "verdict", "scan_id": i, "outcome": 0, "beep": 1,
                               "led": 1, "text": "ok"}, self.now)
        self.pump()
        got = [e[1]["type"] for role in (HOST, DEVICE) for e in self.ev[role][-2:]
               if e[0] == EV_MESSAGE and e[1].get("scan_id") == i]
        assert got == ["scan", "verdict"], self.ev

    def kinds(self, role: str) -> list[str]:
        return [e[0] for e in self.ev[role]]


def stranger_hello(seed: int) -> bytes:
    """A genuine hello this host never saw: one recorded before hostd restarted, or from a copy
    of the device's firmware and key."""
    d = device(seed)
    d.connect(0)
    return d.data_to_send()


def test_a_replayed_hello_of_an_ended_session_is_refused_and_the_session_stays() -> None:
    p = Pair()
    old = p.boot(1)
    p.boot(7)  # the device restarts: session 2 replaces session 1 after one round trip
    assert p.kinds(HOST) == [EV_OPEN, EV_CLOSED, EV_OPEN] and p.ev[HOST][1][1] == "new_hello"
    nonce = p.host.nonce
    for i in range(10):  # one replay every 2 s for 20 s
        p.now += 2000
        assert [e[:2] for e in p.attack(old)] == [(EV_REJECTED, "replay")]
        assert p.host.data_to_send() == b""  # never answered
        p.exchange(i)
    assert p.host.is_open() and p.host.nonce == nonce and p.dev.is_open()
    assert p.host.counters["hello_replay"] == 10 and p.host.counters["sessions"] == 2
    assert EV_CLOSED not in p.kinds(DEVICE)


def test_an_unknown_hello_waits_beside_the_session_and_never_replaces_it() -> None:
    p = Pair()
    p.boot(1)
    hello = stranger_hello(40)
    for i in range(10):  # every 2 s for 20 s
        p.attack(hello)
        p.exchange(i)
        p.now += 2000
    # answered (a welcome the real device refuses as stale), never the session's end
    assert p.kinds(HOST).count(EV_OPEN) == 1 and EV_CLOSED not in p.kinds(HOST)
    assert p.dev.counters["handshake"] >= 3 and p.dev.is_open()
    # it waited 4 * hello_max = 8 s at a time, unconfirmed: counted at 8 and 16 s
    assert p.host.counters["hello_replay"] == 2
    assert len(p.host._cands) == 1


def test_a_device_that_really_restarts_is_back_in_one_round_trip() -> None:
    p = Pair()
    p.boot(1)
    p.host.send({"type": "verdict", "scan_id": 1, "outcome": 0, "beep": 1, "led": 1,
                 "text": "lost"}, p.now)
    p.host.data_to_send()  # lost: the device restarts now
    p.boot(2)  # no time passes: no timer is waited for
    assert p.kinds(HOST) == [EV_OPEN, EV_EXPIRED, EV_CLOSED, EV_OPEN]
    assert p.ev[HOST][2] == (EV_CLOSED, "new_hello")
    p.exchange(5)
    assert p.host.counters.get("hello_replay", 0) == 0


def test_a_restart_among_replays_still_wins_and_waiting_hellos_are_bounded() -> None:
    p = Pair()
    p.boot(1)
    for s in range(50, 56):  # more hellos than may wait: the oldest make way, counted
        p.attack(stranger_hello(s))
    assert len(p.host._cands) == link_host.CANDS_MAX
    assert p.host.counters["hello_replay"] == 6 - link_host.CANDS_MAX
    p.boot(3)  # the real device restarts while they wait
    p.exchange(1)
    assert p.kinds(HOST).count(EV_CLOSED) == 1 and p.host.counters["sessions"] == 2


def test_a_replay_during_a_handshake_does_not_take_it_over() -> None:
    p = Pair()
    p.ev[DEVICE] = p.dev.connect(0)
    hello = p.dev.data_to_send()
    p.host.receive(hello, 0)
    welcome = p.host.data_to_send()
    p.host.receive(stranger_hello(60), 0)  # the attacker's hello lands before the device's ack
    p.host.data_to_send()
    p.ev[DEVICE] += p.dev.receive(welcome, 0)
    p.pump()
    assert p.host.is_open() and p.host.nonce == p.dev.nonce
    p.exchange(1)


def test_the_nonce_memory_is_bounded() -> None:
    p = Pair()
    for s in range(link_host.USED_MAX + 10):
        p.boot(100 + s)
    assert len(p.host._used_nonces) == link_host.USED_MAX


# -- hostd for real ----------------------------------------------------------------------------

CASH = "287463512093"
LANE_KID = "lane-1"


@pytest.fixture
def sim() -> Iterator[WeChatSim]:
    with WeChatSim(read(EXAMPLE)) as s:
        yield s


def hostd_config(tmp_path: Path, sim: WeChatSim, devices: list[dict[str, Any]]) -> Any:
    return sim_config(tmp_path, sim, lane=[{"name": "lane-1"}, {"name": "lane-2"},
                                           {"name": "lane-3"}], device=devices)


def device_peer(tmp_path: Path, mpy_stage: Path, cable: relay.Cable, kid: str, key: bytes,
                codes: list[str]) -> relay.DeviceProcess:
    cfg = tmp_path / f"{kid}.json"
    cfg.write_text(json.dumps({"id": kid, "key": key.hex()}))
    codes_file = tmp_path / f"{kid}.codes"
    codes_file.write_text("".join(c + "\n" for c in codes))
    argv, env = micropython.command("hexiao.firmware.linkpeer", mpy_stage, heap=micropython.HEAP,
                                    args=[f"cfg={cfg}", f"codes={codes_file}"])
    return relay.DeviceProcess(cable, argv, env, str(mpy_stage))


def keystore(tmp_path: Path, keys: dict[str, bytes]) -> None:
    (tmp_path / "state").mkdir(mode=0o700, exist_ok=True)
    ks = Keystore(tmp_path / "state" / "keystore.jsonl", create=True)
    for kid, key in keys.items():
        ks.add(kid.encode(), key)


def wait(pred: Any, what: str) -> Any:
    end = time.monotonic() + LONG
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def is_hello(wire: bytes) -> bool:
    seen = relay.peek(wire)
    return seen.counter == 0 and seen.message["type"] == "hello"


def test_a_lane_stays_up_while_an_old_hello_is_replayed_every_2_s(
        mpy_stage: Path, tmp_path: Path, sim: WeChatSim) -> None:
    """The attack of issue 17: a hello of an ended session, replayed every 2 s for 20 s while
    the cashier scans. Before: each replay ended the session (~12 s without verdicts)."""
    key = os.urandom(32)
    keystore(tmp_path, {LANE_KID: key})
    # a slow backend spreads the scans over the attack
    httpx.post(f"{sim.url}/_sim/faults", json={"latency_ms": 450}).raise_for_status()
    codes = [CASH] + [f"9999999999{i:02d}" for i in range(40)]
    replays = 10
    with relay.Cable() as cable:
        cable.start()
        dev = device_peer(tmp_path, mpy_stage, cable, LANE_KID, key, codes)
        daemon = Daemon(hostd_config(tmp_path, sim, [{"id": LANE_KID,
                                                       "port": cable.host_port}]))
        try:
            daemon.start()
            dev.wait_for(lambda ev: [e for e in ev if e["ev"] == "open"], LONG)
            old = cable.frames(relay.D2H)
            old_hello = next(w for w in old if is_hello(w))
            # a second session, so that the first one's hello is old: hostd's poke (the nack
            # it sent when it opened the port), replayed, makes the device say hello again
            cable.replay(relay.H2D, lambda w: relay.peek(w).message.get("code") == 13)
            dev.wait_for(lambda ev: len([e for e in ev if e["ev"] == "open"]) == 2, LONG)
            lane = daemon.lanes[LANE_KID]
            wait(lambda: lane.info()["stats"].get("sessions") == 2, "hostd's second session")
            during = []
            for _ in range(replays):
                cable.inject(relay.D2H, old_hello, kind="replay")
                time.sleep(2.0)
                during.append(len(dev.of("verdict")))
            dev.wait_for(lambda ev: len({e["scan_id"] for e in ev if e["ev"] == "verdict"})
                         == len(codes), LONG)
            info = daemon.device_info(LANE_KID)
            health = daemon.handlers.device_health(LANE_KID)  # `hexiao device health`
            daemon.sample_metrics()
            metrics = daemon.metrics.render().decode()
        finally:
            daemon.stop()
            cable.close()
            dev.stop()
    verdicts = dev.of("verdict")
    # every scan has its verdict; the one the setup's new session cut off was sent again (the
    # peer gives it a new time_ms: a rescan, "redeemed here"), never consumed twice
    ids = [v["scan_id"] for v in verdicts]
    assert sorted(set(ids)) == list(range(1, len(codes) + 1))
    assert len(ids) - len(set(ids)) <= 1
    assert sim.state.consumes[CASH] == 1
    # the scans went on during the attack, and the session it replayed into never ended
    assert during[0] < len(verdicts)  # (a slower machine only makes the overlap longer)
    assert not [e for e in dev.events if e["ev"] == "closed"][1:]  # only the setup's one
    assert [e["ev"] for e in dev.events].count("open") == 2
    assert info["state"] == "open" and info["stats"]["sessions"] == 2
    assert info["counters"]["hello_replay"] == replays, info["counters"]
    assert info["counters"]["replay"] == replays, info
    assert health["hostd"]["hello_replay"] == replays and health["firmware"] == "linkpeer/0.1"
    assert f'hexiao_link_events_total{{device="{LANE_KID}",event="hello_replay"}} {replays}.0' \
        in metrics


def test_a_device_on_another_lanes_port_is_refused_and_both_ids_are_logged(
        mpy_stage: Path, tmp_path: Path, sim: WeChatSim,
        caplog: pytest.LogCaptureFixture) -> None:
    """lane-1's device (right id, right key) cabled to lane-3's port: no session, no scan
    journalled as lane-3's; counted and logged as a mis-cabling naming both."""
    keys = {"lane-1": os.urandom(32), "lane-3": os.urandom(32)}
    keystore(tmp_path, keys)
    with relay.Cable() as cable:
        cable.start()
        dev = device_peer(tmp_path, mpy_stage, cable, "lane-1", keys["lane-1"], [CASH])
        daemon = Daemon(hostd_config(tmp_path, sim, [
            {"id": "lane-1", "port": str(tmp_path / "lane-1-is-elsewhere"), "lane": "lane-1"},
            {"id": "lane-3", "port": cable.host_port, "lane": "lane-3"}]))
        try:
            with caplog.at_level(logging.WARNING, "hexiao.lane"):
                daemon.start()
                lane3 = daemon.lanes["lane-3"]
                wait(lambda: lane3.info()["counters"].get("foreign_device", 0) >= 3,
                     "lane-1's hellos on lane-3")
                info = daemon.device_info("lane-3")
        finally:
            daemon.stop()
            cable.close()
            dev.stop()
    assert not dev.of("open") and not dev.of("verdict")
    assert sim.state.consumes[CASH] == 0
    assert info["state"] == "connecting" and info["peer"] is None
    assert info["counters"]["foreign_device"] >= 3 and info["counters"]["kid"] >= 3
    assert info["stats"]["foreign_device"] >= 1  # as reported: the first frame at once
    assert "device lane-1" in info["error"] and "device lane-3's" in info["error"]
    assert "mis-cabled" in info["error"]
    lines = [r.getMessage() for r in caplog.records if "foreign" not in r.getMessage()
             and "lane-1, which has a key here" in r.getMessage()]
    assert len(lines) == 1  # once, then at most once a minute with the count
    assert "port " + str(info["port"]) in lines[0] and "lane-3" in lines[0]


def test_check_config_lists_every_device_without_a_key(tmp_path: Path) -> None:
    keystore(tmp_path, {"lane-1": os.urandom(32)})
    cfg = tmp_path / "hostd.toml"
    cfg.write_text(f'[hostd]\nstate_dir = "{tmp_path / "state"}"\n'
                   '[[lane]]\nname = "lane-1"\n[[lane]]\nname = "lane-2"\n'
                   '[[lane]]\nname = "lane-3"\n'
                   + "".join(f'[[device]]\nid = "lane-{i}"\nport = "/dev/ttyACM{i}"\n'
                             f'lane = "lane-{i}"\n' for i in (1, 2, 3)))
    no = CliRunner().invoke(hostd_main, ["--config", str(cfg), "--check-config"])
    assert no.exit_code == 2, no.output
    lines = no.output.strip().splitlines()
    assert len(lines) == 2 and "lane-1" not in no.output.replace("lane-1 ", "")
    for i, line in zip((2, 3), lines, strict=True):
        assert f"device lane-{i}: no key in the keystore" in line
        assert line.endswith(f"hexiao provision --port /dev/ttyACM{i} --id lane-{i} "
                             f"--lane lane-{i} --config {cfg}")
    keystore(tmp_path, {"lane-2": os.urandom(32), "lane-3": os.urandom(32)})
    ok = CliRunner().invoke(hostd_main, ["--config", str(cfg), "--check-config"])
    assert ok.exit_code == 0 and "ok (3 device(s)" in ok.output


def test_hostd_starts_the_other_lanes_and_shows_a_device_without_key(
        mpy_stage: Path, tmp_path: Path, sim: WeChatSim) -> None:
    """Decision: hostd starts, and serves the lanes that have keys; a device without one is
    "no key" with the command that provisions it, and once its key is there (provisioned while
    hostd runs) its next hello opens the session: no restart."""
    key, key2 = os.urandom(32), os.urandom(32)
    keystore(tmp_path, {LANE_KID: key})
    with relay.Cable() as cable, relay.Cable() as cable2:
        cable.start()
        cable2.start()
        dev = device_peer(tmp_path, mpy_stage, cable, LANE_KID, key, [CASH])
        dev2 = device_peer(tmp_path, mpy_stage, cable2, "lane-2", key2, ["999999999999"])
        daemon = Daemon(hostd_config(tmp_path, sim, [
            {"id": LANE_KID, "port": cable.host_port, "lane": "lane-1"},
            {"id": "lane-2", "port": cable2.host_port, "lane": "lane-2"}]))
        try:
            daemon.start()
            dev.wait_for(lambda ev: [e for e in ev if e["ev"] == "verdict"], LONG)
            lane2 = daemon.lanes["lane-2"]
            wait(lambda: lane2.state == "no key", "lane-2 without a key")
            status = daemon.handlers.status()
            info = daemon.device_info("lane-2")
            assert not dev2.of("open")
            Keystore(tmp_path / "state" / "keystore.jsonl").add(b"lane-2", key2)  # provisioned
            dev2.wait_for(lambda ev: [e for e in ev if e["ev"] == "verdict"], LONG)
            after = daemon.device_info("lane-2")
        finally:
            daemon.stop()
            cable.close()
            cable2.close()
            dev.stop()
            dev2.stop()
    assert status["devices"] == {LANE_KID: "open", "lane-2": "no key"}
    assert info["error"] == ("no key for device lane-2 in the keystore: hexiao provision "
                             f"--port {cable2.host_port} --id lane-2 --lane lane-2 --keystore "
                             f"{tmp_path / 'state' / 'keystore.jsonl'}")
    assert info["counters"].get("foreign_device", 0) == 0  # its own hellos, refused: no key yet
    assert after["state"] == "open"
    assert sim.state.consumes[CASH] == 1
