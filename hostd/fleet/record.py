"""Fleet records (docs/fleet-protocol.md): topics, payloads, and their COSE_Mac0 seal.

Rules this module keeps:
- Both ends use this module: the store seals (outbox.py, bridge.py), headquarters opens
  (unseal, called by fleetd/consumer.py); nothing else knows the wire form.
- A record is the project's COSE_Mac0 profile (protocol/cose.py, HMAC-SHA256, alg 5): kid = the
  store id, partial IV = the outbox seq (0 for `online`), external aad = the topic from
  `hexiao/v1/` on, payload = deterministic CBOR (protocol/cbor.py). No second MAC code here.
- A code appears only as its last 4 characters and HMAC-SHA256(code key, code).
- Times are integer Unix milliseconds (the CBOR profile has no floats); values keep only ints,
  texts and bools, so a card's odd field cannot make a record unsealable.
- check_payload() names the first problem as a RecordError with its rejection reason.
"""

from __future__ import annotations

import hmac
import re
from typing import Any

from hexiao.protocol import cbor, codec_fast, codecs, cose
from hexiao.protocol.errors import ProtocolError

VERSION = 1
ROOT = "hexiao/v1/"
ALG = cose.ALG_HMAC256
STORE_LANE = "@store"
KINDS = ("redemption", "event", "health", "online", "points")
MAX_SEQ = cose.MAX_COUNTER
ID = re.compile(r"[A-Za-z0-9_.-]{1,16}")      # merchant and store ids (the store id is the kid)
LANE = re.compile(r"[\w.-]{1,32}|@store")     # hostd lane names, or the whole store
# the rejection reasons fleetd counts, in the order it checks (docs/fleet-protocol.md)
REASONS = ("malformed", "unknown_store", "topic_mismatch", "bad_signature", "unknown_version",
           "replay")


