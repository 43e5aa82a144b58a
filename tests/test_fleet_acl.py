"""The broker's per-store ACL (`hexiao-fleetd broker-acl`, fleetd/acl.py) on a real Mosquitto.

A throwaway Mosquitto (the binary on the PATH) with allow_anonymous false, a password_file made
by mosquitto_passwd and the acl_file the real command generated from the session's stores
table. paho clients log in as two stores, fleetd and the operators and show what each may and
may not do; then a real hostd bridge and fleetd's real consumer carry a redemption through it.

A refused publish is seen twice: Mosquitto's PUBACK says 135 (not authorized) and a later
allowed message from the same client reaches the subscriber while the refused one never does
(a broker delivers one client's messages in order: the later one is the barrier, no timing).
Mosquitto 2.0 grants every SUBACK and filters at delivery, so reads are shown by delivery too.
"""

from __future__ import annotations

import queue
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from fleet_conftest import LONG, Mosquitto, own_database, wait_until
from hexiao.fleetd import acl, db
from hexiao.fleetd import remote as hq_remote
from hexiao.fleetd import rollout as hq_rollout
from hexiao.fleetd.consumer import Consumer, Settings
from hexiao.hostd.config.types import Fleet
from hexiao.hostd.fleet import desired, record, remote, rollout
from hexiao.hostd.fleet.bridge import Bridge
from hexiao.tools.install import keys
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions
from test_fleet import MERCHANT, _redeem_directly

DENIED, NO_SUBSCRIBERS = 135, 16  # MQTT 5 reason codes "Not authorized", "No matching ..."


def _fleetd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hexiao.fleetd.main", *args],
                          capture_output=True, text=True, timeout=60)


