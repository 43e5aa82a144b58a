"""Issue 14's done-when, walked through once as a support engineer at headquarters would: a
two-store chain on this machine, through full daemons, never pieces.

Two real hostds (Daemon, from real config files: fleet on, hq_pubkey_file), each with a sim board
flashed with v1.0.0 on a real pty (the firmware under the real MicroPython, started again after a
reset or a crash as a board is), the real Mosquitto and PostgreSQL, fleetd's consumer and its
rollout controller, headquarters' key. Every step goes through `hexiao fleet` (CliRunner) and is
checked by its effect where it lands: the lanes in the database, the device's answer, the
keystrokes the board types, the firmware the board runs. Every wait is a hang guard."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from click.testing import CliRunner
from fleet_conftest import create_database, drop_database, wait_until
from hexiao.fleetd import db
from hexiao.fleetd import rollout as hq
from hexiao.fleetd.consumer import Consumer, Settings
from hexiao.hostd.config import load
from hexiao.hostd.daemon import Daemon
from hexiao.hostd.fleet import desired
from hexiao.hostd.fleet import rollout as wire
from hexiao.hostd.keystore import Keystore
from hexiao.tools import fleet as fleet_cli
from hexiao.tools.install import bundle, keys
from test_firmware_sim import KID
from test_fleet_desired import _retained_clear
from test_fleet_rollout import Board, planted_build
from test_fw_update import DEVICE_KEY, board, forged, installed, kit  # noqa: F401

M = "m1"
LANE = "lane-1"
EAN13, EAN8 = b"]E05901234123457", b"]E496385074"  # products: typed at the till by default
# the rules change: EAN-13 ignored from now on; coupons as before; anything else typed
RULES = f"""
[rules.{LANE}]
rules = [{{action = "ignore", symbologies = ["]E0"]}},
         {{action = "coupon", symbologies = ["]Q1"], min_len = 8}}]
default = "product"
"""


class LinkedBoard(Board):
    """test_fleet_rollout's sim board (started again after a reset or a crash), its link's pty
    followed by <root>/tty as `hexiao sim board` does: the path hostd's config names."""

    def __init__(self, root: Path) -> None:
        self.tty = root / "tty"
        super().__init__(root)

    @property
    def port(self) -> str | None:
        return self._port

    @port.setter
    def port(self, value: str | None) -> None:
        self._port = value
        if self.tty.is_symlink():
            self.tty.unlink()
        if value:
            self.tty.symlink_to(value)

    def scan(self, line: bytes) -> None:
        os.write(self._hold, line + b"\r")  # the scan engine's UART (the board's scanner FIFO)

    def typed(self) -> str:
        """The digits the POS received as keystrokes (HID usages 0x1e..0x27), in order."""
        out = []
        hid = self.root / "hid.log"
        for line in hid.read_text().splitlines() if hid.exists() else []:
            usage = int(line.split()[2], 16)
            if 0x1E <= usage <= 0x27:
                out.append("1234567890"[usage - 0x1E])
        return "".join(out)


@dataclass
class Store:
    name: str
    daemon: Daemon
    board: LinkedBoard

    @property
    def lane(self) -> Any:
        return self.daemon.lanes[KID.decode()]


@dataclass
class Chain:
    a: Store
    b: Store
    dsn: str
    broker: str
    prefix: str
    hq_key: Path
    tmp: Path

    def fleet(self, *args: str) -> Any:
        r = CliRunner().invoke(fleet_cli.main, [*args, "--dsn", self.dsn])
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            raise r.exception
        return r

    def remote(self, *args: str) -> Any:
        return self.fleet(*args, "--key", str(self.hq_key), "--broker", self.broker,
                          "--prefix", self.prefix, "--operator", "support-li", "--json")

    def lanes(self) -> dict[str, dict[str, Any]]:
        for s in (self.a, self.b):  # what the metrics loop does every few seconds, now
            s.daemon.sample_metrics()
        r = self.fleet("lanes", "--json")
        assert r.exit_code == 0, r.output
        return {row["store"]: row for row in json.loads(r.stdout)}


