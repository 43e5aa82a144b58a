# Messages of protocol version 1 (SPEC.md, "Messages"; hexiao-v1.cddl is the same table in CDDL).
#
# Rules kept here:
# - one table, _TABLE, defines every message: number, name, direction, epoch, reliability, and
#   its fields (key, required "!", name, spec); the firmware-update messages (SPEC 6.8) are its
#   continuation in messages_fw.TABLE, loaded when first asked for (see _head);
# - on the wire a message is a CBOR map with small integer keys (key 0 is the type), encoded
#   deterministically; in code it is a dict with names: {"type": "scan", "scan_id": 7, ...};
# - decode() rejects unknown types (`unknown_type`) and unknown, missing or mistyped fields
#   (`schema`): a v1 receiver accepts exactly what the table says, so growth happens by new
#   versions, new types and new optional keys negotiated through hello/welcome;
# - encode() validates too: a malformed message is a bug in the sender and raises ValueError.
# - every valid message fits one frame (cose.MAX_PAYLOAD, 951 bytes): the limits are set so;
# The table is text, parsed when a type is used (and cached on the host): as Python tuples it
# would cost ~14 KB of a device's 64 KB heap. The rest of the module is written for that heap
# too: the `_HOST` parts are left out of the device's build (tools/terse.py), and string
# constants are qstrs (short, not in constant tuples) rather than str objects of 64 B each.
#
# Specs: 0..N uint range; u8 u16 u32 u64 uint of that width; int; bool; bstrN (exactly N bytes);
# bstrA..B; tstrN (at most N bytes of UTF-8); [S]N list of at most N; (S,S) fixed array;
# {name} a struct defined below; map(K=V)N open map of at most N; S|S the first that fits.

import sys

from . import cbor
from .errors import ProtocolError

_dumps, _loads = cbor.dumps, cbor.loads  # the pure codec (the host's cbor2: messages_fast)

VERSIONS = (1,)
D2H = "d2h"  # directions
H2D = "h2d"
BOTH = "both"
HANDSHAKE = "handshake"  # epochs
SESSION = "session"
ANY = "any"

_TABLE = """
1 hello d2h handshake once
 1! versions [u16]8
 2! nonce bstr16
 3! firmware tstr32
 4! board tstr16
 5 reset_cause tstr16
2 welcome h2d handshake reliable
 1! version u16
 2! host_nonce bstr16
 3! device_nonce bstr16
 4 host_time_ms u64
3 scan d2h session reliable
 1! scan_id u32
 2! symbology tstr4
 3! data bstr0..512
 4! time_ms u64
4 verdict h2d session reliable
 1! scan_id u32
 2! outcome 0..15
 3! beep 0..15
 4! led 0..15
 5! text tstr48
 6 slip bstr0..768
5 keys h2d session reliable
 1! macro_id u32
 2! items [tstr48|(u8,u8)]16
 3 delay_ms 0..1000
6 print h2d session reliable
 1! job_id u32
 2! seq u16
 3! last bool
 4! data bstr1..768
7 rules h2d session reliable
 1! version u32
 2! default 0..2
 3! rules [{rule}]8
8 health_get h2d session reliable
9 health d2h session reliable
 1! uptime_ms u64
 2! reset_cause tstr16
 3! firmware tstr32
 4! heap_free u32
 5! heap_peak u32
 6! link map(u8=u32)32
 7! app map(tstr16=u32)24
10 logs_get h2d session reliable
 1 since u32
 2 max 0..12
11 logs d2h session reliable
 1! entries [(u32,u64,0..7,tstr48)]12
 2! next u32
12 config_get h2d session reliable
 1 keys [tstr16]12
13 config_set h2d session reliable
 1! values map(tstr16=bool|int|tstr48|bstr0..48)12
14 config d2h session reliable
 1! values map(tstr16=bool|int|tstr48|bstr0..48)12
15 ack both session once
 1! counter u32
16 nack both any once
 1 counter u32
 2! code u16
 3 detail tstr64
17 ping both session reliable
 1 data bstr0..64
18 pong both session reliable
 1 data bstr0..64
rule struct
 0! action 0..2
 1 symbologies [tstr4]4
 2 min_len u16
 3 max_len u16
 4 prefix bstr1..16
 5 check 0..1
"""

