"""The broker's per-store ACL, generated from fleetd's `stores` table (`hexiao-fleetd broker-acl`).

Rules this module keeps:
- The topics come from the helpers that build them (record.ROOT, remote.request_topic/
  response_topic, desired.topic, rollout.order_topic/bundle_topic): the ACL names exactly what
  the code publishes and subscribes, and cannot drift from it.
- One `user` block per store (the broker username is the store id, the docs' one convention,
  fleet.username) with its own merchant and store written out, never a `pattern`: a pattern
  applies to every user, headquarters' too. A store may write its records, online state and
  answers under its own tree, and read its requests, desired state, firmware order and its
  merchant's bundles; nothing else. Headquarters' users: fleetd (the consumer reads every
  record; the rollout controller, on the same login, writes orders and bundles) and the
  operators (`hexiao fleet`: requests, responses, desired state).
- Nothing is generated from bad input: a store or merchant id outside record.ID, a store id
  that is a headquarters login, an empty stores table or a prefix that is not a plain topic
  level raise AclError with what to do; the caller says it in one line.
- Mosquitto's syntax (`acl_file`): `user NAME` then `topic read|write TOPIC` lines. Passwords
  are Mosquitto's own (`mosquitto_passwd`): this module never makes a hash.
"""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from hexiao.hostd.fleet import desired, record, remote, rollout

FLEETD, OPERATORS = "fleetd", "hq"   # the default headquarters logins (docs/fleet-deployment.md)


class AclError(ValueError):
    """Why no ACL was generated, said so that the reader knows what to do."""


@dataclass(frozen=True)
class Users:
    fleetd: str = FLEETD       # `hexiao-fleetd run --username` (consumer and rollouts)
    operators: str = OPERATORS  # $HEXIAO_FLEET_USERNAME of `hexiao fleet` commands


def stores(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """(merchant, store) of every store headquarters knows, in a stable order."""
    return [(m, s) for m, s in conn.execute(
        "SELECT merchant, store FROM stores ORDER BY merchant, store").fetchall()]


def _check(prefix: str, rows: list[tuple[str, str]], users: Users) -> None:
    if any(c in prefix for c in "+#\x00 \t\n") or (prefix and not prefix.endswith("/")):
        raise AclError(f"--prefix {prefix!r}: a topic prefix ends with / and has no spaces, "
                       "+ or # (as the stores' fleet.topic_prefix)")
    for u in (users.fleetd, users.operators):
        if not u or any(c.isspace() for c in u):
            raise AclError(f"headquarters login {u!r}: give a name without spaces")
    if users.fleetd == users.operators:
        raise AclError(f"fleetd and the operators share the login {users.fleetd!r}: give "
                       "them two (--fleetd-user, --operator-user)")
    if not rows:
        raise AclError("no stores: add them first (`hexiao-fleetd add-store`), then generate")
    for merchant, store in rows:
        if not (record.ID.fullmatch(merchant) and record.ID.fullmatch(store)):
            raise AclError(f"store {store!r} of merchant {merchant!r}: not an id of "
                           "[A-Za-z0-9_.-]{1,16}; fix the stores table first")
        if store in (users.fleetd, users.operators):
            raise AclError(f"store {store!r} has the name of a headquarters login: start "
                           "headquarters with another (--fleetd-user, --operator-user)")


def store_topics(merchant: str, store: str) -> list[tuple[str, str]]:
    """(access, topic) of one store, without the prefix."""
    return [("write", f"{record.ROOT}{merchant}/{store}/#"),   # records, online + its Will
            ("write", remote.response_topic(merchant, store, "#")),
            ("read", remote.request_topic(merchant, store)),
            ("read", desired.topic(merchant, store)),
            ("read", rollout.order_topic(merchant, store)),
            ("read", rollout.bundle_topic(merchant, "+"))]


def hq_topics() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(access, topic) of fleetd's login and of the operators', without the prefix."""
    fleetd = [("read", f"{record.ROOT}#"),   # its $share/<group>/ subscription is checked here
              ("write", rollout.order_topic("+", "+")),
              ("write", rollout.bundle_topic("+", "+"))]
    operators = [("write", remote.request_topic("+", "+")),
                 ("read", remote.response_topic("+", "+", "#")),
                 ("write", desired.topic("+", "+"))]
    return fleetd, operators


def generate(rows: list[tuple[str, str]], prefix: str = "", users: Users = Users()) -> str:
    """The acl_file text for these (merchant, store) rows; AclError if they cannot make one."""
    _check(prefix, rows, users)
    fleetd, operators = hq_topics()
    out = ["# hexiao broker ACL (Mosquitto acl_file), generated by `hexiao-fleetd broker-acl`",
           "# from fleetd's stores table: generate it again after `hexiao-fleetd add-store`.",
           "# A store's broker login is its store id; nothing is allowed that is not below.", ""]

    def block(user: str, why: str, topics: list[tuple[str, str]]) -> None:
        out.extend([f"# {why}", f"user {user}"])
        out.extend(f"topic {access} {prefix}{topic}" for access, topic in topics)
        out.append("")

    block(users.fleetd, "headquarters: fleetd's consumer and rollout controller", fleetd)
    block(users.operators, "headquarters: the operators' `hexiao fleet` commands", operators)
    for merchant, store in rows:
        block(store, f"store {store} of merchant {merchant}", store_topics(merchant, store))
    return "\n".join(out)


def password_steps(rows: list[tuple[str, str]], users: Users, path: str) -> list[str]:
    """The commands that make Mosquitto's password file for these logins (one prompt each)."""
    names = [users.fleetd, users.operators, *(s for _, s in rows)]
    steps = [f"mosquitto_passwd -c {path} {names[0]}"]
    steps += [f"mosquitto_passwd {path} {n}" for n in names[1:]]
    return steps