def until(what: str, get: Any, want: Any, timeout: float = 60) -> None:
    """wait_until get() == want; a timeout shows what was seen last."""
    seen: list[Any] = [None]

    def check() -> bool:
        seen[0] = get()
        return bool(seen[0] == want)

    try:
        wait_until(what, check, timeout)
    except BaseException:
        print(f"{what}: last seen {seen[0]!r}, wanted {want!r}")
        raise


def _config(tmp: Path, name: str, root: Path, broker: str, prefix: str, hq_key: Path) -> Path:
    state = tmp / f"{name}-state"
    state.mkdir(mode=0o700)
    Keystore(state / "keystore.jsonl", create=True).add(KID, DEVICE_KEY)
    key = tmp / f"{name}.key"
    key.write_text(secrets.token_hex(32))
    key.chmod(0o600)
    toml = tmp / f"{name}.toml"
    toml.write_text(
        f'[hostd]\nstate_dir = "{state}"\ncontrol_socket = "{tmp / name}.sock"\n'
        f'web_listen = ""\n[backend]\nkind = "sim"\n[[lane]]\nname = "{LANE}"\n'
        f'[[device]]\nid = "{KID.decode()}"\nport = "{root / "tty"}"\nlane = "{LANE}"\n'
        f'[fleet]\nenabled = true\nbroker = "{broker}"\nmerchant = "{M}"\nstore = "{name}"\n'
        f'topic_prefix = "{prefix}"\nkey_file = "{key}"\nhq_pubkey_file = "{hq_key}.pub"\n'
        f'session_expiry_s = 0\n')
    return toml


def _bundle_file(offer: dict[str, Any], img: bytes, files: dict[str, bytes], out: Path) -> Path:
    """A forged build (test_fw_update.forged: signed with the devices' key) as the bundle file
    `fleet rollout start` reads: the image starts with the signed manifest."""
    bundle.write_container(out, img[:offer["manifest_size"]], offer["signature"], files)
    return out


def _planted_bundle(kit: dict[str, Any], tmp: Path) -> Path:  # noqa: F811
    """test_fleet_rollout's planted crashing build (1.1.0), as a bundle file."""
    work = tmp / "planted"
    work.mkdir()
    offer, img = planted_build(kit, work)
    files = {**kit["files"], "hexiao/firmware/app.mpy": (work / "app.mpy").read_bytes()}
    return _bundle_file(offer, img, files, tmp / "hexiao-sim-1.1.0-planted.tar")


@pytest.fixture
def chain(kit: dict[str, Any], board: Path, fleet_pg_admin: str,  # noqa: F811
          fleet_broker: str, fleet_prefix: str, tmp_path: Path) -> Iterator[Chain]:
    dsn = create_database(fleet_pg_admin)  # its own: at most one rollout runs in a database
    prefix = f"{fleet_prefix}{secrets.token_hex(3)}/"
    hq_key = tmp_path / "hq.key"
    keys.generate(hq_key)
    names = [f"a{secrets.token_hex(3)}", f"b{secrets.token_hex(3)}"]
    roots = [board, tmp_path / "board-b"]
    shutil.copytree(board, roots[1])  # the same v1.0.0, flashed on store B's board
    url = urlsplit(fleet_broker)
    host, port = url.hostname or "127.0.0.1", url.port or 1883
    tomls = [_config(tmp_path, n, r, fleet_broker, prefix, hq_key)
             for n, r in zip(names, roots, strict=True)]
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, toml in zip(names, tomls, strict=True):
            cfg = load(toml)
            db.add_store(conn, M, name, bytes.fromhex(Path(cfg.fleet.key_file or "").read_text()))
    boards: list[LinkedBoard] = []
    daemons: list[Daemon] = []
    consumer = controller = None
    try:
        consumer = Consumer(Settings(
            broker_host=host, broker_port=port, dsn=dsn, group=f"g{secrets.token_hex(4)}",
            topic_prefix=prefix, client_id=f"fd-{secrets.token_hex(4)}",
            session_expiry_s=0)).start()
        # fleetd run --hq-key: the rollout controller with its own publishing connection
        controller = hq.Controller(dsn, hq.load_signer(hq_key), hq.Publisher(host, port, prefix),
                                   every_s=0.5).start()
        wait_until("fleetd to subscribe", consumer.subscribed.is_set)
        for root, toml in zip(roots, tomls, strict=True):
            boards.append(LinkedBoard(root))
            daemons.append(Daemon(load(toml)).start())
        for d in daemons:
            wait_until("the board's link", lambda d=d: d.device_info(KID.decode())["state"] ==
                       "open", 60)
            wait_until("the responder's subscription", d._remote.subscribed.is_set)
        yield Chain(Store(names[0], daemons[0], boards[0]), Store(names[1], daemons[1],
                                                                  boards[1]),
                    dsn, fleet_broker, prefix, hq_key, tmp_path)
    finally:
        for d in daemons:
            d.stop()
        for b in boards:
            b.close()
        if controller is not None:
            controller.stop()
            controller.publish.close()
        if consumer is not None:
            consumer.stop()
        with psycopg.connect(dsn) as conn:  # what headquarters left retained: cleared
            shas = [r[0] for r in conn.execute("SELECT sha256 FROM rollouts").fetchall()]
        _retained_clear(fleet_broker, [prefix + t for n in names for t in (
            desired.topic(M, n), wire.order_topic(M, n))] + [
            prefix + wire.bundle_topic(M, sha) for sha in shas])
        drop_database(fleet_pg_admin, dsn)


