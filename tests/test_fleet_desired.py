"""Desired state for real (issue 14 item 2): `hexiao fleet config diff|apply|status` at
headquarters, through the machine's Mosquitto (retained, signed), to two real hostds, one with a
real device (hexiao.firmware.linkpeer under MicroPython on a pty), reports back through fleetd's
consumer into PostgreSQL.

Forged, misdirected, replayed and invalid documents are published raw on the broker, as an
attacker (or a broken headquarters) would; each must be refused, counted, reported with its
reason, and change nothing. Every wait is a hang guard; nothing asserts a duration."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
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
from hexiao.fleetd import desired as hq
from hexiao.fleetd.consumer import Consumer, Settings
from hexiao.hostd.config import ConfigError, load
from hexiao.hostd.daemon import Daemon
from hexiao.hostd.fleet import desired
from hexiao.hostd.keystore import Keystore
from hexiao.tools import fleet as fleet_cli
from hexiao.tools import micropython
from hexiao.tools.install import keys
from hexiao.tools.sim import relay
from paho.mqtt.enums import CallbackAPIVersion

MERCHANT = "m1"
KID = "lane-1"
DOC = """
[rules.lane-1]
rules = [{action = "coupon", symbologies = ["]Q1"], min_len = 8}]
default = "ignore"
[macros.CASH]
items = ["{reduce_cost_yuan}", [40, 0]]
[settings]
suffix = "tab"
"""


@dataclass
class Store:
    name: str
    toml: Path
    daemon: Daemon

    @property
    def lane(self) -> Any:
        return self.daemon.lanes[KID]

    @property
    def applier(self) -> desired.Applier:
        a: desired.Applier = self.daemon.desired
        return a


@dataclass
class Fleet:
    a: Store
    b: Store
    device: relay.DeviceProcess
    hq_key: Path
    dsn: str
    broker: str
    prefix: str
    tmp: Path

    def cli(self, *args: str) -> Any:
        r = CliRunner().invoke(fleet_cli.main, ["config", *args, "--dsn", self.dsn])
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception
        return r

    def apply(self, text: str, scope: str, *extra: str) -> Any:
        f = self.tmp / f"doc-{secrets.token_hex(3)}.toml"
        f.write_text(text)
        return self.cli("apply", str(f), "--scope", scope, "--key", str(self.hq_key),
                        "--broker", self.broker, "--prefix", self.prefix, "--author",
                        "ops-anna", *extra)

    def status(self, store: str) -> dict[str, Any]:
        r = self.cli("status", "--store", store, "--json")
        assert r.exit_code == 0, r.output
        rows: list[dict[str, Any]] = json.loads(r.stdout)
        return rows[0]


def _hostd_toml(tmp: Path, name: str, port: str, broker: str, prefix: str, kf: Path,
                hq_key: Path, state: Path) -> Path:
    toml = tmp / f"{name}.toml"
    toml.write_text(
        f'[hostd]\nstate_dir = "{state}"\ncontrol_socket = "{tmp / name}.sock"\n'
        f'web_listen = ""\n[backend]\nkind = "sim"\n[[lane]]\nname = "{KID}"\n'
        f'[[device]]\nid = "{KID}"\nport = "{port}"\nlane = "{KID}"\n'
        f'[device.settings]\ninter_key_ms = 3\n'
        f'[fleet]\nenabled = true\nbroker = "{broker}"\nmerchant = "{MERCHANT}"\n'
        f'store = "{name}"\ntopic_prefix = "{prefix}"\nkey_file = "{kf}"\n'
        f'hq_pubkey_file = "{hq_key}.pub"\nsession_expiry_s = 0\n')
    return toml


def _retained_clear(broker: str, topics: list[str]) -> None:
    url = urlsplit(broker)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(url.hostname or "", url.port or 1883)
    c.loop_start()
    try:
        for t in topics:
            c.publish(t, b"", qos=1, retain=True).wait_for_publish(30)
    finally:
        c.disconnect()
        c.loop_stop()


@pytest.fixture(scope="module")
def fleet(mpy_stage: Path, fleet_broker: str, fleet_dsn: str, fleet_prefix: str,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("desired")
    hq_key = tmp / "hq.key"
    keys.generate(hq_key)
    names = [f"a{secrets.token_hex(3)}", f"b{secrets.token_hex(3)}"]
    tomls = []
    dev_key = os.urandom(32)
    cfg = tmp / "device.json"
    cfg.write_text(json.dumps({"id": KID, "key": dev_key.hex()}))
    cfg.chmod(0o600)
    argv, env = micropython.command("hexiao.firmware.linkpeer", mpy_stage,
                                    args=[f"cfg={cfg}", "scans=0"])
    cable = relay.Cable().start()
    device = relay.DeviceProcess(cable, argv, env, str(mpy_stage))
    for i, name in enumerate(names):
        key = os.urandom(32)
        kf = tmp / f"{name}.key"
        kf.write_text(key.hex())
        kf.chmod(0o600)
        with psycopg.connect(fleet_dsn, autocommit=True) as conn:
            db.add_store(conn, MERCHANT, name, key, franchisee="f-b" if i else None)
            hq.set_region(conn, name, None if i else "north")
        state = tmp / f"{name}-state"
        state.mkdir(mode=0o700)
        Keystore(state / "keystore.jsonl", create=True).add(KID.encode(), dev_key)
        port = cable.host_port if i == 0 else str(tmp / "no-such-port")
        tomls.append(_hostd_toml(tmp, name, port, fleet_broker, fleet_prefix, kf, hq_key, state))
    url = urlsplit(fleet_broker)
    consumer = Consumer(Settings(
        broker_host=url.hostname or "", broker_port=url.port or 1883, dsn=fleet_dsn,
        group=f"g{secrets.token_hex(4)}", topic_prefix=fleet_prefix,
        client_id=f"fd-{secrets.token_hex(4)}", session_expiry_s=0)).start()
    daemons: list[Daemon] = []
    made: Fleet | None = None
    try:
        wait_until("fleetd to subscribe", consumer.subscribed.is_set)
        for toml in tomls:
            daemons.append(Daemon(load(toml)).start())
        wait_until("the device's link", lambda: daemons[0].device_info(KID)["state"] == "open",
                   60)
        for d in daemons:
            wait_until("the responder's subscription", d._remote.subscribed.is_set)
        made = Fleet(Store(names[0], tomls[0], daemons[0]), Store(names[1], tomls[1], daemons[1]),
                     device, hq_key, fleet_dsn, fleet_broker, fleet_prefix, tmp)
        yield made
    finally:
        for d in [made.a.daemon, made.b.daemon] if made else daemons:  # (b's is restarted)
            d.stop()
        consumer.stop()
        cable.close()
        device.stop()
        with psycopg.connect(fleet_dsn, autocommit=True) as conn:  # `all` reached them too
            sent = conn.execute("SELECT s.merchant, s.store FROM desired_store JOIN stores s "
                                "USING (store)").fetchall()
        _retained_clear(fleet_broker, [fleet_prefix + desired.topic(m, n) for m, n in sent])


def _spy(lane: Any) -> list[dict[str, Any]]:
    """What the lane hands its open link from now on (the real link sends it all the same)."""
    sent: list[dict[str, Any]] = []
    link = lane._link
    real = link.send

    def send(msg: dict[str, Any]) -> bool:
        ok: bool = real(msg)
        if ok:
            sent.append(msg)
        return ok

    link.send = send
    return sent


def _expected_rules(s: Store, rules: tuple[dict[str, Any], ...], default: str) -> Any:
    dev = load(s.toml).devices[0]
    return dataclasses.replace(dev, rules=rules, rules_default=default).rules_message()


def test_apply_at_all_reaches_both_stores_and_the_device(fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    sent = _spy(a.lane)
    before = [e["type"] for e in fleet.device.of("message")].count("rules")
    r = fleet.apply(DOC, "all")
    assert r.exit_code == 0, r.output
    assert f"{a.name}: version 0 -> 1; published" in r.stdout.splitlines()
    assert f"{b.name}: version 0 -> 1; published" in r.stdout.splitlines()
    assert '  settings.suffix: (none) -> "tab"' in r.stdout.splitlines()
    for s in (a, b):
        wait_until(f"{s.name} to apply version 1", lambda s=s: s.applier.version == 1)
    want = _expected_rules(a, ({"action": 1, "symbologies": ["]Q1"], "min_len": 8},), "ignore")
    assert want["version"] != 1 and a.lane.rules == want and b.lane.rules == want
    # the open session got them at once: the rules message and config_set, over the real link
    wait_until("rules and settings sent", lambda: len(sent) >= 2)
    assert sent[:2] == [want, {"type": "config_set",
                               "values": {"inter_key_ms": 3, "suffix": "tab"}}]
    fleet.device.wait_for(lambda ev: [e["type"] for e in ev if e["ev"] == "message"].count(
        "rules") > before and any(e.get("type") == "config_set" for e in ev), 30)

    assert set(a.lane._macros) == {"CASH"} and b.lane.settings == {"inter_key_ms": 3,
                                                                   "suffix": "tab"}
    for s in (a, b):
        wait_until(f"{s.name}'s report at headquarters",
                   lambda s=s: fleet.status(s.name)["state"] == "applied")
    row = fleet.status(a.name)
    assert (row["desired"], row["applied"], row["refused"]) == (1, 1, None)
    r = fleet.cli("status")
    assert r.exit_code == 0 and r.stdout.splitlines()[0].split()[:4] == [
        "STORE", "DESIRED", "APPLIED", "STATE"]
    # the same file again: nothing changes, nothing is sent
    r = fleet.apply(DOC, "all")
    assert r.exit_code == 0 and f"{a.name}: no change (version 1)" in r.stdout
    # a later session gets the desired rules, not the file's
    assert a.lane.rules == want


def test_diff_shows_what_changes_where_and_applies_nothing(fleet: Fleet) -> None:
    wait_until("version 1 everywhere", lambda: fleet.b.applier.version >= 1)
    f = fleet.tmp / "region.toml"
    f.write_text('[settings]\nsuffix = "none"\n[macros.DISCOUNT]\nitems = ["x"]\n')
    with psycopg.connect(fleet.dsn, autocommit=True) as conn:
        before = conn.execute("SELECT store, version FROM desired_store ORDER BY store").fetchall()
    r = fleet.cli("diff", str(f), "--scope", "region:north")
    assert r.exit_code == 0, r.output
    v = fleet.a.applier.version
    assert r.stdout.splitlines() == [
        f"{fleet.a.name}: version {v} -> {v + 1}",
        '  macros.DISCOUNT: (none) -> {"items":["x"]}',
        '  settings.suffix: "tab" -> "none"']  # region north is store a only
    r = fleet.cli("diff", str(f), "--scope", "franchisee:f-b", "--json")
    plan = json.loads(r.stdout)
    assert [(p["store"], p["next"]) for p in plan] == [(fleet.b.name,
                                                        fleet.b.applier.version + 1)]
    with psycopg.connect(fleet.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT store, version FROM desired_store ORDER BY store"
                            ).fetchall() == before
    r = fleet.cli("diff", str(f), "--scope", "planet:mars")
    assert r.exit_code == 1 and r.stderr.strip() == (
        "Error: scope 'planet:mars': expected all, region:R, franchisee:F or store:S")


def test_an_invalid_file_is_refused_at_headquarters_in_one_line(fleet: Fleet) -> None:
    r = fleet.apply('[rules.lane-1]\nrules = [{action = "sell"}]\n', "all")
    assert r.exit_code == 1 and r.stdout == "" and len(r.stderr.splitlines()) == 1
    assert "rules.lane-1.rules: expected 1..8 rules" in r.stderr
    r = fleet.apply("[settings]\nsuffix = 'tab'\n", "store:nowhere")
    assert (r.exit_code, r.stderr.strip()) == (
        4, "Error: no store 'nowhere' at headquarters (`hexiao fleet stores` lists them)")
    r = fleet.apply("[settings]\nsuffix = 'tab'\n", "all", "--key", str(fleet.tmp / "none"))
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1 and "none" in r.stderr
    with psycopg.connect(fleet.dsn, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM desired_docs WHERE doc::text LIKE '%sell%'"
                            ).fetchone() == (0,)


# -- refusals: published raw on the broker --------------------------------------------------------


def _publish(f: Fleet, on_store: str, data: bytes) -> None:
    url = urlsplit(f.broker)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(url.hostname or "", url.port or 1883)
    c.loop_start()
    try:  # not retained: the real document stays the broker's retained one
        c.publish(f.prefix + desired.topic(MERCHANT, on_store), data,
                  qos=1).wait_for_publish(30)
    finally:
        c.disconnect()
        c.loop_stop()


def _doc(store: str, version: int, doc: dict[str, Any]) -> desired.Signed:
    return desired.Signed(MERCHANT, store, version, round(time.time() * 1000), "mallory", "k",
                          doc)


def _refused(f: Fleet, s: Store, reason: str, data: bytes, on: str | None = None,
             version: int = 0) -> None:
    before, applied = s.applier.refused[reason], s.applier.version
    rules, settings = s.lane.rules, dict(s.lane.settings)
    _publish(f, on or s.name, data)
    wait_until(f"a {reason} refusal", lambda: s.applier.refused[reason] == before + 1)
    assert (s.applier.version, s.lane.rules, s.lane.settings) == (applied, rules, settings)
    wait_until(f"headquarters to hear of the {reason} refusal",
               lambda: (f.status(s.name)["refused"] or {}).get("reason") == reason)
    got = f.status(s.name)["refused"]
    assert got["version"] == version and got["message"]


def test_forged_misdirected_replayed_and_invalid_documents_change_nothing(fleet: Fleet) -> None:
    a, b = fleet.a, fleet.b
    wait_until("version 1 applied", lambda: min(a.applier.version, b.applier.version) >= 1)
    hq_key = keys.load_private_key(fleet.hq_key)
    v = a.applier.version
    bad = {"settings": {"suffix": "none"}}
    # someone else's key
    _refused(fleet, a, "bad_signature",
             desired.seal(Ed25519PrivateKey.generate(), _doc(a.name, v + 1, bad)))
    # headquarters' document for store B, copied onto A's topic (and A's onto B's)
    _refused(fleet, a, "bad_signature", desired.seal(hq_key, _doc(b.name, v + 1, bad)))
    _refused(fleet, b, "bad_signature", desired.seal(hq_key, _doc(a.name, v + 1, bad)))
    # signed for A's topic but naming B: the payload's store is checked too
    signed = desired.Signed(MERCHANT, b.name, v + 1, 0, "mallory", "k", bad)
    from hexiao.hostd.fleet import remote
    from hexiao.protocol import cbor

    payload = cbor.dumps({"v": 1, "merchant": MERCHANT, "store": signed.store,
                          "version": signed.version, "at": 0, "by": "x", "key": "k",
                          "doc": bad})
    _refused(fleet, a, "wrong_store",
             remote.sign_signed(hq_key, desired.topic(MERCHANT, a.name), payload))
    # an older (or the same) version, whatever it holds
    _refused(fleet, a, "replay", desired.seal(hq_key, _doc(a.name, v, bad)), version=v)
    # a newer version that fails validation
    _refused(fleet, a, "invalid", desired.seal(hq_key, _doc(a.name, v + 5, {
        "rules": {KID: {"rules": [{"action": "sell"}]}}})), version=v + 5)
    assert "rules.lane-1.rules: expected" in a.applier.last_refusal[1]  # type: ignore[index]
    # and the last good one still runs; a real new version still gets through
    r = fleet.apply('[settings]\noffline_ms = 5000\n', f"store:{a.name}")
    assert r.exit_code == 0, r.output
    wait_until("the next version", lambda: a.applier.version == v + 1)
    assert a.lane.settings == {"inter_key_ms": 3, "suffix": "tab", "offline_ms": 5000}
    wait_until("applied at headquarters", lambda: fleet.status(a.name)["state"] == "applied")


def test_a_restarted_hostd_applies_the_last_good_document_before_the_broker(
        fleet: Fleet) -> None:
    b = fleet.b
    wait_until("version 1 applied", lambda: b.applier.version >= 1)
    want, version = b.lane.rules, b.applier.version
    saved = b.applier.path
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    b.daemon.stop()
    cfg = load(b.toml)  # a broker that never answers: only the saved document can do it
    cfg = dataclasses.replace(cfg, fleet=dataclasses.replace(cfg.fleet,
                                                             broker="mqtt://127.0.0.1:9"))
    d = Daemon(cfg).start()
    b.daemon = d
    assert d.desired.version == version and d.lanes[KID].rules == want
    assert d.lanes[KID].settings == {"inter_key_ms": 3, "suffix": "tab"}


def test_check_and_merge() -> None:
    with pytest.raises(ConfigError) as e:
        desired.check({"rules": {"x": {"rules": [{"action": "coupon"}], "extra": 1}},
                       "macros": {"CASHH": {"items": ["a"]}}, "settings": {"suffix": "up"},
                       "lanes": {}})
    assert len(e.value.errors) == 4
    merged = desired.merge([{"settings": {"suffix": "tab", "inter_key_ms": 1},
                             "rules": {"l1": {"rules": [1]}, "l2": {"rules": [2]}}},
                            {"settings": {"suffix": "none"}, "rules": {"l1": {"rules": [3]}}}])
    assert merged == {"settings": {"suffix": "none", "inter_key_ms": 1},
                      "rules": {"l1": {"rules": [3]}, "l2": {"rules": [2]}}}


def test_a_broker_that_does_not_take_it_leaves_it_for_the_next_apply(fleet: Fleet) -> None:
    a = fleet.a
    wait_until("a version applied", lambda: a.applier.version >= 1)
    v = a.applier.version
    r = fleet.apply('[settings]\noffline_ms = 7000\n', f"store:{a.name}", "--broker",
                    "mqtt://127.0.0.1:9")  # (the last --broker wins: nothing listens there)
    assert r.exit_code == 5 and len(r.stderr.splitlines()) == 1, r.output
    assert "cannot reach the broker" in r.stderr and "the next apply sends it" in r.stderr
    assert fleet.status(a.name)["state"] == "unpublished"
    assert fleet.status(a.name)["desired"] == v + 1
    r = fleet.apply('[settings]\noffline_ms = 7000\n', f"store:{a.name}")
    assert r.exit_code == 0 and f"{a.name}: no change (version {v + 1})" in r.stdout
    wait_until("the stored version applied", lambda: a.applier.version == v + 1)
    assert a.lane.settings["offline_ms"] == 7000


def test_add_store_with_a_region(fleet: Fleet, tmp_path: Path) -> None:
    from hexiao.fleetd import main as fleetd_main

    kf = tmp_path / "k"
    kf.write_text(os.urandom(32).hex())
    kf.chmod(0o600)
    name = f"r{secrets.token_hex(3)}"
    r = CliRunner().invoke(fleetd_main.main, ["add-store", "--dsn", fleet.dsn, "--merchant",
                                              MERCHANT, "--store", name, "--key-file", str(kf),
                                              "--region", "south"])
    assert r.exit_code == 0, r.output
    f = tmp_path / "d.toml"
    f.write_text("[settings]\nsuffix = 'none'\n")
    r = fleet.cli("diff", str(f), "--scope", "region:south", "--json")
    assert [p["store"] for p in json.loads(r.stdout)] == [name]


# -- scale (a soak: `pytest -m soak -s tests/test_fleet_desired.py`) -----------------------------


class SimLane:
    """A lane reduced to what the Applier calls: when its new configuration arrived."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.rules: Any = None

    def reconfigure(self, rules: Any, settings: dict[str, Any], macros: Any) -> None:
        self.rules, self.at = rules, time.monotonic()


