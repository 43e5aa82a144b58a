"""Remote diagnostics for real (issue 14 item 1): `hexiao fleet status|device ...` at
headquarters, through the machine's Mosquitto (MQTT 5 request/response), to a real hostd with a
real device (hexiao.firmware.linkpeer under MicroPython on a pty), logged in fleetd's PostgreSQL.

Forged, replayed, misdirected and store-signed requests are published raw on the broker, as an
attacker would; each must be refused, counted by reason, and reach no handler. Every wait is a
hang guard; nothing asserts a duration."""

from __future__ import annotations

import json
import os
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import psycopg
import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fleet_conftest import wait_until
from hexiao.fleetd import db
from hexiao.fleetd import remote as hq
from hexiao.hostd.config import load
from hexiao.hostd.daemon import Daemon
from hexiao.hostd.fleet import record, remote
from hexiao.hostd.keystore import Keystore
from hexiao.protocol import cbor
from hexiao.tools import fleet as fleet_cli
from hexiao.tools import micropython
from hexiao.tools.install import keys
from hexiao.tools.sim import relay
from hexiao.tools.support import ctl
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

MERCHANT = "m1"
KID = "lane-1"


@dataclass
class Store:
    name: str
    daemon: Daemon
    sock: Path
    hq_key: Path
    store_key: bytes
    dsn: str
    broker: str
    prefix: str

    @property
    def responder(self) -> remote.Responder:
        r: remote.Responder = self.daemon._remote
        return r

    def remote(self, *args: str) -> Any:
        return invoke(fleet_cli.main, *args, "--store", self.name, "--dsn", self.dsn,
                      "--broker", self.broker, "--key", str(self.hq_key), "--prefix",
                      self.prefix, "--operator", "ops-anna", "--timeout", "20")

    def local(self, *args: str) -> Any:
        group = {"status": ctl.status_main, "device": ctl.device_main}[args[0]]
        return invoke(group, *args[1:], "--socket", str(self.sock), "--timeout", "10")


def invoke(command: Any, *args: str) -> Any:
    r = CliRunner().invoke(command, list(args))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception  # a crash is a failure with its traceback, not an exit code
    return r


