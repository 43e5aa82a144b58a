# Messages of protocol version 1 (SPEC.md, "Messages"; messages.cddl is the same table in CDDL).
#
# Rules kept here:
# - one table, TYPES, defines every message: number, name, direction, epoch, reliability, fields;
# - on the wire a message is a CBOR map with small integer keys (key 0 is the type), encoded
#   deterministically; in code it is a dict with names: {"type": "scan", "scan_id": 7, ...};
# - decode() rejects unknown types (`unknown_type`) and unknown, missing or mistyped fields
#   (`schema`): a v1 receiver accepts exactly what this table says, so growth happens by new
#   versions, new types and new optional keys negotiated through hello/welcome;
# - encode() validates too: a malformed message is a bug in the sender and raises ValueError.

from . import codec
from .errors import ProtocolError

VERSIONS = (1,)

# spec kinds: ("u", max) uint; ("i",) int; ("b", min, max) bytes; ("t", max) text; ("?",) bool;
# ("l", spec, max) list; ("a", (specs)) fixed array; ("s", fields) struct with int keys;
# ("m", keyspec, valspec, max) open map; ("c", (specs)) the first spec that fits.
U8 = ("u", 0xFF)
U16 = ("u", 0xFFFF)
U32 = ("u", 0xFFFFFFFF)
U64 = ("u", 0xFFFFFFFFFFFFFFFF)
NONCE = ("b", 16, 16)
NAME = ("t", 24)
COUNTERS = ("m", NAME, U64, 32)
CONFIG_VALUE = ("c", (("?",), ("i",), ("t", 64), ("b", 0, 64)))
CONFIG = ("m", NAME, CONFIG_VALUE, 16)
RULE = ("s", (
    (0, "action", ("u", 2), True),  # 0 product, 1 coupon, 2 ignore
    (1, "symbologies", ("l", ("t", 4), 8), False),  # AIM ids, e.g. "]Q1"
    (2, "min_len", U16, False),
    (3, "max_len", U16, False),
    (4, "prefix", ("b", 1, 16), False),
    (5, "check", ("u", 1), False),  # 0 none, 1 GS1 mod-10 (EAN/UPC)
))
KEY_ITEM = ("c", (("t", 64), ("a", (U8, U8))))  # text to type, or [HID usage, modifier bits]
LOG_ENTRY = ("a", (U32, U64, ("u", 7), ("t", 48)))  # seq, uptime ms, level, event

D2H, H2D, BOTH = "d2h", "h2d", "both"
HANDSHAKE, SESSION, ANY = "handshake", "session", "any"

# number: (name, direction, epoch, reliable, fields); a field is (key, name, spec, required)
TYPES = {
    1: ("hello", D2H, HANDSHAKE, False, (
        (1, "versions", ("l", U16, 8), True),
        (2, "nonce", NONCE, True),
        (3, "firmware", ("t", 32), True),
        (4, "board", ("t", 16), True),
        (5, "reset_cause", ("t", 16), False),
    )),
    2: ("welcome", H2D, HANDSHAKE, True, (
        (1, "version", U16, True),
        (2, "host_nonce", NONCE, True),
        (3, "device_nonce", NONCE, True),
        (4, "host_time_ms", U64, False),
    )),
    3: ("scan", D2H, SESSION, True, (
        (1, "scan_id", U32, True),
        (2, "symbology", ("t", 4), True),
        (3, "data", ("b", 0, 512), True),
        (4, "time_ms", U64, True),
    )),
    4: ("verdict", H2D, SESSION, True, (
        (1, "scan_id", U32, True),
        (2, "outcome", ("u", 15), True),  # SPEC.md "verdict": accepted, refused, offline, ...
        (3, "beep", ("u", 15), True),
        (4, "led", ("u", 15), True),
        (5, "text", ("t", 48), True),
        (6, "slip", ("b", 0, 768), False),
    )),
    5: ("keys", H2D, SESSION, True, (
        (1, "macro_id", U32, True),
        (2, "items", ("l", KEY_ITEM, 32), True),
        (3, "delay_ms", ("u", 1000), False),
    )),
    6: ("print", H2D, SESSION, True, (
        (1, "job_id", U32, True),
        (2, "seq", U16, True),
        (3, "last", ("?",), True),
        (4, "data", ("b", 1, 768), True),
    )),
    7: ("rules", H2D, SESSION, True, (
        (1, "version", U32, True),
        (2, "default", ("u", 2), True),
        (3, "rules", ("l", RULE, 16), True),
    )),
    8: ("health_get", H2D, SESSION, True, ()),
    9: ("health", D2H, SESSION, True, (
        (1, "uptime_ms", U64, True),
        (2, "reset_cause", ("t", 16), True),
        (3, "firmware", ("t", 32), True),
        (4, "heap_free", U32, True),
        (5, "heap_peak", U32, True),
        (6, "link", COUNTERS, True),
        (7, "app", COUNTERS, True),
    )),
    10: ("logs_get", H2D, SESSION, True, (
        (1, "since", U32, False),
        (2, "max", ("u", 16), False),
    )),
    11: ("logs", D2H, SESSION, True, (
        (1, "entries", ("l", LOG_ENTRY, 16), True),
        (2, "next", U32, True),
    )),
    12: ("config_get", H2D, SESSION, True, (
        (1, "keys", ("l", NAME, 16), False),
    )),
    13: ("config_set", H2D, SESSION, True, (
        (1, "values", CONFIG, True),
    )),
    14: ("config", D2H, SESSION, True, (
        (1, "values", CONFIG, True),
    )),
    15: ("ack", BOTH, SESSION, False, (
        (1, "counter", U32, True),
    )),
    16: ("nack", BOTH, ANY, False, (
        (1, "counter", U32, False),  # absent: not about one frame (e.g. "I saw line noise")
        (2, "code", U16, True),
        (3, "detail", ("t", 64), False),
    )),
    17: ("ping", BOTH, SESSION, True, (
        (1, "data", ("b", 0, 64), False),
    )),
    18: ("pong", BOTH, SESSION, True, (
        (1, "data", ("b", 0, 64), False),
    )),
}

