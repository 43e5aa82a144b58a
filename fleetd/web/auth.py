"""Operators, their passwords and sessions, and the backoff after failed logins (PostgreSQL,
migration 007).

Rules this module keeps:
- a password is stored only as hashlib.scrypt(password, 16 random bytes of salt) with its
  parameters beside it, and compared with hmac.compare_digest; a name that does not exist costs
  the same scrypt (a dummy hash) so that timing does not tell names apart;
- a session is 32 random bytes (the cookie); the database keeps only their SHA-256, the
  operator, a CSRF token for the session's forms, and an expiry on the caller's clock: a
  stolen database dump opens no session, and an expired one opens nothing;
- failed logins are counted per name and per address; from the FREE_FAILURES-th on, each one
  blocks both for 2^k seconds (capped at MAX_BLOCK_S) and a login while blocked is refused
  without looking at the password. A good login clears both counts, and so do FORGET_S
  without a failure. Logs name the operator
  and the address, never the password;
- times come from the caller (`now`, epoch seconds): tests move a clock, not the wall.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg

log = logging.getLogger("hexiao.fleetd.web")

NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")  # an operator's name (it goes in logs)
MIN_PASSWORD = 10
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # ~16 MiB and some 50 ms per login on a 2-core box
FREE_FAILURES = 3  # failed logins before the backoff starts
MAX_BLOCK_S = 300
FORGET_S = 3600.0  # failures older than this (and no block since) are forgotten
_DUMMY_SALT = b"\0" * 16


class AuthError(ValueError):
    """A refused operator change (bad name, short password, no such operator): one line."""


@dataclass(frozen=True)
class Session:
    operator: str
    csrf: str
    expires: datetime


@dataclass(frozen=True)
class Verdict:
    """A login's outcome: a session token, or why not (and how long to wait if blocked)."""
    token: str | None = None
    session: Session | None = None
    refused: str = ""
    retry_s: int = 0


def _at(now: float) -> datetime:
    return datetime.fromtimestamp(now, UTC)


def _scrypt(password: str, salt: bytes, params: str) -> bytes:
    _, n, r, p = params.split("$")
    return hashlib.scrypt(password.encode(), salt=salt, n=int(n), r=int(r), p=int(p),
                          maxmem=128 * 1024 * 1024, dklen=32)


def _params() -> str:
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}"


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise AuthError(f"operator name {name!r}: use 1..64 of A-Z a-z 0-9 _ . @ -")
    return name


def add_operator(conn: psycopg.Connection, name: str, password: str) -> bool:
    """Add an operator, or set a new password (and end their sessions); True if added."""
    check_name(name)
    if len(password) < MIN_PASSWORD:
        raise AuthError(f"the password is too short: at least {MIN_PASSWORD} characters")
    salt, params = secrets.token_bytes(16), _params()
    digest = _scrypt(password, salt, params)
    with conn.transaction():
        row = conn.execute(
            "INSERT INTO operators (name, salt, hash, params) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (name) DO UPDATE SET salt = excluded.salt, hash = excluded.hash, "
            "params = excluded.params RETURNING (xmax = 0)", (name, salt, digest, params)
        ).fetchone()
        conn.execute("DELETE FROM operator_sessions WHERE operator = %s", (name,))
    return bool(row and row[0])


def list_operators(conn: psycopg.Connection) -> list[dict[str, str | None]]:
    rows = conn.execute("SELECT name, created, last_login FROM operators ORDER BY name")
    return [{"name": n, "created": c.isoformat(timespec="seconds"),
             "last_login": ll.isoformat(timespec="seconds") if ll else None} for n, c, ll in rows]


def remove_operator(conn: psycopg.Connection, name: str) -> None:
    """Remove an operator; their sessions go with them (ON DELETE CASCADE)."""
    with conn.transaction():
        cur = conn.execute("DELETE FROM operators WHERE name = %s", (name,))
    if cur.rowcount == 0:
        raise AuthError(f"no operator {name!r} (see: hexiao-fleetd user list)")