def test_a_support_engineer_walks_a_two_store_chain(chain: Chain,
                                                    kit: dict[str, Any]) -> None:  # noqa: F811
    a, b = chain.a, chain.b
    # 1. every lane of both stores, link open, on the firmware its board runs
    # (the firmware each device names in its link's hello: its installed manifest's version)
    fw = {s.name: s.lane.peer["firmware"] for s in (a, b)}
    assert set(fw.values()) == {"hexiao-fw 1.0.0"}, fw
    assert {installed(s.board.root)["version"] for s in (a, b)} == {"1.0.0"}
    until("both stores' lanes at headquarters", lambda: {
        s: (row["link"], row["firmware"], row["board"]) for s, row in chain.lanes().items()}, {
        a.name: ("open", fw[a.name], "sim"), b.name: ("open", fw[b.name], "sim")})
    assert {row["desired"] for row in chain.lanes().values()} == {0}  # none applied yet
    r = chain.fleet("lanes", "--store", b.name)
    assert r.exit_code == 0 and b.name in r.stdout and a.name not in r.stdout, r.output
    assert r.stdout.split()[:7] == ["STORE", "LANE", "DEVICE", "LINK", "FIRMWARE", "BOARD",
                                    "DESIRED"], r.stdout

    # 2. a lane of store B, asked through the broker: its device answers over its link
    r = chain.remote("device", "health", "--store", b.name, "--lane", LANE)
    assert r.exit_code == 0, r.output
    health = json.loads(r.stdout)
    assert health["type"] == "health" and health["uptime_ms"] > 0, health
    # the same device as store B's own hostd sees it (its link counts these very frames)
    assert sorted(health) == sorted(b.daemon.handlers.device_health(KID.decode()))
    r = chain.remote("device", "logs", "--store", b.name, "--lane", LANE)
    assert r.exit_code == 0, r.output
    logs = json.loads(r.stdout)
    assert logs["type"] == "logs" and isinstance(logs["entries"], list), logs

    # 3. a rules change at scope `all`: both stores apply it; store A's board types differently
    a.board.scan(EAN13)
    wait_until("the EAN-13 typed at the till", lambda: a.board.typed() == EAN13[3:].decode())
    doc = chain.tmp / "rules.toml"
    doc.write_text(RULES)
    r = chain.fleet("config", "apply", str(doc), "--scope", "all", "--key", str(chain.hq_key),
                    "--broker", chain.broker, "--prefix", chain.prefix, "--author", "support-li")
    assert r.exit_code == 0, r.output
    assert f"{a.name}: version 0 -> 1; published" in r.stdout.splitlines()

    def applied() -> set[str]:
        r = chain.fleet("config", "status", "--json")
        assert r.exit_code == 0, r.output
        return {row["store"] for row in json.loads(r.stdout) if row["state"] == "applied"
                and row["applied"] == 1}

    until("both stores to report version 1 applied", applied, {a.name, b.name})
    until("the lanes' health to carry version 1", lambda: {
        row["desired"] for row in chain.lanes().values()}, {1})
    typed = a.board.typed()
    a.board.scan(EAN13)  # ignored now, by the device itself ...
    a.board.scan(EAN8)   # ... while the next scan is typed as before: in order, after it
    wait_until("the EAN-8 typed", lambda: a.board.typed() == typed + EAN8[3:].decode())
    assert a.lane.rules["rules"][0]["action"] == 2  # ignore, as the device was told

    # 4. a planted crashing build, canary 50% then 100%
    planted = _planted_bundle(kit, chain.tmp)
    r = chain.fleet("rollout", "start", str(planted), "--canary", "50%", "--then", "100%",
                    "--observe-minutes", "0", "--operator", "support-li", "--json")
    assert r.exit_code == 0, r.output
    st = json.loads(r.stdout)
    assert (st["state"], st["version"], [s["lanes"] for s in st["by_stage"]]) == (
        "running", "1.1.0", [1, 1]), st
    with psycopg.connect(chain.dsn) as conn:
        ((canary_store,),) = conn.execute(
            "SELECT store FROM rollout_lanes WHERE stage = 0").fetchall()
    canary, other = (a, b) if canary_store == a.name else (b, a)

    def rollout() -> dict[str, Any]:
        r = chain.fleet("rollout", "status", "--json")
        assert r.exit_code == 0, r.output
        out: dict[str, Any] = json.loads(r.stdout)
        return out

    wait_until("the rollout to halt", lambda: rollout()["state"] != "running", 300)
    st = rollout()
    # shown with any failure below: a device that crashed during the transfer (a MemoryError
    # in the firmware's 64 KB heap) ends its traceback here, not the planted crash's
    print("canary board exits", canary.board.exits, canary.board.stderr, st)
    assert (st["state"], st["stage"]) == ("halted", 0), st
    assert f"canary lane {canary.name}/{LANE} rolled back by itself" in st["reason"], st
    # the canary's device verified it and ran it on trial (crashing), then went back by itself
    assert 4 in canary.board.exits and installed(canary.board.root)["version"] == "1.0.0"
    lane = canary.daemon.rollout.updater.progress.lanes[LANE]
    assert lane["state"] == "rolled_back", lane
    # stage 2 never began: its lane is still pending, and the other store's hostd never got an
    # order, nor its board the build
    assert [s.get("pending") for s in st["stores"] if s["store"] == other.name] == [1], st
    assert st["by_stage"][1]["finished"] == 0, st
    assert other.daemon.rollout.updater.progress.order is None
    assert other.board.exits == [] and installed(other.board.root)["version"] == "1.0.0"
    until("both lanes open again at headquarters, on the firmware they had", lambda: {
        s: (row["link"], row["firmware"]) for s, row in chain.lanes().items()}, {
        s: ("open", f) for s, f in fw.items()})