NUMBER = {}
for _num, _t in TYPES.items():
    NUMBER[_t[0]] = _num

# verdict enumerations (SPEC.md, "verdict")
OUTCOMES = ("accepted", "refused", "offline", "verify_manually", "identified", "info")
BEEPS = ("none", "ok", "error", "warning")
LEDS = ("off", "green", "red", "amber", "blue")


def info(name):
    """(number, direction, epoch, reliable) of a message type name."""
    num = NUMBER[name]
    t = TYPES[num]
    return num, t[1], t[2], t[3]


def _is_int(v):
    return isinstance(v, int) and v is not True and v is not False


def _check(spec, v, to_wire):
    # returns the converted value; raises ValueError with a short reason
    kind = spec[0]
    if kind == "u":
        if not _is_int(v) or v < 0 or v > spec[1]:
            raise ValueError("expected uint <= %d" % spec[1])
        return v
    if kind == "i":
        if not _is_int(v) or not -(1 << 63) <= v < (1 << 63):
            raise ValueError("expected int")
        return v
    if kind == "b":
        if not isinstance(v, (bytes, bytearray)) or not spec[1] <= len(v) <= spec[2]:
            raise ValueError("expected bytes of %d..%d" % (spec[1], spec[2]))
        return bytes(v)
    if kind == "t":
        if not isinstance(v, str) or len(v) > spec[1]:
            raise ValueError("expected text of at most %d" % spec[1])
        return v
    if kind == "?":
        if v is not True and v is not False:
            raise ValueError("expected bool")
        return v
    if kind == "l":
        if not isinstance(v, (list, tuple)) or len(v) > spec[2]:
            raise ValueError("expected list of at most %d" % spec[2])
        return [_check(spec[1], x, to_wire) for x in v]
    if kind == "a":
        if not isinstance(v, (list, tuple)) or len(v) != len(spec[1]):
            raise ValueError("expected array of %d" % len(spec[1]))
        return [_check(s, x, to_wire) for s, x in zip(spec[1], v)]
    if kind == "s":
        if not isinstance(v, dict):
            raise ValueError("expected map")
        return _struct(spec[1], v, to_wire, 0)
    if kind == "m":
        if not isinstance(v, dict) or len(v) > spec[3]:
            raise ValueError("expected map of at most %d" % spec[3])
        out = {}
        for k in _sorted_keys(v) if to_wire else v:
            out[_check(spec[1], k, to_wire)] = _check(spec[2], v[k], to_wire)
        return out
    if kind == "c":
        for s in spec[1]:
            try:
                return _check(s, v, to_wire)
            except ValueError:
                pass
        raise ValueError("no alternative fits")
    raise ValueError("bad spec")


def _sorted_keys(d):
    # deterministic order of map keys: bytewise order of their encodings (RFC 8949 §4.2.1)
    return sorted(d, key=codec.pure_dumps)


def _struct(fields, v, to_wire, skip):
    # to_wire: named dict -> int-keyed dict in ascending key order; else the reverse
    out = {}
    seen = skip
    for key, name, spec, required in fields:
        src = name if to_wire else key
        if src in v:
            seen += 1
            try:
                out[key if to_wire else name] = _check(spec, v[src], to_wire)
            except ValueError as e:
                raise ValueError("%s: %s" % (name, e.args[0])) from None
        elif required:
            raise ValueError("missing field %s" % name)
    if seen != len(v):
        raise ValueError("unknown field")
    return out


def to_wire(msg):
    """Named message dict -> wire map (ValueError if the message is not valid)."""
    num = NUMBER.get(msg.get("type"))
    if num is None:
        raise ValueError("unknown message type %r" % (msg.get("type"),))
    out = {0: num}
    out.update(_struct(TYPES[num][4], msg, True, 1))
    return out


def from_wire(w):
    """Wire map -> named message dict, or ProtocolError(unknown_type | schema)."""
    if not isinstance(w, dict):
        raise ProtocolError("schema", "a message is a map")
    num = w.get(0)
    t = TYPES.get(num) if _is_int(num) else None
    if t is None:
        raise ProtocolError("unknown_type", "message type %r" % (num,))
    try:
        out = _struct(t[4], w, False, 1)
    except ValueError as e:
        raise ProtocolError("schema", "%s: %s" % (t[0], e.args[0])) from None
    out["type"] = t[0]
    return out


def encode(msg):
    return codec.dumps(to_wire(msg))


def decode(payload):
    return from_wire(codec.loads(payload))