def _blocked(conn: psycopg.Connection, keys: list[str], now: float) -> int:
    row = conn.execute("SELECT max(blocked_until) FROM login_failures WHERE who = ANY(%s)",
                       (keys,)).fetchone()
    until = row[0] if row else None
    if until is None or until <= _at(now):
        return 0
    return max(1, int((until - _at(now)).total_seconds() + 0.999))


def _failed(conn: psycopg.Connection, keys: list[str], now: float) -> int:
    # blocked_until is also the last failure's time: a count quiet for FORGET_S starts again
    conn.execute("DELETE FROM login_failures WHERE blocked_until < %s", (_at(now - FORGET_S),))
    worst = 0
    for who in keys:
        row = conn.execute(
            "INSERT INTO login_failures (who, failures, blocked_until) VALUES (%s, 1, %s) "
            "ON CONFLICT (who) DO UPDATE SET failures = login_failures.failures + 1, "
            "blocked_until = excluded.blocked_until RETURNING failures",
            (who, _at(now))).fetchone()
        n = row[0] if row else 1
        if n >= FREE_FAILURES:
            block = min(2 ** (n - FREE_FAILURES), MAX_BLOCK_S)
            conn.execute("UPDATE login_failures SET blocked_until = %s WHERE who = %s",
                         (_at(now + block), who))
        worst = max(worst, n)
    return worst


def login(conn: psycopg.Connection, name: str, password: str, address: str, *, now: float,
          session_s: float) -> Verdict:
    """Check a login; a new session when it is good. Blocked logins are not checked."""
    keys = [f"user:{name[:64]}", f"ip:{address}"]
    with conn.transaction():
        wait = _blocked(conn, keys, now)
        if wait:
            log.warning("login refused for operator %r from %s: blocked %d s more after failed "
                        "logins", name[:64], address, wait)
            return Verdict(refused="too many failed logins: try again in "
                                   f"{wait} s", retry_s=wait)
        row = conn.execute("SELECT salt, hash, params FROM operators WHERE name = %s",
                           (name,)).fetchone() if NAME.fullmatch(name) else None
        if row is None:  # the same work as a real check: no timing tells a name exists
            _scrypt(password, _DUMMY_SALT, _params())
            good = False
        else:
            good = hmac.compare_digest(_scrypt(password, bytes(row[0]), row[2]), bytes(row[1]))
        if not good:
            n = _failed(conn, keys, now)
            log.warning("login failed for operator %r from %s (%d in a row)", name[:64],
                        address, n)
            return Verdict(refused="wrong name or password")
        conn.execute("DELETE FROM login_failures WHERE who = ANY(%s)", (keys,))
        conn.execute("DELETE FROM operator_sessions WHERE expires <= %s", (_at(now),))
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
        expires = _at(now + session_s)
        conn.execute("INSERT INTO operator_sessions (token_hash, operator, csrf, address, "
                     "created, expires) VALUES (%s, %s, %s, %s, %s, %s)",
                     (_token_hash(token), name, csrf, address, _at(now), expires))
        conn.execute("UPDATE operators SET last_login = %s WHERE name = %s", (_at(now), name))
    log.info("operator %s logged in from %s", name, address)
    return Verdict(token=token, session=Session(name, csrf, expires))


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def session(conn: psycopg.Connection, token: str, *, now: float) -> Session | None:
    """The live session this cookie's token opens, or None (unknown, expired, or removed)."""
    if not token or len(token) > 100:
        return None
    row = conn.execute("SELECT operator, csrf, expires FROM operator_sessions WHERE "
                       "token_hash = %s AND expires > %s", (_token_hash(token), _at(now))
                       ).fetchone()
    return Session(*row) if row else None


def logout(conn: psycopg.Connection, token: str) -> None:
    with conn.transaction():
        conn.execute("DELETE FROM operator_sessions WHERE token_hash = %s", (_token_hash(token),))


def same(a: str, b: str) -> bool:
    """Two tokens compared in constant time (CSRF)."""
    return bool(a) and hmac.compare_digest(a.encode(), b.encode())
