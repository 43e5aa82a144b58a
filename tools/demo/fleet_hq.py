"""The second half of `hexiao demo --fleet`: headquarters operating the chain it just settled.

Each store's `hexiao-hostd` (hostd's Daemon, in this process) starts on the store's journal with
one lane and its device (hexiao.firmware.linkpeer under MicroPython on a relay pty) and
`[fleet] hq_pubkey_file` naming the public half of a headquarters key made in the demo's
folder. Headquarters then asks one lane's `device health` over MQTT (fleetd/remote.py: signed
request, sealed answer, logged in remote_requests) and applies a desired-config change to all
stores (fleetd/desired.py), waiting for each store to report the version it applied back
through fleetd into PostgreSQL. It prints how to serve headquarters' page and does not serve it.

Rules this module keeps:
- Only the pieces hexiao ships do the work, through their library calls (the ones the
  `hexiao fleet` commands make); the demo prints what they did, in lines of at most 80 columns.
- Everything it starts it stops, in every outcome, and the retained documents it published are
  cleared from the broker (the demo's topic prefix is its own).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
import psycopg
from hexiao.fleetd import desired as hq_desired
from hexiao.fleetd import remote as hq_remote
from hexiao.hostd.config import ConfigError, load
from hexiao.hostd.control.client import ControlError
from hexiao.hostd.daemon import Daemon, DaemonError
from hexiao.hostd.fleet import desired
from hexiao.hostd.keystore import Keystore
from hexiao.tools import micropython
from hexiao.tools.install import keys
from hexiao.tools.sim import relay
from paho.mqtt.enums import CallbackAPIVersion

OPERATOR = "demo-ops"
# the change headquarters makes at every store: the device types Tab after a product, not Enter
CHANGE = {"settings": {"suffix": "tab"}}


class Failed(Exception):
    """A step headquarters took that did not work: one line saying which and why."""


class Stager:
    """The device modules compiled (micropython.stage) on a thread while the chain redeems."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="hexiao-demo-stage", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            micropython.stage(self.dest)
        except Exception as e:  # told where it is needed, not on this thread
            self.error = e

    def get(self, timeout: float) -> Path:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("timed out compiling the device's modules")
        if self.error is not None:
            raise Failed(f"cannot compile the device's modules: {self.error}")
        return self.dest


@dataclass
class Ctx:
    say: Callable[..., None]
    wait: Callable[[str, Callable[[], bool], float], None]
    tmp: Path
    broker: str
    prefix: str
    dsn: str
    timeout: float
    merchant: str


def operate(c: Ctx, stores: list[tuple[str, str]], staged: Path) -> bool:
    """stores: (store, lane) each, the lane's device named as the lane. True if every store
    answered and reported the change applied; TimeoutError or Failed (one line) otherwise."""
    # each hostd's embedded WeChat simulator says so at WARNING: the redemptions are over
    logging.getLogger("hexiao.hostd").setLevel(logging.ERROR)
    key_file = c.tmp / "hq.key"
    public = keys.generate(key_file)
    fp = keys.fingerprint(public)
    c.say("hq_key", f"Headquarters operates it, with its key {key_file.name} ({fp[:19]}…);",
          key_file=str(key_file), key_id=fp)
    with _stores(c, stores, staged, key_file) as daemons:
        c.say("hostd", f"  {', '.join(s for s, _ in stores)}: hexiao-hostd on the store's "
              "journal, a device per lane,\n    [fleet] hq_pubkey_file = hq.key.pub; online at "
              "headquarters",
              stores=[s for s, _ in stores])
        store, lane = stores[0]
        asker = hq_remote.Asker(keys.load_private_key(key_file), fp, OPERATOR)
        with psycopg.connect(c.dsn, autocommit=True) as conn:
            try:
                h = hq_remote.ask(conn, c.broker, asker, store, "device.health",
                                  {"lane": lane}, timeout=c.timeout, prefix=c.prefix)
            except hq_remote.RemoteFailure as e:
                raise Failed(f"device health of {store} {lane}: {e.message}") from None
        c.say("remote_health", f"  {store} {lane} device health, over MQTT: "
              f"{h.get('firmware')}, up {h.get('uptime_ms', 0) / 1000:.1f} s, "
              f"{h.get('heap_free', 0) // 1024} KB free", store=store, lane=lane, health=h)
        ok = _config(c, daemons, key_file, fp)
        url = "http://127.0.0.1:8790/"
        c.say("web", f"  its page, after a run with --keep (the database stays):\n"
              f"    D={c.dsn}\n"
              "    hexiao-fleetd user add NAME --dsn $D; hexiao-fleetd web --dsn $D\n"
              f"    then open {url}",
              command=["hexiao-fleetd", "web", "--dsn", c.dsn],
              user_command=["hexiao-fleetd", "user", "add", "NAME", "--dsn", c.dsn], url=url)
    return ok