# verdict enumerations (SPEC.md, "verdict"), indexed by the numbers on the wire. Lists: the
# strings of a constant tuple would be str objects on the device
OUTCOMES = ["accepted", "refused", "offline", "verify_manually", "identified", "info"]
BEEPS = ["none", "ok", "error", "warning"]
LEDS = ["off", "green", "red", "amber", "blue"]

_HOST = sys.implementation.name != "micropython"
_T = _TABLE  # the text _head last found a head in (see _head)
_info = {}  # info()'s answers: every one asked for on the host, the last one on the device


def _is_int(v):
    return isinstance(v, int) and v is not True and v is not False


def _head(key):
    # the head line of a type number, type name or struct name: (its words, the offset of the
    # "\n" that ends it, the offset of the "\n" that ends its last field line); None if there is
    # none. Heads start in column 0 with a type's number or a struct's name; a type's name is the
    # second word; field lines start with a space. Found by str.find, and only the matching line
    # is split: on the device every temporary string costs heap. The firmware-update messages
    # (SPEC 6.8) have their own text (messages_fw), looked in when _TABLE has no such head: on
    # the device it costs heap only from an update's first message on. _T is the text the
    # offsets are in: the one the last _head found (one function: each costs heap for good).
    global _T
    k = str(key)
    t = _TABLE
    while True:
        at = t.find("\n%s " % k)
        if at < 0 and isinstance(key, str):  # a type's name: skip field lines with that word
            at = t.find(" %s " % k)
            while at >= 0 and t[t.rfind("\n", 0, at) + 1] == " ":
                at = t.find(" %s " % k, at + 1)
        if at >= 0:
            end = t.find("\n", at + 1)
            parts = t[t.rfind("\n", 0, at + 1) + 1 : end].split()
            if parts[0] == k or (len(parts) > 2 and parts[1] == k):
                break
        if t is not _TABLE:
            return None
        from . import messages_fw

        t = messages_fw.TABLE
    _T = t
    last = end
    while t.startswith(" ", last + 1):
        last = t.find("\n", last + 1)
    return parts, end, last


def _parse(s, i):
    # one spec (a choice of atoms) at s[i:]; returns (spec tuple, next index)
    alts = []
    while True:
        spec, i = _atom(s, i)
        alts.append(spec)
        if i < len(s) and s[i] == "|":
            i += 1
            continue
        break
    return (alts[0] if len(alts) == 1 else ("c", tuple(alts))), i


def _num(s, i):
    j = i
    while j < len(s) and "0" <= s[j] <= "9":
        j += 1
    return int(s[i:j]), j


def _atom(s, i):
    # few locals, reused, and no loops over tuples: the device parses a spec in the middle of a
    # decode, and a frame of more than 11 words would come from the heap
    c = s[i]
    if c == "[":
        a, i = _parse(s, i + 1)
        n, i = _num(s, i + 1)  # skip "]"
        return ("l", a, n), i
    if c == "(":
        a = []
        while s[i] != ")":
            n, i = _parse(s, i + 1)
            a.append(n)
        return ("a", tuple(a)), i + 1
    if c == "{":
        n = s.index("}", i)
        # the host holds the struct's parsed fields; the device only its name, and walks its
        # fields when a value is checked (a nested table is the largest parse there is)
        a = s[i + 1 : n]
        return ("s", fields(a) if _HOST else a), n + 1
    if s.startswith("map(", i):
        a, i = _parse(s, i + 4)
        c, i = _parse(s, i + 1)  # skip "="
        n, i = _num(s, i + 1)  # skip ")"
        return ("m", a, c, n), i
    if s.startswith("bool", i):
        return ("?",), i + 4
    if s.startswith("int", i):
        return ("i",), i + 3
    if c == "u":
        n, i = _num(s, i + 1)
        return ("u", (1 << n) - 1), i
    if s.startswith("bstr", i) or s.startswith("tstr", i):
        a, i = _num(s, i + 4)
        if c == "t":
            return ("t", a), i
        n = a
        if s.startswith("..", i):
            n, i = _num(s, i + 2)
        return ("b", a, n), i
    a, i = _num(s, i)  # "0..N"
    n, i = _num(s, i + 2)
    return ("u", n), i