@dataclass
class Login:
    """One paho client logged in as `user`; every message it receives lands in `got`."""
    user: str
    client: mqtt.Client
    got: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)
    seen: list[tuple[str, bytes]] = field(default_factory=list)
    subacks: set[int] = field(default_factory=set)
    pubacks: dict[int, int] = field(default_factory=dict)  # mid -> reason code

    def sub(self, *topics: str) -> None:
        _, mid = self.client.subscribe([(t, SubscribeOptions(qos=1)) for t in topics])
        wait_until(f"{self.user}'s SUBACK", lambda: mid in self.subacks)

    def pub(self, topic: str, payload: bytes, retain: bool = False) -> int:
        """The reason code of the broker's PUBACK (0: accepted, 135: refused by the ACL)."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        wait_until(f"{self.user}'s PUBACK", lambda: info.mid in self.pubacks)
        code = self.pubacks[info.mid]
        return 0 if code == NO_SUBSCRIBERS else code   # accepted all the same

    def until(self, payload: bytes) -> list[bytes]:
        """Every payload received up to and including `payload` (a barrier)."""
        while not any(p == payload for _, p in self.seen):
            try:
                self.seen.append(self.got.get(timeout=LONG))
            except queue.Empty:
                pytest.fail(f"{self.user} never received {payload!r}")
        return [p for _, p in self.seen]


@dataclass
class Env:
    broker: Mosquitto
    prefix: str
    a: str
    b: str
    dsn: str
    passwords: dict[str, str]
    acl_text: str
    folder: Path
    logins: list[Login] = field(default_factory=list)

    def login(self, user: str, password: str | None = None) -> Login:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                        client_id=f"acl-{user}-{secrets.token_hex(3)}")
        c.username_pw_set(user, password if password is not None else self.passwords[user])
        result: list[int] = []
        c.on_connect = lambda cl, u, f, rc, p: result.append(rc.value)
        c.connect("127.0.0.1", self.broker.port)
        c.loop_start()
        wait_until(f"{user} to connect", lambda: bool(result))
        lg = Login(user, c)
        c.on_message = lambda cl, u, m: lg.got.put((m.topic, bytes(m.payload)))
        c.on_subscribe = lambda cl, u, mid, rcs, p: lg.subacks.add(mid)
        c.on_publish = lambda cl, u, mid, rc, p: lg.pubacks.__setitem__(mid, rc.value)
        self.logins.append(lg)
        if result[0] != 0:
            raise ConnectionRefusedError(result[0])
        return lg

    def t(self, topic: str) -> str:
        return self.prefix + topic


@pytest.fixture(scope="module")
def env(fleet_dsn: str, fleet_prefix: str) -> Iterator[Env]:
    if not shutil.which("mosquitto_passwd"):
        pytest.fail("the ACL test needs mosquitto_passwd (apt-get install mosquitto)")
    # outside pytest's private tmp: Mosquitto started as root reads its files as `mosquitto`
    folder = Path(tempfile.mkdtemp(prefix="hexiao-acl-"))
    folder.chmod(0o755)
    tag = secrets.token_hex(3)
    a, b, prefix = f"a{tag}", f"b{tag}", f"{fleet_prefix}acl{tag}/"
    with psycopg.connect(fleet_dsn, autocommit=True) as conn:
        for s in (a, b):
            db.add_store(conn, MERCHANT, s, secrets.token_bytes(32), "f1")
    acl_file, pw_file = folder / "acl", folder / "passwd"
    r = _fleetd("broker-acl", "--dsn", fleet_dsn, "--out", str(acl_file), "--prefix", prefix,
                "--passwords", str(pw_file))
    assert r.returncode == 0, r.stderr
    assert f"wrote {acl_file}" in r.stdout and f"mosquitto_passwd -c {pw_file} fleetd" in r.stdout
    passwords = {u: secrets.token_hex(8) for u in ("fleetd", "hq", a, b)}
    for i, (user, pw) in enumerate(passwords.items()):
        subprocess.run(["mosquitto_passwd", *(["-c"] if i == 0 else []), "-b", str(pw_file),
                        user, pw], check=True, capture_output=True, timeout=30)
    pw_file.chmod(0o644)  # the broker's own user reads it (a test file of throwaway logins)
    broker = Mosquitto(folder)
    broker.conf.write_text(broker.conf.read_text().replace(
        "allow_anonymous true", "allow_anonymous false").replace(
        "persistence true", "persistence false")
        + f"password_file {pw_file}\nacl_file {acl_file}\n")
    e = Env(broker.start(), prefix, a, b, fleet_dsn, passwords, acl_file.read_text(), folder)
    try:
        yield e
    finally:
        for lg in e.logins:
            lg.client.disconnect()
            lg.client.loop_stop()
        broker.stop()
        shutil.rmtree(folder, ignore_errors=True)


# ---- the generator alone ---------------------------------------------------------------------

def test_the_acl_gives_each_store_its_own_tree_and_refuses_what_it_cannot_name() -> None:
    text = acl.generate([("m1", "s1"), ("m2", "s2")], "p/")
    block = text.split("user s1\n")[1].split("\n\n")[0].splitlines()
    assert block == ["topic write p/hexiao/v1/m1/s1/#",
                     "topic write p/hexiao/ctl/v1/m1/s1/response/#",
                     "topic read p/hexiao/ctl/v1/m1/s1/request",
                     "topic read p/hexiao/ctl/v1/m1/s1/desired",
                     "topic read p/hexiao/ctl/v1/m1/s1/firmware",
                     "topic read p/hexiao/ctl/v1/m1/fw/+"]
    assert "pattern" not in text and "topic write p/hexiao/v1/m2/s2/#" in text
    assert "user fleetd\ntopic read p/hexiao/v1/#\n" in text
    for rows, prefix, users, says in [
            ([], "", acl.Users(), "no stores"),
            ([("m1", "s 1")], "", acl.Users(), "not an id"),
            ([("m1", "hq")], "", acl.Users(), "headquarters login"),
            ([("m1", "s1")], "a/+/", acl.Users(), "--prefix"),
            ([("m1", "s1")], "nos", acl.Users(), "--prefix"),
            ([("m1", "s1")], "", acl.Users("x", "x"), "share the login")]:
        with pytest.raises(acl.AclError, match=says):
            acl.generate(rows, prefix, users)


def test_broker_acl_says_in_one_line_what_is_wrong(fleet_pg_admin: str, fleet_dsn: str,
                                                   tmp_path: Path) -> None:
    with psycopg.connect(fleet_dsn, autocommit=True) as conn:
        db.add_store(conn, MERCHANT, f"c{secrets.token_hex(3)}", secrets.token_bytes(32), "f1")
    # without --out the ACL alone is on stdout (to pipe), the password steps on stderr
    r = _fleetd("broker-acl", "--dsn", fleet_dsn, "--passwords", "/etc/mosquitto/pw")
    assert r.returncode == 0 and r.stdout.startswith("# hexiao broker ACL"), r.stderr
    assert "mosquitto_passwd -c /etc/mosquitto/pw fleetd" in r.stderr
    assert "mosquitto_passwd" not in r.stdout
    r = _fleetd("broker-acl", "--dsn", fleet_dsn, "--out", str(tmp_path / "no" / "acl"))
    assert r.returncode == 1 and r.stderr.startswith("hexiao-fleetd: --out ") and len(
        r.stderr.strip().splitlines()) == 1, r.stderr
    r = _fleetd("broker-acl", "--dsn", "postgresql://postgres@127.0.0.1:1/none")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stderr.startswith("hexiao-fleetd: database ")
    with own_database(fleet_pg_admin) as empty:
        r = _fleetd("broker-acl", "--dsn", empty)
        assert r.returncode == 1 and r.stdout == "", r.stdout
        assert r.stderr.strip() == ("hexiao-fleetd: no stores: add them first (`hexiao-fleetd "
                                    "add-store`), then generate")


# ---- on the broker ---------------------------------------------------------------------------

def test_without_a_login_or_with_a_wrong_password_nothing_connects(env: Env) -> None:
    with pytest.raises(ConnectionRefusedError):
        env.login(env.a, "not-the-password")
    assert env.broker.proc is not None and env.broker.proc.poll() is None


def test_a_store_writes_only_its_own_tree_and_reads_only_its_own_orders(env: Env) -> None:
    a, b, t = env.a, env.b, env.t
    fleetd, hq = env.login("fleetd"), env.login("hq")
    store_a, store_b = env.login(a), env.login(b)
    fleetd.sub(f"$share/g/{t(record.ROOT)}#")   # as fleetd's consumer subscribes

    # records and online state: A and B each on their own tree; fleetd reads both
    assert store_a.pub(t(record.topic(MERCHANT, a, "lane-1", "redemption")), b"a-rec") == 0
    assert store_a.pub(t(record.topic(MERCHANT, a, "@store", "online")), b"a-on", True) == 0
    assert store_b.pub(t(record.topic(MERCHANT, b, "lane-1", "redemption")), b"b-rec") == 0
    # A forging B's records, or a record of its own written by headquarters: refused
    assert store_a.pub(t(record.topic(MERCHANT, b, "lane-1", "redemption")), b"forged") == \
        DENIED
    assert hq.pub(t(record.topic(MERCHANT, a, "lane-1", "redemption")), b"hq-rec") == DENIED
    assert store_a.pub(t(record.topic(MERCHANT, a, "lane-1", "health")), b"a-after") == 0
    got = fleetd.until(b"a-after")
    assert {b"a-rec", b"a-on", b"b-rec"} <= set(got)
    assert b"forged" not in got and b"hq-rec" not in got
    # (the unsigned online state goes again: a later fleetd would count it as malformed)
    assert store_a.pub(t(record.topic(MERCHANT, a, "@store", "online")), b"", True) == 0

    # headquarters' documents, retained, published before the stores subscribe
    assert hq.pub(t(desired.topic(MERCHANT, b)), b"b-desired", True) == 0
    assert hq.pub(t(desired.topic(MERCHANT, a)), b"a-desired", True) == 0
    assert fleetd.pub(t(rollout.order_topic(MERCHANT, b)), b"b-order", True) == 0
    assert fleetd.pub(t(rollout.order_topic(MERCHANT, a)), b"a-order", True) == 0
    assert fleetd.pub(t(rollout.bundle_topic(MERCHANT, "ab" * 32)), b"bundle", True) == 0
    # A subscribes to B's topics first: a leak would arrive before A's own
    store_a.sub(t(desired.topic(MERCHANT, b)), t(rollout.order_topic(MERCHANT, b)),
                t(remote.request_topic(MERCHANT, b)))
    store_a.sub(t(desired.topic(MERCHANT, a)), t(rollout.order_topic(MERCHANT, a)),
                t(rollout.bundle_topic(MERCHANT, "+")), t(remote.request_topic(MERCHANT, a)))
    assert hq.pub(t(remote.request_topic(MERCHANT, b)), b"b-req") == 0
    assert hq.pub(t(remote.request_topic(MERCHANT, a)), b"a-req") == 0
    got = store_a.until(b"a-req")
    assert {b"a-desired", b"a-order", b"bundle"} <= set(got)
    assert not {b"b-desired", b"b-order", b"b-req"} & set(got)

    # A forging headquarters on its own control topics: refused, and nothing arrives
    for topic, forged in [(remote.request_topic(MERCHANT, a), b"forged-req"),
                          (desired.topic(MERCHANT, a), b"forged-desired"),
                          (rollout.order_topic(MERCHANT, a), b"forged-order"),
                          (rollout.bundle_topic(MERCHANT, "cd" * 32), b"forged-bundle")]:
        assert store_a.pub(t(topic), forged, retain=True) == DENIED, topic
    assert hq.pub(t(remote.request_topic(MERCHANT, a)), b"a-req2") == 0
    assert not [p for p in store_a.until(b"a-req2") if p.startswith(b"forged")]
    # the retained desired document is still headquarters' (a fresh subscription reads it)
    again = env.login(a)
    again.sub(t(desired.topic(MERCHANT, a)))
    assert again.until(b"a-desired") == [b"a-desired"]

    # answers: the operators read A's answer; A cannot answer in B's name
    hq.sub(t(remote.response_topic("+", "+", "#")))
    assert store_a.pub(t(remote.response_topic(MERCHANT, b, "hq-1")), b"as-b") == DENIED
    assert store_a.pub(t(remote.response_topic(MERCHANT, a, "hq-1")), b"a-answer") == 0
    assert hq.until(b"a-answer") == [b"a-answer"]
    # and a store reads no one's answers, nor the records of others
    store_b.sub(t(remote.response_topic(MERCHANT, a, "#")), t(f"{record.ROOT}#"))
    assert store_a.pub(t(remote.response_topic(MERCHANT, a, "hq-2")), b"a-answer2") == 0
    assert store_a.pub(t(record.topic(MERCHANT, a, "lane-1", "event")), b"a-event") == 0
    assert hq.until(b"a-answer2")[-1] == b"a-answer2"
    assert fleetd.until(b"a-event")[-1] == b"a-event"
    # (A's publishes were acknowledged, so queued to any reader, before this request was sent)
    store_b.sub(t(remote.request_topic(MERCHANT, b)))
    assert hq.pub(t(remote.request_topic(MERCHANT, b)), b"b-req2") == 0
    assert store_b.until(b"b-req2") == [b"b-req2"]


def test_the_real_bridge_and_fleetd_work_through_the_generated_acl(env: Env,
                                                                  tmp_path: Path) -> None:
    a = env.a
    key = secrets.token_bytes(32)
    with psycopg.connect(env.dsn, autocommit=True) as conn:
        db.add_store(conn, MERCHANT, a, key, "f1")   # a key the test holds (replaces A's)
    key_file, pw_file = tmp_path / "a.key", tmp_path / "a.password"
    key_file.write_text(key.hex())
    pw_file.write_text(env.passwords[a])
    key_file.chmod(0o600)
    pw_file.chmod(0o600)
    consumer = Consumer(Settings(
        broker_host="127.0.0.1", broker_port=env.broker.port, dsn=env.dsn,
        group=f"g{secrets.token_hex(3)}", topic_prefix=env.prefix,
        client_id=f"fd-{secrets.token_hex(3)}", username="fleetd",
        password=env.passwords["fleetd"], session_expiry_s=60)).start()
    journal = tmp_path / "a.sqlite3"
    bridge = None
    try:
        wait_until("fleetd to subscribe", consumer.subscribed.is_set)
        bridge = Bridge(Fleet(enabled=True, broker=env.broker.url, merchant=MERCHANT, store=a,
                              key_file=key_file, topic_prefix=env.prefix, username=a,
                              password_file=pw_file, session_expiry_s=60), journal).start()
        _redeem_directly(journal, 3)

        def rows() -> int:
            with psycopg.connect(env.dsn, autocommit=True) as conn:
                return conn.execute("SELECT count(*) FROM redemptions WHERE store = %s",
                                    (a,)).fetchone()[0]

        wait_until("3 redemptions in PostgreSQL through the ACL'd broker", lambda: rows() == 3)
        wait_until("the outbox to empty", lambda: bridge is not None and
                   bridge.outbox.depth()[0] == 0)
        with psycopg.connect(env.dsn, autocommit=True) as conn:
            assert conn.execute("SELECT state FROM store_online WHERE store = %s",
                                (a,)).fetchall() == [("online",)]
        assert consumer.counts["written"] == 3 and consumer.counts["online"] >= 1 and sum(
            consumer.counts[r] for r in record.REASONS) == 0, consumer.counts
    finally:
        if bridge is not None:
            bridge.stop()
        consumer.stop()


def test_the_real_remote_request_and_rollout_publisher_work_through_the_acl(
        env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = env.a
    hq_key = tmp_path / "hq.key"
    keys.generate(hq_key)
    key = secrets.token_bytes(32)
    with psycopg.connect(env.dsn, autocommit=True) as conn:
        db.add_store(conn, MERCHANT, a, key, "f1")
    key_file, pw_file = tmp_path / "a.key", tmp_path / "a.password"
    key_file.write_text(key.hex())
    pw_file.write_text(env.passwords[a])
    key_file.chmod(0o600)
    pw_file.chmod(0o600)
    cfg = Fleet(enabled=True, broker=env.broker.url, merchant=MERCHANT, store=a,
                key_file=key_file, topic_prefix=env.prefix, username=a, password_file=pw_file,
                hq_pubkey_file=Path(f"{hq_key}.pub"))
    responder = remote.Responder(cfg, None).start()   # no handlers: a refusal is its answer
    try:
        wait_until("the store's responder to subscribe", responder.subscribed.is_set)
        # the operators' login: the request reaches the store, its signed answer comes back
        monkeypatch.setenv("HEXIAO_FLEET_USERNAME", "hq")
        monkeypatch.setenv("HEXIAO_FLEET_PASSWORD", env.passwords["hq"])
        private = keys.load_private_key(hq_key)
        asker = hq_remote.Asker(private, keys.fingerprint(private.public_key()), "ops-acl")
        with psycopg.connect(env.dsn) as conn, pytest.raises(hq_remote.RemoteFailure) as e:
            hq_remote.ask(conn, env.broker.url, asker, a, "journal.reconcile", {}, timeout=20,
                          prefix=env.prefix)
        assert e.value.kind == "refused" and "not answered remotely" in e.value.message
        assert responder.refused["command"] == 1
    finally:
        responder.stop()
    # the rollout controller's publisher on fleetd's login: the store reads its order
    store_a = env.login(a)
    store_a.sub(env.t(rollout.order_topic(MERCHANT, a)))
    publish = hq_rollout.Publisher("127.0.0.1", env.broker.port, env.prefix, username="fleetd",
                                password=env.passwords["fleetd"])
    try:
        wait_until("the rollout publisher to connect", publish.client.is_connected)
        assert publish(rollout.order_topic(MERCHANT, a), b"real-order")
        assert store_a.until(b"real-order")[-1] == b"real-order"
    finally:
        publish.close()
    # the same publisher on a store's login: the broker refuses (PUBACK 135), and the
    # controller must not count the order as sent
    forger = hq_rollout.Publisher("127.0.0.1", env.broker.port, env.prefix, username=a,
                                 password=env.passwords[a])
    try:
        wait_until("the store's publisher to connect", forger.client.is_connected)
        assert not forger(rollout.order_topic(MERCHANT, a), b"forged-order")
    finally:
        forger.close()