def _config(c: Ctx, daemons: dict[str, Daemon], key_file: Path, key_id: str) -> bool:
    publish = hq_desired.publisher(c.broker, c.prefix, keys.load_private_key(key_file), key_id,
                                   OPERATOR, c.timeout)
    with psycopg.connect(c.dsn, autocommit=True) as conn:
        try:
            steps = hq_desired.apply(conn, "all", CHANGE, OPERATOR, publish)
        except hq_desired.DesiredFailure as e:
            raise Failed(f"config for all stores: {e.message}") from None
    if not all(s["published"] for s in steps):
        raise Failed(f"config for all stores: the broker {c.broker} did not take it")
    change = ", ".join(f"{ch['key']} -> {json.dumps(ch['new'])}" for ch in steps[0]["changes"])
    c.say("config_apply", f"  config for all stores: {change}; "
          + ", ".join(f"{s['store']} v{s['next']}" for s in steps),
          scope="all", doc=CHANGE, stores={s["store"]: {"version": s["next"],
                                                       "published": s["published"]}
                                          for s in steps})
    want = {s["store"]: s["next"] for s in steps}

    def reported() -> bool:
        with psycopg.connect(c.dsn, autocommit=True) as conn:
            rows = hq_desired.status(conn)
        return all(r["applied"] >= want[r["store"]] for r in rows if r["store"] in want)

    c.wait("the stores to report the config applied", reported, c.timeout)
    with psycopg.connect(c.dsn, autocommit=True) as conn:
        rows = [r for r in hq_desired.status(conn) if r["store"] in want]
    settings = {s: [lane.settings for lane in d.lanes.values()] for s, d in daemons.items()}
    ok = all(r["state"] == "applied" for r in rows) and all(
        all(v.get("suffix") == "tab" for v in lanes) for lanes in settings.values())
    c.say("config_applied", "  reported back: " + ", ".join(
        f"{r['store']} runs v{r['applied']}" for r in rows)
        + ("; their lanes type Tab now" if ok else "; NOT on every lane"),
        stores={r["store"]: r["applied"] for r in rows}, ok=ok)
    return ok


@contextlib.contextmanager
def _stores(c: Ctx, stores: list[tuple[str, str]], staged: Path,
            key_file: Path) -> Iterator[dict[str, Daemon]]:
    cables: list[relay.Cable] = []
    devices: list[relay.DeviceProcess] = []
    daemons: dict[str, Daemon] = {}
    try:
        for store, lane in stores:
            dev_key = secrets.token_bytes(32)
            cfg = c.tmp / f"{lane}.json"
            cfg.write_text(json.dumps({"id": lane, "key": dev_key.hex()}))
            cfg.chmod(0o600)
            state = c.tmp / f"{store}-state"
            state.mkdir(mode=0o700)
            Keystore(state / "keystore.jsonl", create=True).add(lane.encode(), dev_key)
            argv, env = micropython.command("hexiao.firmware.linkpeer", staged,
                                            args=[f"cfg={cfg}", "scans=0"])
            cables.append(relay.Cable().start())
            devices.append(relay.DeviceProcess(cables[-1], argv, env, str(staged)))
            toml = c.tmp / f"{store}-hostd.toml"
            toml.write_text(
                f'[hostd]\nstate_dir = "{state}"\njournal = "{c.tmp / store}.sqlite3"\n'
                f'control_socket = "{state}/hostd.sock"\nweb_listen = ""\n'
                f'[backend]\nkind = "sim"\n[[lane]]\nname = "{lane}"\n'
                f'[[device]]\nid = "{lane}"\nport = "{cables[-1].host_port}"\n'
                f'lane = "{lane}"\n[fleet]\nenabled = true\nbroker = "{c.broker}"\n'
                f'merchant = "{c.merchant}"\nstore = "{store}"\ntopic_prefix = "{c.prefix}"\n'
                f'key_file = "{c.tmp / store}.key"\nhq_pubkey_file = "{key_file}.pub"\n'
                'session_expiry_s = 60\n')
            try:
                daemons[store] = Daemon(load(toml)).start()
            except (ConfigError, DaemonError, ControlError, OSError) as e:
                raise Failed(f"{store}'s hexiao-hostd did not start: {e}") from None
        for (store, lane), d in zip(stores, daemons.values(), strict=True):
            c.wait(f"{store}'s device link", lambda d=d, lane=lane:
                   d.lanes[lane].info()["state"] == "open", c.timeout)
            # the responder's own connection (the one remote requests and orders come on)
            c.wait(f"{store} to take headquarters' requests",
                   d._remote.subscribed.is_set, c.timeout)
        c.wait("both stores online at headquarters", lambda: _online(c.dsn) == len(stores),
               c.timeout)
        yield daemons
    finally:
        for d in daemons.values():
            d.stop()
        for cable in cables:
            cable.close()
        for dev in devices:
            dev.stop()
        _clear_retained(c, [desired.topic(c.merchant, s) for s, _ in stores])


def _online(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute("SELECT count(*) FROM store_online WHERE state = 'online'"
                            ).fetchone()[0]  # type: ignore[index]


def _clear_retained(c: Ctx, topics: list[str]) -> None:
    """The documents published retained for the demo's stores, removed (an empty retained
    message): the broker keeps nothing of a demo that is over."""
    url = urlsplit(c.broker)
    m = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    with contextlib.suppress(OSError):
        m.connect(url.hostname or "", url.port or 1883)
        m.loop_start()
        try:
            for t in topics:
                m.publish(c.prefix + t, b"", qos=1, retain=True).wait_for_publish(c.timeout)
        finally:
            m.disconnect()
            m.loop_stop()
