"""Hypothesis strategies shared by the protocol tests.

Valid messages are built from `messages.TYPES` itself, so a type or field added to the table is
covered without touching the tests. `profile_values` draws any value of the CBOR profile.
"""

from __future__ import annotations

import random
import struct
from typing import Any

from hexiao.protocol import cbor, messages
from hypothesis import Phase
from hypothesis import strategies as st

# for tests driven by a seeded random.Random: hypothesis cannot shrink those usefully, and trying
# takes minutes; a failure still reports the seed that reproduces it
NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)

INT_MIN = -(1 << 64)
INT_MAX = (1 << 64) - 1


def fit_utf8(text: str, n: int) -> str:
    """`text` cut to at most `n` bytes of UTF-8, at a character boundary."""
    while len(text.encode()) > n:
        text = text[:-1]
    return text


def spec_values(spec: tuple) -> st.SearchStrategy[Any]:
    """Values that satisfy one field spec of messages.py (in named form)."""
    kind = spec[0]
    if kind == "u":
        return st.integers(0, spec[1])
    if kind == "i":
        return st.integers(-(1 << 63), (1 << 63) - 1)
    if kind == "b":
        return st.binary(min_size=spec[1], max_size=spec[2])
    if kind == "t":  # at most N bytes of UTF-8
        n = spec[1]
        return st.text(max_size=n).map(lambda t: fit_utf8(t, n))
    if kind == "?":
        return st.booleans()
    if kind == "l":
        return st.lists(spec_values(spec[1]), max_size=spec[2])
    if kind == "a":
        return st.tuples(*(spec_values(s) for s in spec[1])).map(list)
    if kind == "s":
        return _struct(spec[1])
    if kind == "m":
        return st.dictionaries(spec_values(spec[1]), spec_values(spec[2]), max_size=spec[3])
    if kind == "c":
        return st.one_of(*(spec_values(s) for s in spec[1]))
    raise AssertionError(f"unknown spec kind {kind!r}")


def _struct(fields: tuple, extra: dict | None = None) -> st.SearchStrategy[dict]:
    required = {name: spec_values(spec) for _, name, spec, req in fields if req}
    optional = {name: spec_values(spec) for _, name, spec, req in fields if not req}
    required.update(extra or {})
    return st.fixed_dictionaries(required, optional=optional)


def message(name: str) -> st.SearchStrategy[dict]:
    """A valid named message of type `name`."""
    fields = messages.TYPES[messages.NUMBER[name]][4]
    return _struct(fields, {"type": st.just(name)})


TYPE_NAMES = tuple(t[0] for t in messages.TYPES.values())


def any_message() -> st.SearchStrategy[dict]:
    return st.sampled_from(TYPE_NAMES).flatmap(message)


def app_message(direction: str) -> st.SearchStrategy[dict]:
    """Messages an application may hand to Link.send() in `direction` ("d2h" or "h2d"); they are
    kept small enough to fit one frame."""
    names = [
        t[0]
        for t in messages.TYPES.values()
        if t[1] in (direction, messages.BOTH) and t[0] not in ("hello", "welcome", "ack", "nack")
    ]
    return st.sampled_from(names).flatmap(message).filter(
        lambda m: len(messages.encode(m)) <= 600
    )


# -- the CBOR profile ------------------------------------------------------------------------

profile_ints = st.one_of(
    st.integers(-30, 30),
    st.sampled_from([23, 24, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, INT_MAX]),
    st.sampled_from([-24, -25, -256, -257, -65536, -65537, -(1 << 32), INT_MIN]),
    st.integers(INT_MIN, INT_MAX),
)
profile_scalars = st.one_of(
    profile_ints,
    st.binary(max_size=40),
    st.text(max_size=20),
    st.booleans(),
    st.none(),
)
map_keys = st.one_of(profile_ints, st.text(max_size=8))


def depth(v: Any) -> int:
    """Nesting depth of a value: 0 for a scalar, 1 + the deepest child for a container."""
    if isinstance(v, list):
        return 1 + max((depth(x) for x in v), default=0)
    if isinstance(v, dict):
        return 1 + max((depth(x) for x in v.values()), default=0)
    return 0


def profile_values(max_depth: int = cbor.MAX_DEPTH) -> st.SearchStrategy[Any]:
    """Any value of the profile whose leaves are at most `max_depth` deep (the root item is at
    depth 0 and cbor.loads accepts items down to depth MAX_DEPTH)."""
    return st.recursive(
        profile_scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(map_keys, inner, max_size=4)
        ),
        max_leaves=24,
    ).filter(lambda v: depth(v) <= max_depth)