class RecordError(Exception):
    """A record that cannot be accepted; `reason` is one of REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def topic(merchant: str, store: str, lane: str, kind: str) -> str:
    """The topic of a record, from `hexiao/v1/` on (a deployment may add a prefix)."""
    if not (ID.fullmatch(merchant) and ID.fullmatch(store) and LANE.fullmatch(lane)
            and kind in KINDS):
        raise ValueError(f"not a fleet topic: {merchant}/{store}/{lane}/{kind}")
    return f"{ROOT}{merchant}/{store}/{lane}/{kind}"


def parse_topic(name: str) -> tuple[str, str, str, str]:
    """(merchant, store, lane, kind) of a topic from `hexiao/v1/` on; RecordError if not one."""
    parts = name[len(ROOT):].split("/") if name.startswith(ROOT) else []
    if len(parts) != 4 or not (ID.fullmatch(parts[0]) and ID.fullmatch(parts[1])
                               and LANE.fullmatch(parts[2]) and parts[3] in KINDS):
        raise RecordError("malformed", f"not a topic of the {ROOT} tree")
    return parts[0], parts[1], parts[2], parts[3]


def code_hash(code_key: bytes, code: str) -> bytes:
    return hmac.digest(code_key, code.encode("utf-8"), "sha256")


def derive_code_key(store_key: bytes) -> bytes:
    """The code key of a store without a merchant-wide one (hashes then compare within it)."""
    return hmac.digest(store_key, b"hexiao/fleet code key", "sha256")


def plain(value: Any) -> Any:
    """A JSON-ish value reduced to what the CBOR profile carries (ints, texts, bools, maps,
    lists); anything else becomes its text."""
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return int(value) if value.is_integer() else str(value)
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return str(value)


def ms(t: float) -> int:
    return round(t * 1000)


def seal(key: bytes, store: str, topic_name: str, seq: int, payload: bytes) -> bytes:
    """The COSE_Mac0 of a payload (CBOR bytes) for `topic_name` (from `hexiao/v1/` on)."""
    return codecs.mac0(key, ALG, store.encode(), seq, payload, topic_name.encode())


def encode(payload: dict[str, Any]) -> bytes:
    return cbor.dumps(payload)


def unseal(data: bytes, topic_name: str, key_for: Any) -> tuple[str, int, dict[str, Any]]:
    """(kid, seq, payload) of a sealed record, checked in the order of the protocol document.

    `key_for(kid)` gives (store id, 32-byte key) or None. RecordError names the reason."""
    merchant, store, lane, kind = parse_topic(topic_name)
    try:
        m = codecs.parse(bytes(data))
    except (ProtocolError, ValueError, IndexError, TypeError) as e:
        raise RecordError("malformed", f"not a COSE_Mac0 of the profile: {e}") from None
    if m.alg != ALG:
        raise RecordError("malformed", "records use alg 5 (HMAC-SHA256)")
    try:
        kid = m.kid.decode("utf-8")
    except UnicodeDecodeError:
        raise RecordError("unknown_store", "the kid is not a store id") from None
    found = key_for(kid)
    if found is None:
        raise RecordError("unknown_store", f"no key for store {kid!r}")
    if kid != store:
        raise RecordError("topic_mismatch", f"signed by store {kid!r}, published as {store!r}")
    try:
        m.verify(found[1], topic_name.encode())
    except ProtocolError:
        raise RecordError("bad_signature", "the MAC does not verify") from None
    try:
        payload = codec_fast.loads(m.payload)  # cbor2, checked against the profile
    except ProtocolError as e:
        raise RecordError("malformed", f"payload is not CBOR of the profile: {e}") from None
    check_payload(payload, (merchant, store, lane, kind), m.counter)
    return kid, m.counter, payload


_COMMON = {"v": int, "kind": str, "merchant": str, "store": str, "lane": str, "inst": str,
           "at": int}
_FIELDS: dict[str, dict[str, Any]] = {
    "redemption": {"entry": int, "step": str, "outcome": str, "reason": (str, type(None)),
                   "card_type": (str, type(None)), "card_id": (str, type(None)),
                   "title": (str, type(None)), "value": dict, "code_tail": str,
                   "code_hash": bytes, "device": (str, type(None)), "received": int,
                   "ended": int},
    "event": {"name": str},
    "health": {"state": dict},
    "online": {"state": str, "session": int},
    # a member credit or reversal as it ended in the store's points ledger (hostd/members/)
    "points": {"entry": int, "receipt": str, "points": int, "total_fen": int, "card_id": str,
               "via": str, "code_tail": str, "code_hash": bytes, "ended": int},
}
HASHED = ("redemption", "points")  # kinds carrying a code_hash (32 bytes)
_INST = re.compile(r"[0-9a-f]{32}")


def check_payload(payload: Any, where: tuple[str, str, str, str], seq: int) -> None:
    if not isinstance(payload, dict):
        raise RecordError("malformed", "the payload is not a map")
    if payload.get("v") != VERSION:
        raise RecordError("unknown_version", f"payload version {payload.get('v')!r}")
    kind = where[3]
    for name, want in {**_COMMON, **_FIELDS[kind]}.items():
        got = payload.get(name, ...)
        if got is ... or not isinstance(got, want) or (want is int and isinstance(got, bool)):
            raise RecordError("malformed", f"{kind}: field {name!r} missing or of the wrong type")
    if not _INST.fullmatch(payload["inst"]):
        raise RecordError("malformed", "inst is not 32 hex digits")
    if kind in HASHED and len(payload["code_hash"]) != 32:
        raise RecordError("malformed", "code_hash is not 32 bytes")
    if (kind == "online") != (seq == 0):
        raise RecordError("malformed", "seq 0 is for online records only")
    claimed = (payload["merchant"], payload["store"], payload["lane"], payload["kind"])
    if claimed != where:
        raise RecordError("topic_mismatch", "the payload names another place than its topic")