@pytest.mark.soak
def test_scale_one_apply_reaches_every_lane(fleet_broker: str, fleet_dsn: str,
                                            fleet_prefix: str, tmp_path: Path) -> None:
    """HEXIAO_DESIRED_STORES stores (100) x HEXIAO_DESIRED_LANES lanes (10), each store a real
    Responder connection and Applier (real signatures, real broker), its lanes simulated; one
    `apply --scope region:R`; prints the time until 99% and 100% of the lanes had it."""
    from hexiao.hostd.config import from_dict
    from hexiao.hostd.fleet.remote import Responder, load_public_key
    from hexiao.hostd.journal import Journal

    n, per = (int(os.environ.get("HEXIAO_DESIRED_STORES", "100")),
              int(os.environ.get("HEXIAO_DESIRED_LANES", "10")))
    region = f"scale-{secrets.token_hex(3)}"
    hq_key = tmp_path / "hq.key"
    keys.generate(hq_key)
    pub = load_public_key(Path(f"{hq_key}.pub"))
    kf = tmp_path / "store.key"
    key = os.urandom(32)
    kf.write_text(key.hex())
    kf.chmod(0o600)
    stores, lanes, parts = [f"z{secrets.token_hex(3)}-{i}" for i in range(n)], [], []
    with psycopg.connect(fleet_dsn, autocommit=True) as conn:
        for s in stores:
            db.add_store(conn, MERCHANT, s, key)
            hq.set_region(conn, s, region)
    try:
        for s in stores:
            cfg = from_dict({"lane": [{"name": KID}], "device": [
                {"id": f"d{i}", "port": "/nonexistent", "lane": KID} for i in range(per)],
                "fleet": {"enabled": True, "broker": fleet_broker, "merchant": MERCHANT,
                          "store": s, "topic_prefix": fleet_prefix, "key_file": str(kf),
                          "hq_pubkey_file": f"{hq_key}.pub"}})
            sim = {f"d{i}": SimLane() for i in range(per)}
            lanes += sim.values()
            journal = tmp_path / f"{s}.sqlite3"
            Journal(journal).close()
            applier = desired.Applier(cfg, sim, pub, journal).start()
            responder = Responder(cfg.fleet, None)
            responder.topics[applier.topic] = applier.offer
            parts.append((responder.start(), applier))
        for r, _ in parts:
            wait_until("every store's subscription", r.subscribed.is_set, 120)
        f = tmp_path / "doc.toml"
        f.write_text(DOC)
        t0 = time.monotonic()
        with psycopg.connect(fleet_dsn, autocommit=True) as conn:
            k = keys.load_private_key(hq_key)
            steps = hq.apply(conn, f"region:{region}", hq.load_file(f), "bench", hq.publisher(
                fleet_broker, fleet_prefix, k, keys.fingerprint(k.public_key()), "bench", 120))
        published = time.monotonic() - t0
        assert all(s["published"] for s in steps) and len(steps) == n
        wait_until("every lane", lambda: all(x.at is not None for x in lanes), 300)
        times = sorted(x.at - t0 for x in lanes if x.at is not None)
        print(f"\n{n} stores x {per} lanes: published in {published:.2f} s; lanes configured: "
              f"99% in {times[int(len(times) * 0.99) - 1]:.2f} s, 100% in {times[-1]:.2f} s")
        assert all(a.version == 1 for _, a in parts)
    finally:
        for r, a in parts:
            r.stop()
            a.stop()
        _retained_clear(fleet_broker, [fleet_prefix + desired.topic(MERCHANT, s) for s in stores])
