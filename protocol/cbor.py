# The CBOR profile of the hexiao link (SPEC.md, "CBOR profile"): a strict, deterministic subset of
# RFC 8949 that runs unchanged on MicroPython.
#
# Rules kept here:
# - data model: int (64-bit), bytes, str, list, dict (keys int or str), True, False, None; nothing
#   else (floats, tags, undefined, simple values) is in the profile;
# - encoding is RFC 8949 §4.2.1 core deterministic: shortest heads, definite lengths, map keys
#   sorted by the bytewise order of their encodings, no duplicate keys;
# - decoding is strict and classifies every failure with one error code, by this precedence:
#   `truncated` (input ends inside an item) and `cbor` (ill-formed, too deep, trailing bytes,
#   invalid UTF-8) stop the decoder at once; an item outside the profile is `cbor` once the whole
#   item has been read; otherwise any non-deterministic encoding is `non_canonical`.
# The host decodes with cbor2 for speed and asks this decoder for the error code when cbor2's result
# does not pass (codec_fast.py); the tests check that both paths agree.

import sys

from .errors import ProtocolError

MAX_DEPTH = 8
# MicroPython's str() accepts overlong forms, surrogates and code points above U+10FFFF, which
# CPython (and RFC 3629) refuse: the device checks UTF-8 itself so both sides agree
_LAX_UTF8 = sys.implementation.name == "micropython"


def _utf8_ok(b):
    i = 0
    n = len(b)
    while i < n:
        c = b[i]
        if c < 0x80:
            i += 1
            continue
        if 0xC2 <= c <= 0xDF:
            need, lo, hi = 1, 0x80, 0xBF
        elif c == 0xE0:
            need, lo, hi = 2, 0xA0, 0xBF  # no overlong 3-byte forms
        elif c == 0xED:
            need, lo, hi = 2, 0x80, 0x9F  # no surrogates
        elif 0xE1 <= c <= 0xEF:
            need, lo, hi = 2, 0x80, 0xBF
        elif c == 0xF0:
            need, lo, hi = 3, 0x90, 0xBF  # no overlong 4-byte forms
        elif 0xF1 <= c <= 0xF3:
            need, lo, hi = 3, 0x80, 0xBF
        elif c == 0xF4:
            need, lo, hi = 3, 0x80, 0x8F  # nothing above U+10FFFF
        else:
            return False
        if i + need >= n:
            return False  # the sequence runs past the end
        if not lo <= b[i + 1] <= hi:
            return False
        for j in range(i + 2, i + need + 1):
            if not 0x80 <= b[j] <= 0xBF:
                return False
        i += need + 1
    return True