def _lines(key):
    # the offsets of a type's or struct's field lines in _TABLE: what the device's _struct walks,
    # parsing one line at a time (small ints, where a parsed nested table would be the largest
    # object of a decode, and a generator's frame lives on the heap)
    _, a, end = _head(key)
    out = []
    while a < end:
        out.append(a + 1)
        a = _T.find("\n", a + 1)
    return out


def _field(a):
    # the field line at offset a: (key, name, spec, required)
    k, name, spec = _T[a : _T.find("\n", a)].split()
    return int(k.rstrip("!")), name, _parse(spec, 0)[0], k[-1] == "!"


def info(name):
    """(number, direction, epoch, reliable) of a message type name; KeyError if unknown."""
    if not isinstance(name, str):
        raise KeyError(name)
    out = _info.get(name)
    if out is None:
        h = _head(name)
        if h is None or h[0][1] != name:
            raise KeyError(name)
        p = h[0]
        out = (int(p[0]), p[2], p[3], p[4] == "reliable")
        if sys.implementation.name == "micropython":
            _info.clear()  # one is enough: a frame asks about its type several times
        _info[name] = out
    return out


def check_epoch(counter, msg):
    """Counter 0 carries handshake messages only, counters from 1 session messages only."""
    epoch = info(msg["type"])[2]
    if counter == 0 and epoch == SESSION:
        raise ProtocolError("no_session", "session message %s before the handshake" % msg["type"])
    if counter != 0 and epoch == HANDSHAKE:
        raise ProtocolError("handshake", "%s inside a session" % msg["type"])


def common_version(mine, theirs):
    """The highest version both sides speak, or ProtocolError("version")."""
    best = None
    for v in theirs:
        if v in mine and (best is None or v > best):
            best = v
    if best is None:
        raise ProtocolError("version", "no common protocol version in %r" % (theirs,))
    return best


# The checks below raise ValueError(reason) and have no try blocks: they recurse (rules: message
# -> list -> struct -> list -> text), and on the device a call whose state is more than 11 words
# (a try block alone takes 3) gets its frame from the heap. Hence also one argument, `walk`, for
# the walk's state: walk[0] is its direction (True: to the wire), walk[1:] the names of the fields
# being checked, outermost first; the one try, at the top, makes them "rules: action: reason".


def _check(spec, v, walk):
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
        if not isinstance(v, str) or len(v.encode()) > spec[1]:
            raise ValueError("expected text of at most %d UTF-8 bytes" % spec[1])
        return v
    if kind == "?":
        if v is not True and v is not False:
            raise ValueError("expected bool")
        return v
    if kind == "l":
        if not isinstance(v, (list, tuple)) or len(v) > spec[2]:
            raise ValueError("expected list of at most %d" % spec[2])
        return _items(spec, v, walk)
    if kind == "a":
        if not isinstance(v, (list, tuple)) or len(v) != len(spec[1]):
            raise ValueError("expected array of %d" % len(spec[1]))
        return _items(spec, v, walk)
    if kind == "s":
        if not isinstance(v, dict):
            raise ValueError("expected map")
        return _struct(spec[1] if _HOST else _lines(spec[1]), v, 0, walk)
    if kind == "m":
        if not isinstance(v, dict) or len(v) > spec[3]:
            raise ValueError("expected map of at most %d" % spec[3])
        return _map(spec, v, walk)
    return _choice(spec[1], v, walk)


def _items(spec, v, walk):
    # a list ("l": one spec for all) or a fixed array ("a": a spec per position)
    out = [None] * len(v)
    for i in range(len(v)):
        out[i] = _check(spec[1] if spec[0] == "l" else spec[1][i], v[i], walk)
    return out


def _map(spec, v, walk):
    out = {}
    for k in sorted(v, key=cbor.dumps) if walk[0] else v:
        out[_check(spec[1], k, walk)] = _check(spec[2], v[k], walk)
    return out


def _choice(alts, v, walk):
    # "c": the first alternative that fits
    depth = len(walk)
    for s in alts:
        try:
            return _check(s, v, walk)
        except ValueError:
            del walk[depth:]  # the names the failed alternative had entered
    raise ValueError("no alternative fits")


