"""The deterministic CBOR profile (cbor.py) and the host fast path (codec_fast.py)."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hexiao.protocol import cbor, codec_fast, messages
from hexiao.protocol.errors import ProtocolError
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import NO_SHRINK, Mutator, any_message, profile_values, ref_dumps, ref_head, same


def outcome(loads, data: bytes) -> tuple:
    try:
        return ("ok", loads(data))
    except ProtocolError as e:
        return ("err", e.code, e.detail)


def assert_same_outcome(data: bytes) -> tuple:
    fast, pure = outcome(codec_fast.loads, data), outcome(cbor.loads, data)
    assert fast[0] == pure[0], (data.hex(), fast, pure)
    if fast[0] == "ok":
        assert same(fast[1], pure[1]), (data.hex(), fast, pure)
    else:
        assert fast == pure, data.hex()
    return pure


# -- encoding ---------------------------------------------------------------------------------


@settings(max_examples=300)
@given(profile_values())
def test_round_trip(v: Any) -> None:
    enc = cbor.dumps(v)
    assert enc == ref_dumps(v)
    assert same(cbor.loads(enc), v)
    assert same(codec_fast.loads(enc), v)
    assert cbor.dumps(v) == enc  # deterministic: the same bytes again


@settings(max_examples=200)
@given(any_message())
def test_fast_dumps_emits_the_deterministic_bytes(msg: dict) -> None:
    wire = messages.to_wire(msg)
    enc = cbor.dumps(wire)
    assert codec_fast.dumps(wire) == enc
    assert enc == ref_dumps(wire)
    assert messages.encode(msg) == enc


@pytest.mark.parametrize(
    ("value", "hexenc"),
    [
        (0, "00"),
        (23, "17"),
        (24, "1818"),
        (255, "18ff"),
        (256, "190100"),
        (65536, "1a00010000"),
        ((1 << 32), "1b0000000100000000"),
        ((1 << 64) - 1, "1bffffffffffffffff"),
        (-1, "20"),
        (-(1 << 64), "3bffffffffffffffff"),
        (b"", "40"),
        ("", "60"),
        ("ü", "62c3bc"),
        ([], "80"),
        ({}, "a0"),
        (False, "f4"),
        (True, "f5"),
        (None, "f6"),
        # bytewise key order (RFC 8949 §4.2.1), not RFC 7049's length-first order
        ({-1: 0, 100: 0}, "a2186400" "2000"),
        ({"a": 0, 1000: 0}, "a21903e800" "616100"),
        ({"b": 1, "a": 2, 0: 3}, "a3" "0003" "616102" "616201"),
        ((1, 2), "820102"),
    ],
)
def test_dumps_known_values(value: Any, hexenc: str) -> None:
    assert cbor.dumps(value).hex() == hexenc
    want = list(value) if isinstance(value, tuple) else value
    assert same(cbor.loads(bytes.fromhex(hexenc)), want)


@pytest.mark.parametrize(
    "value",
    [1.0, 1 << 64, -(1 << 64) - 1, {True: 1}, {b"k": 1}, {(1,): 1}, {None: 1}, {1, 2}, object()],
)
def test_dumps_rejects_values_outside_the_profile(value: Any) -> None:
    with pytest.raises(ValueError):
        cbor.dumps(value)


def test_head() -> None:
    for major in range(8):
        for n in (0, 23, 24, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 64) - 1):
            assert cbor.head(major, n) == ref_head(major, n)
    with pytest.raises(ValueError):
        cbor.head(0, 1 << 64)


# -- decoding: explicit cases, by the precedence rules in cbor.py's header -------------------

ERROR_CASES = [
    # truncated: the input ends inside an item
    ("", "truncated"),
    ("18", "truncated"),
    ("1900", "truncated"),
    ("1b00000000000000", "truncated"),
    ("42aa", "truncated"),
    ("646162", "truncated"),
    ("8201", "truncated"),
    ("a101", "truncated"),
    ("9f01", "truncated"),
    ("5f4100", "truncated"),
    ("bf0100", "truncated"),
    ("c0", "truncated"),
    ("f9", "truncated"),
    ("fa0000", "truncated"),
    # cbor: ill-formed
    ("1c", "cbor"),
    ("1d", "cbor"),
    ("1e", "cbor"),
    ("1f", "cbor"),  # indefinite integer
    ("3f", "cbor"),
    ("df00", "cbor"),  # indefinite tag
    ("ff", "cbor"),  # break outside an indefinite item
    ("81ff", "cbor"),
    ("fc", "cbor"),
    ("fe", "cbor"),
    ("f800", "cbor"),  # two-byte simple value below 32
    ("f814", "cbor"),  # false in the two-byte form
    ("5f01ff", "cbor"),  # chunk of another major type
    ("5f5f41ffff", "cbor"),  # nested indefinite chunk
    ("7f4161ff", "cbor"),  # byte-string chunk in a text string
    ("5c", "cbor"),
    # cbor: trailing bytes
    ("0000", "cbor"),
    ("8000", "cbor"),
    ("a0ff", "cbor"),
    # cbor: invalid UTF-8
    ("61ff", "cbor"),
    ("62c328", "cbor"),
    ("62c0af", "cbor"),  # overlong
    ("63eda080", "cbor"),  # a surrogate
    ("64f4908080", "cbor"),  # above U+10FFFF
    ("7f61ffff", "cbor"),
    # cbor: too deep (items below depth MAX_DEPTH)
    ("81" * (cbor.MAX_DEPTH + 1) + "00", "cbor"),
    ("a100" * (cbor.MAX_DEPTH + 1) + "00", "cbor"),
    ("81" * 500 + "00", "cbor"),
    # cbor: outside the profile (floats, simple values, tags, odd map keys)
    ("f93c00", "cbor"),
    ("fa3f800000", "cbor"),
    ("fb3ff0000000000000", "cbor"),
    ("f97e00", "cbor"),  # NaN
    ("f7", "cbor"),  # undefined
    ("e0", "cbor"),  # simple(0)
    ("f3", "cbor"),  # simple(19)
    ("f820", "cbor"),  # simple(32)
    ("c074323031332d30332d32315432303a30343a30305a", "cbor"),
    ("c249010000000000000000", "cbor"),  # bignum 2^64
    ("c34100", "cbor"),
    ("d1820102", "cbor"),
    ("d81180", "cbor"),
    ("a14100f6", "cbor"),  # bytes key
    ("a1f500", "cbor"),  # bool key
    ("a1f600", "cbor"),  # null key
    ("a18000", "cbor"),  # array key
    ("a1a000", "cbor"),  # map key
    ("a1f93c0000", "cbor"),  # float key
    # non_canonical: well-formed, in the profile, not deterministic
    ("1817", "non_canonical"),
    ("190017", "non_canonical"),
    ("1900ff", "non_canonical"),
    ("1a0000ffff", "non_canonical"),
    ("1b00000000ffffffff", "non_canonical"),
    ("3800", "non_canonical"),
    ("5800", "non_canonical"),
    ("590001aa", "non_canonical"),
    ("7800", "non_canonical"),
    ("9800", "non_canonical"),
    ("b800", "non_canonical"),
    ("5fff", "non_canonical"),
    ("5f4161ff", "non_canonical"),
    ("7f6161ff", "non_canonical"),
    ("9fff", "non_canonical"),
    ("9f01ff", "non_canonical"),
    ("bfff", "non_canonical"),
    ("bf0100ff", "non_canonical"),
    ("a202000100", "non_canonical"),  # unsorted
    ("a201000100", "non_canonical"),  # duplicate
    ("a2616100616100", "non_canonical"),  # duplicate text key
    ("a22000" "186400", "non_canonical"),  # length-first order is not bytewise order
    ("a2616100" "1903e800", "non_canonical"),
    ("a2616100" "0100", "non_canonical"),
    ("a1181700", "non_canonical"),  # a non-shortest key
    # precedence
    ("a202f93c000100", "cbor"),  # outside the profile beats non-deterministic
    ("82f93c001801", "cbor"),
    ("c01801", "cbor"),
    ("1801" "00", "cbor"),  # trailing beats non-deterministic
    ("f93c00" "00", "cbor"),
    ("82f93c00", "truncated"),  # truncated beats outside the profile
    ("821801", "truncated"),  # truncated beats non-deterministic
    ("82f93c0062c328", "cbor"),  # invalid UTF-8 stops at once
    ("82181862c328", "cbor"),
    ("9f" * 9 + "00", "cbor"),  # too deep beats indefinite
]


@pytest.mark.parametrize(("hexenc", "code"), ERROR_CASES)
def test_decode_error_codes(hexenc: str, code: str) -> None:
    data = bytes.fromhex(hexenc)
    with pytest.raises(ProtocolError) as ei:
        cbor.loads(data)
    assert ei.value.code == code, ei.value.detail
    with pytest.raises(ProtocolError) as ei2:
        codec_fast.loads(data)
    assert ei2.value.code == code


@pytest.mark.parametrize(
    "hexenc",
    ["a1" "c249010000000000000000" "01", "a1" "c349010000000000000000" "01"],
)
def test_fast_loads_rejects_bignum_map_keys(hexenc: str) -> None:
    # regression: the cbor2 path accepted these (cbor2 re-emits the tag, so the bytes matched)
    data = bytes.fromhex(hexenc)
    with pytest.raises(ProtocolError) as ei:
        cbor.loads(data)
    assert ei.value.code == "cbor"
    assert assert_same_outcome(data)[:2] == ("err", "cbor")


def _nested(leaf: Any, n: int) -> Any:
    for _ in range(n):
        leaf = [leaf]
    return leaf


@pytest.mark.parametrize(
    ("hexenc", "value"),
    [
        ("81" * cbor.MAX_DEPTH + "00", _nested(0, cbor.MAX_DEPTH)),  # a leaf at depth MAX_DEPTH
        ("81" * cbor.MAX_DEPTH + "80", _nested([], cbor.MAX_DEPTH)),  # empty container there
        ("1bffffffffffffffff", (1 << 64) - 1),
        ("3bffffffffffffffff", -(1 << 64)),
        ("63e282ac", "€"),
        ("64f0908d88", "𐍈"),
        ("a2" "186400" "2000", {100: 0, -1: 0}),
    ],
)
def test_decode_accepts(hexenc: str, value: Any) -> None:
    assert same(cbor.loads(bytes.fromhex(hexenc)), value)
    assert same(codec_fast.loads(bytes.fromhex(hexenc)), value)


def test_decode_split_character_in_indefinite_text_is_rejected() -> None:
    # RFC 8949 §3.2.3: a chunk boundary may not split a UTF-8 character; whatever the code, the
    # decoders must agree and must not accept it
    data = bytes.fromhex("7f61c361bcff")
    assert assert_same_outcome(data)[0] == "err"


# -- decoding: differential, the host fast path against the pure decoder ---------------------


@settings(max_examples=1000)
@given(st.binary(max_size=64))
def test_fast_and_pure_loads_agree_on_any_bytes(data: bytes) -> None:
    assert_same_outcome(data)


_CBORISH = st.lists(
    st.one_of(
        st.sampled_from(
            [b"\x18", b"\x19", b"\x1a", b"\x1b", b"\x5f", b"\x7f", b"\x9f", b"\xbf", b"\xff",
             b"\xf9", b"\xc2", b"\xd1", b"\x81", b"\xa1", b"\x61", b"\x41", b"\x00", b"\x17"]
        ),
        st.binary(max_size=3),
    ),
    max_size=24,
).map(b"".join)


@settings(max_examples=1000)
@given(_CBORISH)
def test_fast_and_pure_loads_agree_on_cbor_like_bytes(data: bytes) -> None:
    assert_same_outcome(data)


@settings(max_examples=600, phases=NO_SHRINK)
@given(
    profile_values(),
    st.randoms(use_true_random=False),
    st.sampled_from([0.02, 0.1, 0.3]),
    st.booleans(),
)
def test_mutated_encodings(v: Any, rnd: random.Random, rate: float, only_loose: bool) -> None:
    m = Mutator(rnd, rate, only_loose)
    data = m.encode(v)
    got = assert_same_outcome(data)
    want = m.expected()
    if want is None:
        assert got[0] == "ok"
        assert same(got[1], v)
        assert data == cbor.dumps(v)
    else:
        assert got[:2] == ("err", want), (data.hex(), got, m.__dict__)


@settings(max_examples=200, phases=NO_SHRINK)
@given(any_message(), st.randoms(use_true_random=False))
def test_mutated_messages(msg: dict, rnd: random.Random) -> None:
    wire = messages.to_wire(msg)
    m = Mutator(rnd, 0.05)
    data = m.encode(wire)
    got = assert_same_outcome(data)
    want = m.expected()
    assert (got[0] == "ok") == (want is None)
    if want is not None:
        assert got[1] == want