def _head(major, n):
    mt = major << 5
    if n < 24:
        return bytes((mt | n,))
    if n < 0x100:
        return bytes((mt | 24, n))
    if n < 0x10000:
        return bytes((mt | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((mt | 26,)) + n.to_bytes(4, "big")
    if n < 0x10000000000000000:
        return bytes((mt | 27,)) + n.to_bytes(8, "big")
    raise ValueError("integer out of CBOR range")


head = _head  # the deterministic head of an item, for hand-built COSE structures (an alias,
# not a wrapper: every function is bytecode in the device's heap)


def dumps(obj):
    out = bytearray()  # one growing buffer: no small object per item (the device's heap)
    _enc(obj, out)
    return bytes(out)


def _put(out, major, n):
    if n < 24:
        out.append((major << 5) | n)
    else:
        out.extend(_head(major, n))


def _enc(obj, out):
    # bool before int: bool is an int subclass on both CPython and MicroPython
    if obj is True:
        out.append(0xF5)
    elif obj is False:
        out.append(0xF4)
    elif obj is None:
        out.append(0xF6)
    elif isinstance(obj, int):
        if obj >= 0:
            _put(out, 0, obj)
        else:
            _put(out, 1, -1 - obj)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        _put(out, 2, len(obj))
        out.extend(obj)
    elif isinstance(obj, str):
        b = obj.encode("utf-8")
        _put(out, 3, len(b))
        out.extend(b)
    elif isinstance(obj, (list, tuple)):
        _put(out, 4, len(obj))
        for item in obj:
            _enc(item, out)
    elif isinstance(obj, dict):
        enc = {}  # encoded key -> value: sorting the encoded keys gives the deterministic order
        for k, v in obj.items():
            if k is True or k is False or not isinstance(k, (int, str)):
                raise ValueError("map keys must be int or str")
            enc[dumps(k)] = v  # distinct int and str keys never share an encoding
        _put(out, 5, len(enc))
        for kb in sorted(enc):
            out.extend(kb)
            _enc(enc[kb], out)
    else:
        raise ValueError("type not in the CBOR profile: %s" % type(obj).__name__)


class _Decoder:
    # `late` is the error reported once the whole top-level item has been read: the first
    # out-of-profile item (`cbor`), else the first non-deterministic encoding (`non_canonical`).
    # Its texts are ProtocolError details, which the device build leaves out.
    def __init__(self, data):
        self.data = data
        self.pos = 0
        self.late = None

    def _take(self, n):
        end = self.pos + n
        if end > len(self.data):
            raise ProtocolError("truncated", "input ends inside an item")
        b = self.data[self.pos : end]
        self.pos = end
        return b

    def _arg(self, ai):
        # returns (value, definite); records non-shortest heads
        if ai < 24:
            return ai, True
        if ai == 31:
            return None, False
        if ai > 27:
            raise ProtocolError("cbor", "reserved additional information")
        size = 1 << (ai - 24)
        v = int.from_bytes(self._take(size), "big")
        if (ai == 24 and v < 24) or (ai > 24 and v < (1 << (4 << (ai - 24)))):
            self._defer(ProtocolError("non_canonical",
                                      "integer or length not in its shortest form"))
        return v, True

    def _defer(self, err):
        if self.late is None or (err.code == "cbor" and self.late.code != "cbor"):
            self.late = err

    def item(self, depth):
        if depth > MAX_DEPTH:
            raise ProtocolError("cbor", "nesting deeper than %d" % MAX_DEPTH)
        ib = self._take(1)[0]
        major = ib >> 5
        ai = ib & 0x1F
        if major == 7:
            return self._simple(ai)
        v, definite = self._arg(ai)
        if not definite and (major < 2 or major == 6):
            raise ProtocolError("cbor", "indefinite length on an integer or tag")
        if major == 0:
            return v
        if major == 1:
            return -1 - v
        if major == 2 or major == 3:
            if definite:
                raw = self._take(v)
            else:
                self._defer(ProtocolError("non_canonical", "indefinite-length string"))
                raw = self._chunks(major)
            if major == 2:
                return bytes(raw)
            if _LAX_UTF8 and not _utf8_ok(raw):
                raise ProtocolError("cbor", "text string is not valid UTF-8")
            try:
                return str(raw, "utf-8")
            except UnicodeError:
                raise ProtocolError("cbor", "text string is not valid UTF-8") from None
        if major == 4:
            out = []
            if definite:
                for _ in range(v):
                    out.append(self.item(depth + 1))
            else:
                self._defer(ProtocolError("non_canonical", "indefinite-length array"))
                while not self._at_break():
                    out.append(self.item(depth + 1))
            return out
        if major == 5:
            return self._map(v, definite, depth)
        # major 6: a tag; read its content, then report it as out of profile
        self._defer(ProtocolError("cbor", "not in the profile: tag %d" % v))
        self.item(depth + 1)
        return None

    def _simple(self, ai):
        if ai == 20:
            return False
        if ai == 21:
            return True
        if ai == 22:
            return None
        if ai == 31:
            raise ProtocolError("cbor", "break outside an indefinite-length item")
        if ai > 27:
            raise ProtocolError("cbor", "reserved additional information")
        if ai == 24:
            if self._take(1)[0] < 32:
                raise ProtocolError("cbor", "simple value in two-byte form below 32")
        elif ai > 24:
            self._take(1 << (ai - 24))
        self._defer(ProtocolError("cbor", "not in the profile: float or simple value"))
        return None

    def _at_break(self):
        if self.pos >= len(self.data):
            raise ProtocolError("truncated", "input ends inside an item")
        if self.data[self.pos] == 0xFF:
            self.pos += 1
            return True
        return False

    def _chunks(self, major):
        out = bytearray()
        while not self._at_break():
            ib = self._take(1)[0]
            if ib >> 5 != major or (ib & 0x1F) == 31:
                raise ProtocolError("cbor", "bad chunk in indefinite-length string")
            n, _ = self._arg(ib & 0x1F)
            out.extend(self._take(n))
        return out

    def _map(self, v, definite, depth):
        out = {}
        prev = None
        count = 0
        while (count < v) if definite else not self._at_break():
            start = self.pos
            k = self.item(depth + 1)
            kb = bytes(self.data[start : self.pos])  # bytes: memoryviews do not order
            val = self.item(depth + 1)
            count += 1
            if k is True or k is False or not isinstance(k, (int, str)):
                self._defer(ProtocolError("cbor", "not in the profile: map key that is not an int"
                                          " or a text string"))
                continue
            if prev is not None and kb <= prev:
                self._defer(ProtocolError("non_canonical",
                                          "map keys not in deterministic order, or duplicated"))
            prev = kb
            out[k] = val
        if not definite:
            self._defer(ProtocolError("non_canonical", "indefinite-length map"))
        return out


def loads(data):
    """Decode exactly one CBOR item of the profile; raise ProtocolError otherwise. `data` may be
    a memoryview (no copy of the input is made; byte strings in the result are copies)."""
    d = _Decoder(data)
    obj = d.item(0)
    if d.pos != len(data):
        raise ProtocolError("cbor", "trailing bytes after the item")
    if d.late is not None:
        raise d.late
    return obj