def _struct(flds, v, seen, walk):
    # to the wire: named dict -> int-keyed dict in ascending key order (deterministic); from the
    # wire the reverse. `flds`: the fields on the host, the offsets of their lines on the device.
    # `seen` starts at the number of keys the caller accounts for (the type's)
    out = {}
    for fld in flds:
        key, name, spec, required = fld if _HOST else _field(fld)
        src, dst = (name, key) if walk[0] else (key, name)
        if src in v:
            seen += 1
            walk.append(name)
            out[dst] = _check(spec, v[src], walk)
            walk.pop()
        elif required:
            raise ValueError("missing field %s" % name)
    if seen != len(v):
        raise ValueError("unknown field")
    return out


def to_wire(msg):
    """Named message dict -> wire map (ValueError if the message is not valid)."""
    if not isinstance(msg, dict):
        raise ValueError("a message is a dict")
    try:
        num = info(msg.get("type"))[0]
    except KeyError:
        raise ValueError("unknown message type %r" % (msg.get("type"),)) from None
    out = {0: num}
    walk = [True]
    try:
        out.update(_struct(fields(num) if _HOST else _lines(num), msg, 1, walk))
    except ValueError as e:
        raise ValueError(": ".join(walk[1:] + [e.args[0]])) from None
    return out


def from_wire(w):
    """Wire map -> named message dict, or ProtocolError(unknown_type | schema)."""
    if not isinstance(w, dict):
        raise ProtocolError("schema", "a message is a map")
    num = w.get(0)
    h = _head(num) if _is_int(num) else None
    if h is None:
        raise ProtocolError("unknown_type", "message type %r" % (num,))
    walk = [False, h[0][1]]
    try:
        out = _struct(fields(num) if _HOST else _lines(num), w, 1, walk)
    except ValueError as e:
        raise ProtocolError("schema", ": ".join(walk[1:] + [e.args[0]])) from None
    out["type"] = walk[1]
    return out


# encode() and decode() by the table. An ack is the link's most frequent message (one per
# reliable message each way), so they skip parsing its table entry: {0: 15, 1: counter} is built
# and recognised directly. Same bytes and results as the general path (tests compare them);
# anything else takes that path. The host's faster ones are in messages_fast.py, chosen in
# codecs.py; this module never imports them.


def encode(msg):
    """Named message dict -> CBOR payload (ValueError if the message is not valid)."""
    if isinstance(msg, dict) and len(msg) == 2 and msg.get("type") == "ack":
        c = msg.get("counter")
        if _is_int(c) and 0 <= c <= 0xFFFFFFFF:
            return b"\xa2\x00\x0f\x01" + cbor.head(0, c)  # map(2), 0: 15, 1: counter
    return _dumps(to_wire(msg))


def decode(payload):
    """CBOR payload -> named message dict, or ProtocolError (cbor codes, unknown_type, schema)."""
    w = _loads(payload)
    if isinstance(w, dict) and len(w) == 2 and w.get(0) == 15:
        c = w.get(1)
        if _is_int(c) and 0 <= c <= 0xFFFFFFFF:
            return {"type": "ack", "counter": c}
    return from_wire(w)


if _HOST:  # the table as dicts and tuples, for host code and tests; not in the device's build
    _fields = {}

    def fields(key):
        """The fields of a type number or struct name: ((key, name, spec, required), ...)."""
        if key not in _fields:
            _fields[key] = tuple(_field(a) for a in _lines(key))
        return _fields[key]

    NUMBER = {}  # name -> number
    TYPES = {}  # number -> (name, direction, epoch, reliable, fields)
    from . import messages_fw

    for _line in (_TABLE + messages_fw.TABLE).splitlines():
        if _line[:1].isdigit():  # a type's head line
            _name = _line.split()[1]
            _t = info(_name)
            NUMBER[_name] = _t[0]
            TYPES[_t[0]] = (_name,) + _t[1:] + (fields(_t[0]),)

    def type_info(num):
        """(name, direction, epoch, reliable) of a type number, or None."""
        return TYPES[num][:4] if _is_int(num) and num in TYPES else None