def same(a: Any, b: Any) -> bool:
    """Equality that also compares types (True == 1 and 1 == 1.0 in Python, not in CBOR)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        if len(a) != len(b):
            return False
        for k, v in a.items():
            match = [k2 for k2 in b if same(k, k2)]
            if len(match) != 1 or not same(v, b[match[0]]):
                return False
        return True
    return a == b


# -- an independent reference encoder (RFC 8949 §4.2.1 core deterministic encoding) ----------


def ref_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for ai, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | ai]) + struct.pack(fmt, n)
    raise AssertionError("out of range")


def ref_dumps(v: Any) -> bytes:
    if v is False:
        return b"\xf4"
    if v is True:
        return b"\xf5"
    if v is None:
        return b"\xf6"
    if isinstance(v, int):
        return ref_head(0, v) if v >= 0 else ref_head(1, ~v)
    if isinstance(v, bytes):
        return ref_head(2, len(v)) + v
    if isinstance(v, str):
        b = v.encode()
        return ref_head(3, len(b)) + b
    if isinstance(v, list):
        return ref_head(4, len(v)) + b"".join(ref_dumps(x) for x in v)
    if isinstance(v, dict):
        pairs = sorted((ref_dumps(k), ref_dumps(x)) for k, x in v.items())
        return ref_head(5, len(v)) + b"".join(k + x for k, x in pairs)
    raise AssertionError(type(v))



class Mutator:
    """Encodes a profile value, sometimes wrongly; records which class of fault it introduced.

    loose: a non-deterministic encoding (-> non_canonical); odd: an item outside the profile
    (-> cbor); at most one fatal fault: invalid UTF-8, trailing bytes, too deep (-> cbor) or a
    truncation (-> truncated)."""

    def __init__(self, rnd: random.Random, rate: float, only_loose: bool = False) -> None:
        self.rnd = rnd
        self.rate = rate
        self.bad = 0.0 if only_loose else 1.0  # scales the odd and fatal faults
        self.loose = False
        self.odd = False
        self.fatal: str | None = None

    def hit(self, scale: float = 1.0) -> bool:
        return self.rnd.random() < self.rate * scale

    def head(self, major: int, n: int) -> bytes:
        if self.hit():
            shortest = ref_head(major, n)
            wider = [ai for ai, size in ((24, 1), (25, 2), (26, 4), (27, 8))
                     if 1 + size > len(shortest) and n < 1 << (8 * size)]
            if wider:
                ai = self.rnd.choice(wider)
                self.loose = True
                return bytes([major << 5 | ai]) + n.to_bytes(1 << (ai - 24), "big")
        return ref_head(major, n)

    def odd_scalar(self) -> bytes:
        self.odd = True
        r = self.rnd
        return r.choice([
            lambda: b"\xf9" + r.randbytes(2),
            lambda: b"\xfa" + r.randbytes(4),
            lambda: b"\xfb" + r.randbytes(8),
            lambda: bytes([0xE0 + r.randrange(20)]),
            lambda: b"\xf7",
            lambda: b"\xf8" + bytes([r.randrange(32, 256)]),
        ])()

    def item(self, v: Any, level: int) -> bytes:
        # a tag adds a level to what it wraps: only where that stays within MAX_DEPTH
        if level + 1 + depth(v) <= cbor.MAX_DEPTH and self.hit(0.1 * self.bad):
            self.odd = True
            return self.head(6, self.rnd.choice([0, 1, 2, 17, 24, 55799, 1 << 40])) + self.item(
                v, level + 1
            )
        if not isinstance(v, (list, dict)) and self.hit(0.1 * self.bad):
            return self.odd_scalar()
        if v is True or v is False or v is None:
            return ref_dumps(v)
        if isinstance(v, int):
            return self.head(0, v) if v >= 0 else self.head(1, ~v)
        if isinstance(v, (bytes, str)):
            major = 2 if isinstance(v, bytes) else 3
            raw = v if isinstance(v, bytes) else v.encode()
            if major == 3 and self.fatal is None and self.hit(0.1 * self.bad):
                self.fatal = "cbor"
                raw = raw + self.rnd.choice([b"\xff", b"\xc3", b"\xc0\xaf", b"\xed\xa0\x80"])
            if self.hit():
                self.loose = True
                return bytes([major << 5 | 31]) + self.chunks(major, v, raw) + b"\xff"
            return self.head(major, len(raw)) + raw
        if isinstance(v, list):
            body = b"".join(self.item(x, level + 1) for x in v)
            if self.hit():
                self.loose = True
                return b"\x9f" + body + b"\xff"
            return self.head(4, len(v)) + body
        entries = sorted((ref_dumps(k), k, x) for k, x in v.items())
        pairs = [[self.item(k, level + 1), self.item(x, level + 1)] for _, k, x in entries]
        if len(pairs) >= 2 and self.hit():
            while pairs == sorted(pairs):
                self.rnd.shuffle(pairs)
            self.loose = True
        if pairs and self.hit(0.5):
            pairs.append(list(self.rnd.choice(pairs)))
            self.loose = True
        if pairs and self.hit(0.2 * self.bad):
            self.rnd.choice(pairs)[0] = self.rnd.choice(
                [b"\x41\x00", b"\xf5", b"\xf4", b"\xf6", b"\x40"]
            )
            self.odd = True
        body = b"".join(k + x for k, x in pairs)
        if self.hit():
            self.loose = True
            return b"\xbf" + body + b"\xff"
        return self.head(5, len(pairs)) + body

    def chunks(self, major: int, v: bytes | str, raw: bytes) -> bytes:
        # text chunks split at character boundaries only (RFC 8949 §3.2.3)
        cuts = sorted(self.rnd.sample(range(len(v) + 1), min(3, len(v) + 1)))
        if isinstance(v, str):
            parts = [v[a:b].encode() for a, b in zip([0, *cuts], [*cuts, len(v)], strict=True)]
            parts[-1] += raw[len(v.encode()):]  # the invalid UTF-8 tail, if any
        else:
            parts = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        return b"".join(self.head(major, len(p)) + p for p in parts)

    def encode(self, v: Any) -> bytes:
        out = self.item(v, 0)
        if self.fatal is None and self.hit(self.bad):
            self.fatal, out = self.rnd.choice([
                ("cbor", out + self.rnd.randbytes(self.rnd.randrange(1, 4))),
                ("truncated", out[: self.rnd.randrange(len(out))]),
                ("cbor", b"\x81" * (cbor.MAX_DEPTH + 1) + out),
            ])
        return out

    def expected(self) -> str | None:
        if self.fatal:
            return self.fatal
        if self.odd:
            return "cbor"
        return "non_canonical" if self.loose else None