class Counting:
    """hostd's ControlHandlers with a count of the commands run (to see that none ran)."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls = inner, 0

    def __getattr__(self, name: str) -> Any:
        if name != "device_list":  # the lane lookup, not a command
            self.calls += 1
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def store(mpy_stage: Path, fleet_broker: str, fleet_dsn: str, fleet_prefix: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    tmp = tmp_path_factory.mktemp("remote")
    name = f"s{secrets.token_hex(3)}"
    hq_key = tmp / "hq.key"
    keys.generate(hq_key)
    store_key = os.urandom(32)
    kf = tmp / "store.key"
    kf.write_text(store_key.hex())
    kf.chmod(0o600)
    with psycopg.connect(fleet_dsn, autocommit=True) as conn:
        db.add_store(conn, MERCHANT, name, store_key)
    dev_key = os.urandom(32)
    cfg = tmp / "device.json"
    cfg.write_text(json.dumps({"id": KID, "key": dev_key.hex()}))
    cfg.chmod(0o600)
    state = tmp / "state"
    state.mkdir(mode=0o700)
    Keystore(state / "keystore.jsonl", create=True).add(KID.encode(), dev_key)
    argv, env = micropython.command("hexiao.firmware.linkpeer", mpy_stage,
                                    args=[f"cfg={cfg}", "scans=0"])
    cable = relay.Cable().start()
    device = relay.DeviceProcess(cable, argv, env, str(mpy_stage))
    sock = tmp / "run" / "hostd.sock"
    toml = tmp / "hostd.toml"
    toml.write_text(
        f'[hostd]\nstate_dir = "{state}"\ncontrol_socket = "{sock}"\nweb_listen = ""\n'
        f'[backend]\nkind = "sim"\n[[lane]]\nname = "{KID}"\n'
        f'[[device]]\nid = "{KID}"\nport = "{cable.host_port}"\nlane = "{KID}"\n'
        f'[fleet]\nenabled = true\nbroker = "{fleet_broker}"\nmerchant = "{MERCHANT}"\n'
        f'store = "{name}"\ntopic_prefix = "{fleet_prefix}"\nkey_file = "{kf}"\n'
        f'hq_pubkey_file = "{hq_key}.pub"\n')
    daemon = Daemon(load(toml)).start()
    try:
        wait_until("the device's link", lambda: daemon.device_info(KID)["state"] == "open", 60)
        wait_until("the responder's subscription", daemon._remote.subscribed.is_set)
        yield Store(name, daemon, sock, hq_key, store_key, fleet_dsn, fleet_broker, fleet_prefix)
    finally:
        daemon.stop()
        cable.close()
        device.stop()


def shape(text: str) -> list[str]:
    """A rendering with its numbers blanked: what must not differ between the two paths."""
    return [re.sub(r"\d+", "N", line) for line in text.splitlines()]


def requests_logged(s: Store) -> list[tuple[Any, ...]]:
    with psycopg.connect(s.dsn, autocommit=True) as conn:
        return conn.execute("SELECT operator, key_id, cmd, lane, outcome, detail FROM "
                            "remote_requests WHERE store = %s ORDER BY id", (s.name,)).fetchall()


def test_answers_are_the_local_commands_data_and_rendering(store: Store) -> None:
    before = len(requests_logged(store))
    for cmd in (("device", "health"), ("device", "logs"), ("device", "ping"), ("status",)):
        lane = ("--lane", KID) if cmd[0] == "device" else ()
        local_args = (*cmd, KID) if cmd[0] == "device" else cmd
        far, near = store.remote(*cmd, *lane, "--json"), store.local(*local_args, "--json")
        assert (far.exit_code, near.exit_code) == (0, 0), (far.output, near.output)
        a, b = json.loads(far.stdout), json.loads(near.stdout)
        assert sorted(a) == sorted(b), cmd
        if cmd == ("device", "health"):
            moving = ("uptime_ms", "heap_free", "link")  # the link counts these very frames
            assert {k: v for k, v in a.items() if k not in moving} == \
                {k: v for k, v in b.items() if k not in moving}
            assert sorted(a["link"]) == sorted(b["link"])
        if cmd == ("device", "logs"):
            assert a == b  # the scripted device's log, the same both ways
        if cmd == ("status",):
            assert (a["devices"], a["journal"], a["pid"]) == (b["devices"], b["journal"],
                                                              b["pid"])
        far, near = store.remote(*cmd, *lane), store.local(*local_args)
        assert shape(far.stdout) == shape(near.stdout), (far.stdout, near.stdout)
    rows = requests_logged(store)[before:]
    key_id = keys.fingerprint(keys.load_private_key(store.hq_key).public_key())
    assert [(r[0], r[1], r[4]) for r in rows] == [("ops-anna", key_id, "answered")] * 8
    assert [r[2] for r in rows][::2] == ["device.health", "device.logs", "device.ping", "status"]


def test_device_list_and_info_are_the_local_commands(store: Store) -> None:
    for cmd, lane, local in ((("device", "list"), (), ("device", "list")),
                             (("device", "info"), ("--lane", KID), ("device", "info", KID))):
        far, near = store.remote(*cmd, *lane, "--json"), store.local(*local, "--json")
        assert (far.exit_code, near.exit_code) == (0, 0), (far.output, near.output)
        a, b = json.loads(far.stdout), json.loads(near.stdout)
        rows = a if isinstance(a, list) else [a]
        assert [(r["id"], r["lane"], r["state"]) for r in rows] == [(KID, KID, "open")]
        # the same data; the link's counters count the frames of the asking itself
        assert shape(json.dumps(a, sort_keys=True)) == shape(json.dumps(b, sort_keys=True))
        far, near = store.remote(*cmd, *lane), store.local(*local)
        assert far.stdout.splitlines()[0] == near.stdout.splitlines()[0]
        assert shape(far.stdout) == shape(near.stdout), (far.stdout, near.stdout)


def captured(s: Store, *args: str) -> Any:
    """A remote capture, with a local ping through the lane while it records (so the capture
    holds frames both ways)."""
    import threading

    lane = s.daemon.lanes[KID]
    box: dict[str, Any] = {}

    def ask() -> None:
        try:
            box["r"] = s.remote("device", "capture", "--lane", KID, *args)
        except BaseException as e:  # the test's thread raises it
            box["r"] = e

    t = threading.Thread(target=ask)
    t.start()
    try:
        wait_until("the remote capture to start",
                   lambda: lane._capture is not None or "r" in box)
        assert s.local("device", "ping", KID).exit_code == 0
    finally:
        t.join(120)
    if isinstance(box["r"], BaseException):
        raise box["r"]
    return box["r"]


def test_device_capture_writes_a_capture_file_hexiao_decode_reads(store: Store,
                                                                 tmp_path: Path) -> None:
    from hexiao.hostd.lanes.capture import read_capture
    from hexiao.tools.support import decode

    out = tmp_path / "lane.hxcap"
    r = captured(store, "--seconds", "1", "--out", str(out), "--json")
    assert r.exit_code == 0, r.output
    got = json.loads(r.stdout)
    assert (got["device"], got["path"], got["bytes"]) == (KID, str(out), out.stat().st_size)
    assert out.stat().st_mode & 0o777 == 0o600
    header, records, cut = read_capture(out)
    assert header["device_id"] == KID and cut is None
    assert "asked remotely by ops-anna" in header["stopped"]
    assert {d for d, _, _ in records} == {"d2h", "h2d"}
    rep = decode.decode_capture(out)
    # the ping and its pong, their structure checked (headquarters has no device key)
    assert [rep.summary["directions"][d]["frames"] > 0 for d in ("h2d", "d2h")] == [True] * 2
    assert rep.summary["noise"] == 0 and not rep.summary["mac_checked"]
    assert store.daemon.lanes[KID]._capture is None  # the store's capture ended
    assert not list(Path("/tmp").glob(f"hexiao-remote-capture-*/{KID}.hxcap"))
    # without --out: decoded and printed, as `hexiao decode` prints it
    r = captured(store, "--seconds", "0.5")
    assert r.exit_code == 0, r.output
    assert f"capture of {KID}:" in r.stdout and "MAC NOT checked" in r.stdout
    assert "keep it with --out FILE" in r.stderr
    assert [x[2] for x in requests_logged(store)[-2:]] == ["device.capture"] * 2


def test_device_capture_refusals_are_one_line_and_leave_nothing(store: Store,
                                                               tmp_path: Path) -> None:
    before = len(requests_logged(store))
    out = tmp_path / "there.hxcap"
    out.write_text("someone's")
    r = store.remote("device", "capture", "--lane", KID, "--out", str(out))
    assert (r.exit_code, r.stderr) == (1, f"Error: {out} exists: captures never overwrite a "
                                          "file\n")
    assert out.read_text() == "someone's" and len(requests_logged(store)) == before  # not sent
    r = store.remote("device", "capture", "--lane", KID, "--seconds", "31")
    assert r.exit_code == 2 and "31" in r.stderr
    fresh = tmp_path / "fresh.hxcap"
    r = store.remote("device", "capture", "--lane", "nope", "--out", str(fresh))
    assert r.exit_code == 4 and len(r.stderr.splitlines()) == 1
    assert not fresh.exists()  # nothing came, no empty file
    # the store's own checks, for a request the CLI would not make
    key = keys.load_private_key(store.hq_key)
    asker = hq.Asker(key, keys.fingerprint(key.public_key()), "ops-ben")
    for args, why in (({"lane": KID, "ms": 300_000}, "'ms' must be a duration in ms"),
                      ({"lane": KID, "path": "/etc/x"}, "unexpected argument 'path'"),
                      ({"ms": 1000}, "a lane is required")):
        with psycopg.connect(store.dsn, autocommit=True) as conn, \
                pytest.raises(hq.RemoteFailure) as e:
            hq.ask(conn, store.broker, asker, store.name, "device.capture", args, timeout=20,
                   prefix=store.prefix)
        assert e.value.kind == "bad_request" and why in e.value.message
    # one capture of a lane at a time: the second is refused while the first records
    lane = store.daemon.lanes[KID]
    writer = lane.start_capture(str(tmp_path / "local.hxcap"))
    try:
        r = store.remote("device", "capture", "--lane", KID, "--seconds", "1")
        assert r.exit_code == 1 and "already being captured" in r.stderr
    finally:
        lane.stop_capture("test", only=writer)


def test_an_unknown_lane_is_not_found_in_one_line(store: Store) -> None:
    r = store.remote("device", "health", "--lane", "nope")
    assert r.exit_code == 4
    assert r.stderr.strip() == (f"Error: store {store.name}: no lane or device 'nope' at this "
                                f"store; known: {KID}")


# -- refusals: published raw on the broker, as an attacker could -----------------------------------


def publish_raw(s: Store, data: bytes, topic: str | None = None) -> None:
    url = urlsplit(s.broker)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(url.hostname or "", url.port or 1883)
    c.loop_start()
    try:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = b"x" * 16
        info = c.publish(s.prefix + (topic or remote.request_topic(MERCHANT, s.name)), data,
                         qos=1, properties=props)
        info.wait_for_publish(30)
    finally:
        c.disconnect()
        c.loop_stop()


def a_request(s: Store, *, store: str | None = None, at: int | None = None) -> remote.Request:
    name = store or s.name
    return remote.Request(MERCHANT, name, "device.health", {"lane": KID}, "mallory", "k",
                          secrets.token_bytes(16), at or record.ms(time.time()),
                          remote.response_topic(MERCHANT, name, "hq-x"))


def signed_for_topic(key: Ed25519PrivateKey, req: remote.Request, topic: str) -> bytes:
    """A request whose signature covers `topic` whatever store its payload names."""
    payload = cbor.dumps({"v": 1, "merchant": req.merchant, "store": req.store, "cmd": req.cmd,
                          "args": req.args, "by": req.by, "key": req.key, "nonce": req.nonce,
                          "at": req.at, "reply": req.reply})
    return cbor.dumps([payload, key.sign(remote.DOMAIN + topic.encode() + b"\x00" + payload)])


def refused_once(s: Store, reason: str, data: bytes) -> None:
    counting = Counting(s.responder.handlers)
    s.responder.handlers = counting
    try:
        before, answered = s.responder.refused[reason], s.responder.answered
        publish_raw(s, data)
        wait_until(f"a {reason} refusal", lambda: s.responder.refused[reason] == before + 1)
        assert (counting.calls, s.responder.answered) == (0, answered)
    finally:
        s.responder.handlers = counting.inner


def test_a_forged_request_is_refused_counted_and_nothing_done(store: Store) -> None:
    other = Ed25519PrivateKey.generate()  # someone's key, not headquarters'
    refused_once(store, "bad_signature", remote.sign_request(other, a_request(store)))
    refused_once(store, "malformed", b"\xa1\x61v\x01")
    # the right signature over other bytes
    hq_key = keys.load_private_key(store.hq_key)
    good = cbor.loads(remote.sign_request(hq_key, a_request(store)))
    refused_once(store, "bad_signature", cbor.dumps([good[0] + b"\x00", good[1]]))


def test_a_request_signed_with_the_store_key_is_refused(store: Store) -> None:
    # what a stolen store PC holds: its store key, as an Ed25519 seed and as a sealed record
    as_ed = Ed25519PrivateKey.from_private_bytes(store.store_key)
    refused_once(store, "bad_signature", remote.sign_request(as_ed, a_request(store)))
    req = a_request(store)
    topic = remote.request_topic(MERCHANT, store.name)
    sealed = record.seal(store.store_key, store.name, topic, 1,
                         cbor.dumps({"cmd": req.cmd, "args": req.args, "nonce": req.nonce}))
    refused_once(store, "malformed", sealed)


def test_a_replayed_request_is_refused_and_nothing_done(store: Store) -> None:
    hq_key = keys.load_private_key(store.hq_key)
    data = remote.sign_request(hq_key, a_request(store))
    answered = store.responder.answered
    publish_raw(store, data)
    wait_until("the first answer", lambda: store.responder.answered == answered + 1)
    refused_once(store, "replay", data)
    refused_once(store, "replay", data)


def test_a_request_for_another_store_is_refused(store: Store) -> None:
    hq_key = keys.load_private_key(store.hq_key)
    # headquarters' request to store B, copied onto this store's topic
    refused_once(store, "bad_signature", remote.sign_request(hq_key, a_request(store,
                                                                               store="sB")))
    # signed for this store's topic but naming store B
    mine = remote.request_topic(MERCHANT, store.name)
    refused_once(store, "wrong_store", signed_for_topic(hq_key, a_request(store, store="sB"),
                                                        mine))


def test_a_stale_request_is_refused_with_a_reason_headquarters_reads(store: Store) -> None:
    key = keys.load_private_key(store.hq_key)
    asker = hq.Asker(key, keys.fingerprint(key.public_key()), "ops-ben")
    before = store.responder.refused["stale"]
    with psycopg.connect(store.dsn, autocommit=True) as conn, \
            pytest.raises(hq.RemoteFailure) as e:
            hq.ask(conn, store.broker, asker, store.name, "device.health", {"lane": KID},
                   timeout=20, prefix=store.prefix, clock=lambda: time.time() - 600)
    assert e.value.kind == "refused" and "set both clocks right (NTP)" in e.value.message
    assert store.responder.refused["stale"] == before + 1
    assert requests_logged(store)[-1][0::4] == ("ops-ben", "error")


def test_a_command_not_answered_remotely_is_refused(store: Store) -> None:
    key = keys.load_private_key(store.hq_key)
    asker = hq.Asker(key, keys.fingerprint(key.public_key()), "ops-ben")
    with psycopg.connect(store.dsn, autocommit=True) as conn, \
            pytest.raises(hq.RemoteFailure) as e:
            hq.ask(conn, store.broker, asker, store.name, "journal.reconcile", {}, timeout=20,
                   prefix=store.prefix)
    assert e.value.kind == "refused" and "is not answered remotely" in e.value.message


def test_guard_window_start_and_nonces() -> None:
    g = remote.Guard(started_ms=1_000_000, window_s=30, max_nonces=4)
    now = 1_010_000
    with pytest.raises(remote.RemoteError, match="before this hostd started"):
        g.check(b"a" * 16, 999_999, now)
    with pytest.raises(remote.RemoteError, match="more than 30 s"):
        g.check(b"a" * 16, now + 31_000, now)
    g.check(b"a" * 16, now, now)
    with pytest.raises(remote.RemoteError) as e:
        g.check(b"a" * 16, now, now)
    assert e.value.reason == "replay"
    for n in (b"b", b"c", b"d"):
        g.check(n * 16, now, now)
    with pytest.raises(remote.RemoteError) as e:
        g.check(b"e" * 16, now, now)
    assert e.value.reason == "busy"
    g.check(b"e" * 16, now + 61_000, now + 61_000)  # the old ones are forgotten


# -- offline, and the fleet from PostgreSQL --------------------------------------------------------


def test_an_offline_store_is_a_timeout_in_one_line(store: Store) -> None:
    ghost = f"g{secrets.token_hex(3)}"
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        db.add_store(conn, MERCHANT, ghost, os.urandom(32))
    r = invoke(fleet_cli.main, "device", "health", "--lane", KID, "--store", ghost,
               "--dsn", store.dsn, "--broker", store.broker, "--key", str(store.hq_key),
               "--prefix", store.prefix, "--timeout", "0.5")
    assert r.exit_code == 5 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"Error: store {ghost} did not answer within 0.5 s: it is offline or not answering "
        "remote requests; headquarters has never seen it online"]
    with psycopg.connect(store.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT outcome FROM remote_requests WHERE store = %s",
                            (ghost,)).fetchall() == [("timeout",)]
    r = invoke(fleet_cli.main, "status", "--store", "nowhere", "--dsn", store.dsn,
               "--key", str(store.hq_key))
    assert (r.exit_code, r.stderr.strip()) == (
        4, "Error: no store 'nowhere' at headquarters (`hexiao fleet stores` lists them)")


def test_stores_and_lanes_from_fleetds_database(store: Store) -> None:
    inst = secrets.token_hex(16)

    def rec(seq: int, lane: str, kind: str, **extra: Any) -> db.Accepted:
        return db.Accepted(store.name, seq, {"v": 1, "kind": kind, "merchant": MERCHANT,
                                             "store": store.name, "lane": lane, "inst": inst,
                                             "at": record.ms(time.time()), **extra})
    with psycopg.connect(store.dsn) as conn:
        db.write_batch(conn, [
            rec(0, "@store", "online", state="online", session=1),
            rec(1, KID, "health", state={"device": KID, "link": "open", "firmware": "1.2.3"}),
            rec(2, "lane-2", "health", state={"device": "d2", "link": "waiting"})], [])
    base = ("--dsn", store.dsn, "--json")
    r = invoke(fleet_cli.main, "stores", "--state", "online", "--merchant", MERCHANT, *base)
    assert r.exit_code == 0, r.output
    mine = [s for s in json.loads(r.stdout) if s["store"] == store.name]
    assert [(s["state"], s["lanes"], s["lanes_open"]) for s in mine] == [("online", 2, 1)]
    r = invoke(fleet_cli.main, "lanes", "--store", store.name, "--link", "waiting", *base)
    assert [(x["lane"], x["device"], x["link"]) for x in json.loads(r.stdout)] == [
        ("lane-2", "d2", "waiting")]
    assert json.loads(r.stdout)[0]["down_since"] is not None
    r = invoke(fleet_cli.main, "lanes", "--store", store.name, "--dsn", store.dsn)
    assert r.stdout.splitlines()[0].split()[:5] == ["STORE", "LANE", "DEVICE", "LINK",
                                                    "FIRMWARE"]
    r = invoke(fleet_cli.main, "stores", "--dsn", "postgresql://postgres@127.0.0.1:1/none")
    assert r.exit_code == 1 and r.stderr.startswith("Error: database ")
    assert len(r.stderr.splitlines()) == 1


def test_a_store_without_a_valid_hq_key_does_not_start(tmp_path: Path, fleet_broker: str) -> None:
    kf = tmp_path / "store.key"
    kf.write_text(os.urandom(32).hex())
    kf.chmod(0o600)
    (tmp_path / "hq.pub").write_text("not a key")
    from hexiao.hostd.config.types import Fleet
    from hexiao.hostd.fleet.bridge import FleetError

    cfg = Fleet(enabled=True, broker=fleet_broker, merchant=MERCHANT, store="x", key_file=kf,
                hq_pubkey_file=tmp_path / "hq.pub")
    with pytest.raises(FleetError, match="is not a PEM Ed25519 public key"):
        remote.Responder(cfg, None)
    with pytest.raises(FleetError, match="cannot read"):
        remote.Responder(replace(cfg, hq_pubkey_file=tmp_path / "none.pub"), None)


def test_a_flood_of_forgeries_runs_nothing_and_a_real_request_still_gets_through(
        store: Store) -> None:
    other = Ed25519PrivateKey.generate()
    counting = Counting(store.responder.handlers)
    store.responder.handlers = counting
    try:
        refused = store.responder.refused
        before = refused["bad_signature"] + refused["busy"]
        flood = 300  # bounded by count: each is refused as forged, or as busy while queued
        url = urlsplit(store.broker)
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        c.connect(url.hostname or "", url.port or 1883)
        c.loop_start()
        try:
            infos = [c.publish(store.prefix + remote.request_topic(MERCHANT, store.name),
                               remote.sign_request(other, a_request(store)), qos=1)
                     for _ in range(flood)]
            for info in infos:
                info.wait_for_publish(30)
        finally:
            c.disconnect()
            c.loop_stop()
        wait_until("every forgery refused",
                   lambda: refused["bad_signature"] + refused["busy"] == before + flood)
        assert counting.calls == 0
    finally:
        store.responder.handlers = counting.inner
    r = store.remote("device", "ping", "--lane", KID, "--json")
    assert r.exit_code == 0 and json.loads(r.stdout)["device"] == KID