@pytest.mark.soak
def test_a_good_build_reaches_both_stores_in_two_stages(chain: Chain,
                                                       kit: dict[str, Any]) -> None:  # noqa: F811
    """The other half of step 4: a good build, canary then everyone, confirmed on both boards."""
    until("both lanes at headquarters", lambda: {row["link"] for row in chain.lanes().values()}
          if len(chain.lanes()) == 2 else None, {"open"})
    offer, img = forged(kit, "1.1.0", 3)
    good = _bundle_file(offer, img, kit["files"], chain.tmp / "hexiao-sim-1.1.0.tar")
    r = chain.fleet("rollout", "start", str(good), "--canary", "50%", "--then", "100%",
                    "--observe-minutes", "0", "--operator", "support-li", "--json")
    assert r.exit_code == 0, r.output

    def state() -> str:
        r = chain.fleet("rollout", "status", "--json")
        assert r.exit_code == 0, r.output
        return str(json.loads(r.stdout)["state"])

    until("the rollout to finish", state, "done", 300)
    for s in (chain.a, chain.b):
        assert installed(s.board.root)["version"] == "1.1.0"
        until(f"{s.name}'s device to confirm it", lambda s=s: s.daemon.rollout.updater.progress
              .lanes[LANE]["state"], "confirmed", 120)
