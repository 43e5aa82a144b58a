"""The real servers behind the fleet tests: PostgreSQL and Mosquitto, never mocks.

- PostgreSQL: the machine's (127.0.0.1:5432, trust, user postgres) when it answers; otherwise a
  throwaway cluster from initdb/pg_ctl on the PATH (or /usr/lib/postgresql/*/bin), said so on
  stderr. Tests that restart PostgreSQL always get their own (Postgres below), never the
  machine's. The session creates its own database (hexiao_test_<random>) and drops it afterwards.
- Mosquitto: the machine's (127.0.0.1:1883) when it answers; otherwise a throwaway one from the
  mosquitto binary. Tests that stop and restart a broker always get their own (Mosquitto below),
  with persistence on so that sessions survive the restart as they do in production.
- Each session has its own topic prefix; the MQTT sessions tests open are ended by them.
- Neither server and no binary to start one: the tests FAIL, naming what to install.
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

PG_HOST, PG_PORT, MQTT_HOST, MQTT_PORT = "127.0.0.1", 5432, "127.0.0.1", 1883
LONG = 30.0  # a guard against hangs, never a performance claim


def _answers(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what: str, check: Callable[[], bool], timeout: float = LONG) -> None:
    """Poll until check() is true; fail naming `what` after `timeout` (a hang guard)."""
    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for path in sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True):
        return path
    return None


class Postgres:
    """A throwaway PostgreSQL cluster (initdb/pg_ctl) on a free port, never the machine's own.

    As root (PostgreSQL refuses to run as root) the cluster belongs to the `postgres` user and
    its commands run through runuser; its folder is made outside pytest's private tmp."""

    def __init__(self) -> None:
        initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if not (initdb and self.pg_ctl):
            pytest.fail("fleet tests need PostgreSQL's initdb and pg_ctl (apt-get install "
                        "postgresql) to start a throwaway server")
        self.root = Path(tempfile.mkdtemp(prefix="hexiao-pg-"))
        self.data, self.port = self.root / "data", free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres", "postgres")
        self._run([initdb, "-D", str(self.data), "-U", "postgres", "--auth=trust", "-N"])

    def _run(self, argv: list[str]) -> None:
        r = subprocess.run([*self._as, *argv], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            pytest.fail(f"{' '.join(argv[:2])}: {r.stderr.strip() or r.stdout.strip()}")

    @property
    def admin(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> Postgres:
        assert self.pg_ctl
        self._run([self.pg_ctl, "-D", str(self.data), "-w", "-l", str(self.root / "log"), "-o",
                   f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off",
                   "start"])
        return self

    def stop(self, mode: str = "fast") -> None:
        assert self.pg_ctl
        subprocess.run([*self._as, self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "stop"],
                       capture_output=True, timeout=120)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def fleet_pg_admin() -> Iterator[str]:
    """A DSN of the `postgres` database on a PostgreSQL server this session may use."""
    if _answers(PG_HOST, PG_PORT):
        yield f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres"
        return
    pg = Postgres()
    sys.stderr.write(f"\nfleet tests: no PostgreSQL on {PG_HOST}:{PG_PORT}; starting a "
                     f"throwaway one on port {pg.port}\n")
    pg.start()
    try:
        yield pg.admin
    finally:
        pg.remove()


def create_database(admin: str) -> str:
    """A new database with fleetd's schema on the server of `admin`; its DSN."""
    from hexiao.fleetd import db

    name = f"hexiao_test_{secrets.token_hex(6)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    dsn = admin.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(dsn, autocommit=True) as conn:
        db.migrate(conn)
    return dsn


def drop_database(admin: str, dsn: str) -> None:
    """Drop the database `dsn` names (create_database's), sessions still on it or not."""
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {dsn.rsplit('/', 1)[1]} WITH (FORCE)")


@contextlib.contextmanager
def own_database(admin: str) -> Iterator[str]:
    """create_database's DSN, dropped when the block ends."""
    dsn = create_database(admin)
    try:
        yield dsn
    finally:
        drop_database(admin, dsn)


@pytest.fixture(scope="session")
def fleet_dsn(fleet_pg_admin: str) -> Iterator[str]:
    """This session's own database, with fleetd's schema; dropped at the end."""
    with own_database(fleet_pg_admin) as dsn:
        yield dsn


class Mosquitto:
    """A throwaway broker on a free port; stop() and start() again keep its sessions."""

    def __init__(self, folder: Path) -> None:
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.access(binary, os.X_OK):
            pytest.fail("fleet tests need Mosquitto: none answers on 127.0.0.1:1883 and there "
                        "is no mosquitto binary to start one; install it (apt-get install "
                        "mosquitto)")
        self.binary, self.folder, self.port = binary, folder, free_port()
        self.conf = folder / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                             f"persistence true\npersistence_location {folder}/\n"
                             "max_queued_messages 100000\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until("mosquitto to listen", lambda: _answers("127.0.0.1", self.port))
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # saves its sessions, as a service stop does
            self.proc.wait(LONG)
        self.proc = None


@pytest.fixture
def throwaway_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path).start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def fleet_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """mqtt://HOST:PORT of a broker this session may use."""
    if _answers(MQTT_HOST, MQTT_PORT):
        yield f"mqtt://{MQTT_HOST}:{MQTT_PORT}"
        return
    sys.stderr.write("\nfleet tests: no broker on 127.0.0.1:1883; starting a throwaway one\n")
    broker = Mosquitto(tmp_path_factory.mktemp("mqtt")).start()
    try:
        yield broker.url
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def fleet_prefix() -> str:
    """This session's topic prefix: its records never meet another session's."""
    return f"test-{secrets.token_hex(4)}/"
