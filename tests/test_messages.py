"""v1 messages (messages.py): the TYPES table is the schema; decode accepts exactly what it says."""

from __future__ import annotations

import random
import struct
import types
from pathlib import Path
from typing import Any

import pytest
from hexiao.protocol import cbor, codec_fast, codecs, cose, frame, messages
from hexiao.protocol.errors import ProtocolError
from hexiao.tools.terse import terse
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import NO_SHRINK, TYPE_NAMES, Mutator, any_message, message, profile_values, same

# -- an independent reading of the table (wire form: int keys, lists, bytes) --------------------


def conforms(spec: tuple, v: Any) -> bool:
    k = spec[0]
    if k == "u":
        return type(v) is int and 0 <= v <= spec[1]
    if k == "i":
        return type(v) is int and -(1 << 63) <= v < (1 << 63)
    if k == "b":
        return type(v) is bytes and spec[1] <= len(v) <= spec[2]
    if k == "t":  # at most N bytes of UTF-8
        return type(v) is str and len(v.encode()) <= spec[1]
    if k == "?":
        return type(v) is bool
    if k == "l":
        return type(v) is list and len(v) <= spec[2] and all(conforms(spec[1], x) for x in v)
    if k == "a":
        return (type(v) is list and len(v) == len(spec[1])
                and all(conforms(s, x) for s, x in zip(spec[1], v, strict=True)))
    if k == "s":
        return type(v) is dict and struct_conforms(spec[1], v, set())
    if k == "m":
        return (type(v) is dict and len(v) <= spec[3]
                and all(conforms(spec[1], a) and conforms(spec[2], b) for a, b in v.items()))
    if k == "c":
        return any(conforms(s, v) for s in spec[1])
    raise AssertionError(k)


def struct_conforms(fields: tuple, v: dict, skip: set) -> bool:
    keys = {key for key, _, _, _ in fields}
    if any(key not in keys and key not in skip for key in v):
        return False
    for key, _, spec, required in fields:
        if key in v:
            if not conforms(spec, v[key]):
                return False
        elif required:
            return False
    return True


def wire_outcome(w: Any) -> tuple:
    """What decode() must say about the CBOR encoding of wire value `w`."""
    if not isinstance(w, dict):
        return ("err", "schema")
    num = w.get(0)
    if type(num) is not int or num not in messages.TYPES:
        return ("err", "unknown_type")
    fields = messages.TYPES[num][4]
    if not struct_conforms(fields, w, {0}):
        return ("err", "schema")
    return ("ok",)


def decode_outcome(payload: bytes) -> tuple:
    try:
        return ("ok", codecs.decode(payload))
    except ProtocolError as e:
        return ("err", e.code)


# -- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TYPE_NAMES)
@settings(max_examples=25)
@given(data=st.data())
def test_round_trip_every_type(name: str, data: st.DataObject) -> None:
    msg = data.draw(message(name))
    payload = codecs.encode(msg)
    assert same(codecs.decode(payload), msg)
    w = messages.to_wire(msg)
    assert w[0] == messages.NUMBER[name]
    assert list(w) == sorted(w)  # ascending keys, so cbor2 emits deterministic bytes
    assert payload == cbor.dumps(w) == codec_fast.dumps(w)
    assert same(messages.from_wire(w), msg)
    assert wire_outcome(w) == ("ok",)


@settings(max_examples=300)
@given(any_message())
def test_round_trip_any(msg: dict) -> None:
    assert same(codecs.decode(codecs.encode(msg)), msg)


def test_table() -> None:
    assert sorted(messages.NUMBER.values()) == sorted(messages.TYPES)
    assert len(set(TYPE_NAMES)) == len(TYPE_NAMES)
    for num, (name, direction, epoch, reliable, fields) in messages.TYPES.items():
        assert messages.info(name) == (num, direction, epoch, reliable)
        assert direction in (messages.D2H, messages.H2D, messages.BOTH)
        assert epoch in (messages.HANDSHAKE, messages.SESSION, messages.ANY)
        keys = [f[0] for f in fields]
        assert keys == sorted(set(keys)) and 0 not in keys
        assert len({f[1] for f in fields}) == len(fields)
        assert "type" not in {f[1] for f in fields}
    assert messages.VERSIONS == (1,)
    assert messages.info("hello")[1:] == ("d2h", "handshake", False)
    assert messages.info("ack")[3] is False and messages.info("nack")[3] is False
    assert messages.info("scan")[1:] == ("d2h", "session", True)
    with pytest.raises(KeyError):
        messages.info("nope")


# words of the table that are not type names: directions, epochs, a struct, field names, specs
_NOT_TYPES = ["d2h", "both", "session", "once", "reliable", "rule", "struct", "scan_id", "data",
              "u32", "1", "1!", "", " ", "scan ", " scan", "3 scan", "scan d2h", "scan\n"]


@pytest.mark.parametrize("word", _NOT_TYPES)
def test_only_type_names_have_info(word: str) -> None:
    with pytest.raises(KeyError):
        messages.info(word)
    with pytest.raises(ValueError):
        codecs.encode({"type": word})


def test_a_type_named_like_a_field_is_found_by_its_head() -> None:
    # "rules" and "keys" are also field names (rules.rules, config_get.keys)
    assert messages.info("rules")[0] == 7 and messages.info("keys")[0] == 5
    assert messages.TYPES[7][4][2][1] == "rules" and messages.TYPES[12][4][0][1] == "keys"


@pytest.mark.parametrize("num", [0, 25, 26, 100, -1, -3, (1 << 64) - 1])
def test_numbers_that_are_not_types(num: int) -> None:
    assert num not in messages.TYPES
    assert decode_outcome(cbor.dumps({0: num})) == ("err", "unknown_type")


def test_known_encoding() -> None:
    msg = {"type": "scan", "scan_id": 7, "symbology": "]Q1", "data": b"abc", "time_ms": 123}
    assert codecs.encode(msg).hex() == "a5" "0003" "0107" "02635d5131" "0343616263" "04187b"


# -- decode: the table, exactly -----------------------------------------------------------------

_POOL = [
    0, 1, 7, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, (1 << 63) - 1, 1 << 63,
    (1 << 64) - 1, -1, -(1 << 63), -(1 << 63) - 1, -(1 << 64), True, False, None,
    b"", b"x", b"x" * 16, b"y" * 17, b"z" * 65, "", "a", "]Q1", "abcde", "é" * 24, "é" * 25,
    [], [1], [1, 2], [[1, 2]], ["]Q1"], {}, {"a": 1}, {1: 2}, {0: 1}, {"a": "b" * 65},
]


def _mutate(w: dict, rnd: random.Random) -> dict:
    w = dict(w)
    for _ in range(rnd.randint(1, 3)):
        op = rnd.randrange(6)
        keys = list(w)
        if op == 0 and keys:
            w[rnd.choice(keys)] = rnd.choice(_POOL)  # wrong type / out of range
        elif op == 1 and keys:
            del w[rnd.choice(keys)]  # missing field (or type)
        elif op == 2:
            w[rnd.choice([rnd.randrange(0, 12), 99, -1, "x", "scan_id"])] = rnd.choice(_POOL)
        elif op == 3 and keys:
            k = rnd.choice(keys)
            v = w[k]
            if isinstance(v, list) and v:  # damage an item inside a list
                v = list(v)
                v[rnd.randrange(len(v))] = rnd.choice(_POOL)
                w[k] = v
            elif isinstance(v, (bytes, str, list)):  # one item longer
                w[k] = v + v[:1] if v else v
        elif op == 4:
            w[0] = rnd.choice([0, 99, 255, -3, "scan", None, 3, 4, 16])
        elif op == 5 and keys:
            k = rnd.choice(keys)
            if isinstance(w[k], dict):
                inner = dict(w[k])
                inner[rnd.choice([7, "zz", b"k"[0]])] = rnd.choice(_POOL)
                w[k] = inner
    return w


@settings(max_examples=1000, phases=NO_SHRINK)
@given(any_message(), st.randoms(use_true_random=False))
def test_decode_accepts_exactly_the_table(msg: dict, rnd: random.Random) -> None:
    w = _mutate(messages.to_wire(msg), rnd)
    got = decode_outcome(cbor.dumps(w))
    want = wire_outcome(w)
    if want[0] == "err":
        assert got == want, (w, got)
    else:
        assert got[0] == "ok", (w, got)
        assert same(messages.to_wire(got[1]), {k: w[k] for k in sorted(w)})


@settings(max_examples=300)
@given(profile_values(4))
def test_decode_any_profile_value(v: Any) -> None:
    got = decode_outcome(cbor.dumps(v))
    want = wire_outcome(v)
    assert got == want if want[0] == "err" else got[0] == "ok"


def _valid(name: str) -> dict:
    """A valid message with every optional field present."""
    fill = {
        "u": lambda s: s[1], "i": lambda s: -5, "b": lambda s: b"b" * s[1], "t": lambda s: "t",
        "?": lambda s: True, "l": lambda s: [], "a": lambda s: [0] * len(s[1]),
        "m": lambda s: {}, "c": lambda s: "t",
    }
    msg: dict[str, Any] = {"type": name}
    for _, fname, spec, _ in messages.TYPES[messages.NUMBER[name]][4]:
        msg[fname] = fill[spec[0]](spec)
    return msg


def _field_cases():
    for num, (name, _, _, _, fields) in messages.TYPES.items():
        for key, fname, spec, required in fields:
            yield pytest.param(num, key, fname, spec, required, id=f"{name}.{fname}")


def _min(spec: tuple, named: bool) -> Any:
    """The smallest valid value of a spec, in named or wire form."""
    k = spec[0]
    if k == "s":
        return {(name if named else key): _min(s, named) for key, name, s, req in spec[1] if req}
    if k == "a":
        return [_min(s, named) for s in spec[1]]
    if k == "c":
        return _min(spec[1][0], named)
    return {"u": 0, "i": 0, "b": b"b" * spec[1] if k == "b" else b"", "t": "", "?": True,
            "l": [], "m": {}}[k]


def _over_limit(spec: tuple, named: bool) -> list:
    """Values that break exactly one rule of a spec: its type or one of its limits."""
    k = spec[0]
    if k == "u":
        return [spec[1] + 1, -1, True, "1", 1.5]
    if k == "i":
        return [1 << 63, -(1 << 63) - 1, False, b"1", 1.5]
    if k == "b":
        short = [b"b" * (spec[1] - 1)] if spec[1] else []
        return [b"b" * (spec[2] + 1), "b" * spec[1], 7, *short]
    if k == "t":
        return ["t" * (spec[1] + 1), "é" * (spec[1] // 2 + 1), b"t", 1]
    if k == "?":
        return [0, 1, None, "true"]
    if k == "l":
        return [[_min(spec[1], named)] * (spec[2] + 1), {}, "x", [None]]
    if k == "a":
        return [[*_min(spec, named), 0], _min(spec, named)[:-1], [256] * len(spec[1]), {}]
    if k == "m":
        v = _min(spec[2], named)
        if spec[1][0] == "u":  # uint keys
            return [{i: v for i in range(spec[3] + 1)}, [], {"k": v}, {1: None},
                    {spec[1][1] + 1: v}, {-1: v}]
        return [{f"k{i}": v for i in range(spec[3] + 1)}, [], {1: v}, {"k": None},
                {"k" * (spec[1][1] + 1): v}]
    if k == "s":
        return [{}, {**_min(spec, named), (99 if not named else "zz"): 1}, []]
    if k == "c":
        return [None, 1.5, [[1, 2, 3]]]
    raise AssertionError(k)


@pytest.mark.parametrize(("num", "key", "fname", "spec", "required"), list(_field_cases()))
def test_each_field_wrong_missing_over_limit(num, key, fname, spec, required) -> None:
    name = messages.TYPES[num][0]
    good = _valid(name)
    w = messages.to_wire(good)
    assert decode_outcome(cbor.dumps(w))[0] == "ok"
    for bad in _over_limit(spec, named=False):
        assert not conforms(spec, bad), (fname, bad)
        if isinstance(bad, float) or (type(bad) is int and not -(1 << 64) <= bad < (1 << 64)):
            continue  # cannot be sent: no encoding in the CBOR profile
        assert decode_outcome(cbor.dumps({**w, key: bad})) == ("err", "schema"), (fname, bad)
    for bad in _over_limit(spec, named=True):
        with pytest.raises(ValueError):
            codecs.encode({**good, fname: bad})
    missing = {k: v for k, v in w.items() if k != key}
    named_missing = {k: v for k, v in good.items() if k != fname}
    if required:
        assert decode_outcome(cbor.dumps(missing)) == ("err", "schema")
        with pytest.raises(ValueError):
            codecs.encode(named_missing)
    else:
        assert decode_outcome(cbor.dumps(missing))[0] == "ok"
        codecs.encode(named_missing)


@pytest.mark.parametrize(
    ("w", "code"),
    [
        ({0: 99}, "unknown_type"),
        ({0: 0}, "unknown_type"),
        ({0: 99}, "unknown_type"),
        ({0: -1}, "unknown_type"),
        ({0: "scan"}, "unknown_type"),
        ({0: True}, "unknown_type"),
        ({0: None}, "unknown_type"),
        ({0: [3]}, "unknown_type"),
        ({1: 7}, "unknown_type"),
        ({}, "unknown_type"),
        ([3], "schema"),
        (3, "schema"),
        (b"", "schema"),
        ({0: 8, 1: 0}, "schema"),  # unknown key on a field-less type
        ({0: 8, "x": 0}, "schema"),
        ({0: 8, -1: 0}, "schema"),
        ({0: 15}, "schema"),  # ack without its counter
        ({0: 15, 1: 1, 2: 1}, "schema"),
        ({0: 15, 1: -1}, "schema"),
        ({0: 15, 1: 1 << 32}, "schema"),
        ({0: 15, 1: True}, "schema"),
        ({0: 15, "counter": 1}, "schema"),  # names are not wire keys
        ({0: 16, 2: 1, 3: "d" * 65}, "schema"),
        ({0: 17, 1: "text"}, "schema"),
    ],
)
def test_decode_rejections(w: Any, code: str) -> None:
    assert decode_outcome(cbor.dumps(w)) == ("err", code)
    assert wire_outcome(w)[:2] == ("err", code)


@pytest.mark.parametrize(
    ("payload", "code"),
    [
        ("a20008", "truncated"),
        ("a1000800", "cbor"),  # trailing byte
        ("a100f93c00", "cbor"),  # float
        ("a1001808", "non_canonical"),
        ("a200080008", "non_canonical"),  # duplicate key
        ("bf0008ff", "non_canonical"),
        ("a2010100" "0f", "non_canonical"),  # unsorted: {1: 1, 0: 15}
        ("", "truncated"),
    ],
)
def test_decode_cbor_errors(payload: str, code: str) -> None:
    assert decode_outcome(bytes.fromhex(payload)) == ("err", code)


def test_decode_ignores_nothing_in_nested_structs() -> None:
    rules = {"type": "rules", "version": 1, "default": 0, "rules": [{"action": 1}]}
    w = messages.to_wire(rules)
    assert decode_outcome(cbor.dumps(w))[0] == "ok"
    w[3] = [{0: 1, 9: 1}]
    assert decode_outcome(cbor.dumps(w)) == ("err", "schema")
    w[3] = [{1: ["]Q1"]}]  # action missing
    assert decode_outcome(cbor.dumps(w)) == ("err", "schema")
    keys = {"type": "keys", "macro_id": 1, "items": ["abc", [0x28, 0]]}
    assert same(codecs.decode(codecs.encode(keys)), keys)
    w = messages.to_wire(keys)
    w[2] = [[0x28, 0, 0]]
    assert decode_outcome(cbor.dumps(w)) == ("err", "schema")
    w[2] = [[0x100, 0]]
    assert decode_outcome(cbor.dumps(w)) == ("err", "schema")


# -- the host's fast path (messages_fast) against the table interpreter -------------------------


def _same_outcome(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and (same(a[1], b[1]) if a[0] == "ok" else a[1] == b[1])


def _table_outcome(payload: bytes) -> tuple:
    try:
        return ("ok", messages.decode(payload))
    except ProtocolError as e:
        return ("err", e.code)


@pytest.mark.parametrize(
    "payload",
    [
        "a100ec",  # type simple(12)
        "a100f1",  # type simple(17)
        "a100fb4028000000000000",  # type 12.0
        "a500f5" "018101" "025000000000000000000000000000000000" "036166" "046162",  # type true
    ],
)
def test_fast_decode_rejects_a_type_that_is_not_an_int(payload: str) -> None:
    p = bytes.fromhex(payload)
    assert _table_outcome(p)[0] == "err"
    assert decode_outcome(p) == _table_outcome(p)


def _type_variants():
    """Every type, with its number encoded in ways the profile refuses."""
    for num, t in messages.TYPES.items():
        w = {0: num, **{key: _min(spec, False) for key, _, spec, req in t[4] if req}}
        enc = cbor.dumps(w)
        assert enc[1] == 0 and enc[2] == num  # a one-byte map head, key 0, the type in one byte
        head, rest = enc[:2], enc[3:]
        variants = [
            ("non-shortest", b"\x18" + bytes([num]), ()),
            ("bignum", b"\xc2\x41" + bytes([num]), ()),
            ("tagged", b"\xd8\x20" + bytes([num]), ()),
            ("float16", b"\xf9" + struct.pack(">e", num), ()),
            ("float32", b"\xfa" + struct.pack(">f", num), ()),
            ("float64", b"\xfb" + struct.pack(">d", num), ()),
            ("text", cbor.dumps(str(num)), ()),
        ]
        if num < 20:
            variants.append(("simple", bytes([0xE0 + num]), ()))
        if num == 1:
            variants.append(("true", b"\xf5", ()))
        for what, v, marks in variants:
            yield pytest.param(head + v + rest, marks=marks, id=f"{t[0]}-{what}")


@pytest.mark.parametrize("payload", list(_type_variants()))
def test_type_number_must_be_a_plain_int(payload: bytes) -> None:
    assert _table_outcome(payload)[0] == "err"
    assert decode_outcome(payload) == _table_outcome(payload)


def _mutate_named(msg: dict, rnd: random.Random) -> dict:
    msg = dict(msg)
    names = [k for k in msg if k != "type"]
    op = rnd.randrange(5)
    if op == 0 and names:
        msg[rnd.choice(names)] = rnd.choice([*_POOL, (1, 2), bytearray(b"x"), 1.5])
    elif op == 1 and names:
        del msg[rnd.choice(names)]
    elif op == 2:
        msg[rnd.choice(["extra", 1, "scan_id", "type"])] = rnd.choice(_POOL)
    elif op == 3 and names:
        k = rnd.choice(names)
        if isinstance(msg[k], list):
            msg[k] = tuple(msg[k])  # a tuple is a valid list on the named side
        elif isinstance(msg[k], dict):
            msg[k] = {**msg[k], rnd.choice(["k", 5, "zz" * 20]): rnd.choice(_POOL)}
    return msg


@settings(max_examples=500, phases=NO_SHRINK)
@given(any_message(), st.randoms(use_true_random=False))
def test_fast_path_agrees_with_the_table(msg: dict, rnd: random.Random) -> None:
    payload = codecs.encode(msg)
    assert payload == messages.encode(msg)
    w = messages.to_wire(msg)
    for p in (payload, cbor.dumps(_mutate(w, rnd)), Mutator(rnd, 0.05).encode(w)):
        assert _same_outcome(decode_outcome(p), _table_outcome(p)), p.hex()
    bad = _mutate_named(msg, rnd)
    try:
        want = messages.encode(bad)
    except ValueError:
        with pytest.raises(ValueError):
            codecs.encode(bad)
    else:
        assert codecs.encode(bad) == want


# -- encode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "msg",
    [
        {},
        {"type": "nope"},
        {"type": 3},
        {"type": None},
        {"scan_id": 1},
        {"type": "ack"},
        {"type": "ack", "counter": 1, "extra": 2},
        {"type": "ack", "counter": 1, 1: 1},
        {"type": "ack", "counter": "1"},
        {"type": "ack", "counter": 1.0},
        {"type": "health_get", "x": None},
        {"type": "config_set", "values": {"k": 1.5}},
        {"type": "config_set", "values": {1: 1}},
        {"type": "config_set", "values": {"k": [1]}},
        {"type": "config_set", "values": {("k",): 1}},
        {"type": "logs", "entries": [[1, 2, 3]], "next": 0},
        {"type": "logs", "entries": [[1, 2, 8, "e"]], "next": 0},
    ],
)
def test_encode_rejects_invalid_messages(msg: dict) -> None:
    with pytest.raises(ValueError):
        codecs.encode(msg)


@pytest.mark.parametrize("msg", [{"type": ["scan"]}, {"type": {}}, {"type": b"scan"}])
def test_encode_rejects_unhashable_or_odd_types(msg: dict) -> None:
    with pytest.raises(ValueError):
        codecs.encode(msg)


@pytest.mark.parametrize("msg", [None, "scan", ["scan"], 7])
def test_encode_rejects_non_messages(msg: Any) -> None:
    with pytest.raises(ValueError):
        codecs.encode(msg)


def test_encode_normalises_sequences() -> None:
    msg = {"type": "keys", "macro_id": 1, "items": ("ab", (4, 2)), "delay_ms": 5}
    assert codecs.decode(codecs.encode(msg)) == {
        "type": "keys", "macro_id": 1, "items": ["ab", [4, 2]], "delay_ms": 5}
    msg = {"type": "ping", "data": bytearray(b"xy")}
    assert codecs.decode(codecs.encode(msg)) == {"type": "ping", "data": b"xy"}


# -- every message the schema accepts must fit one frame ----------------------------------------

def _fill(n: int) -> str:
    """A text of exactly n bytes of UTF-8 (text limits count bytes, not characters)."""
    return "\U0001F600" * (n // 4) + "a" * (n % 4)


def _largest(spec: tuple) -> Any:
    k = spec[0]
    if k == "u":
        return spec[1]
    if k == "i":
        return -(1 << 63)
    if k == "b":
        return b"\xff" * spec[2]
    if k == "t":
        return _fill(spec[1])
    if k == "?":
        return True
    if k == "l":
        return [_largest(spec[1]) for _ in range(spec[2])]
    if k == "a":
        return [_largest(s) for s in spec[1]]
    if k == "s":
        return {name: _largest(s) for _, name, s, _ in spec[1]}
    if k == "m":
        if spec[1][0] == "u":  # uint keys: the largest ones, each in its longest form
            return {spec[1][1] - i: _largest(spec[2]) for i in range(spec[3])}
        n = spec[1][1]  # text keys: distinct, each as long as allowed
        return {_fill(n - 4) + f"{i:04d}": _largest(spec[2]) for i in range(spec[3])}
    if k == "c":
        return max((_largest(s) for s in spec[1]), key=lambda v: len(cbor.dumps(v)))
    raise AssertionError(k)


def _worst_cose(payload: bytes) -> bytes:
    # the largest overhead: alg 5, a 16-byte kid, a 4-byte Partial IV
    return codecs.mac0(bytes(32), cose.ALG_HMAC256, b"k" * cose.MAX_KID, cose.MAX_COUNTER, payload)


def test_max_payload_always_fits() -> None:
    assert len(_worst_cose(bytes(cose.MAX_PAYLOAD))) + 4 == frame.MAX_FRAME
    for n in (0, 23, 24, 255, 256, cose.MAX_PAYLOAD):
        assert len(_worst_cose(bytes(n))) - n <= cose.MAX_OVERHEAD


@pytest.mark.parametrize("name", TYPE_NAMES)
def test_largest_valid_message_fits_one_frame(name: str) -> None:
    # the limits in the table are chosen so that every valid message fits one frame
    msg = {"type": name}
    for _, fname, spec, _ in messages.TYPES[messages.NUMBER[name]][4]:
        msg[fname] = _largest(spec)
    payload = codecs.encode(msg)  # valid by the schema
    assert len(payload) <= cose.MAX_PAYLOAD, len(payload)
    assert len(_worst_cose(payload)) + 4 <= frame.MAX_FRAME


@pytest.mark.parametrize("counter", [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, -1,
                                     True, False, "1", b"\x01", 1.0, None])
def test_the_table_paths_ack_shortcut_matches_the_general_path(counter: object) -> None:
    """messages.encode/decode build and recognise acks without the table: same bytes, same
    results and the same refusals as to_wire/from_wire."""
    msg = {"type": "ack", "counter": counter}
    try:
        want = cbor.dumps(messages.to_wire(msg))
    except ValueError:
        with pytest.raises(ValueError):
            messages.encode(msg)
    else:
        assert messages.encode(msg) == want
    for extra in ({}, {2: 1}, {"x": 1}):
        w = {0: 15, 1: counter, **extra}
        try:
            p = cbor.dumps(w)
        except (ValueError, TypeError):
            continue  # not encodable in the profile (a float, None as a value is fine)
        general: tuple
        try:
            general = ("ok", messages.from_wire(cbor.loads(p)))
        except ProtocolError as e:
            general = ("err", e.code)
        assert _same_outcome(_table_outcome(p), general), p.hex()
    with pytest.raises(ValueError):  # an extra field: refused as by the general path
        messages.encode({"type": "ack", "counter": 5, "x": 1})


# -- the device's build of this module, on CPython ------------------------------------------------


@pytest.fixture(scope="module")
def device() -> types.ModuleType:
    """messages.py as the device gets it (tools/terse.py: the `_HOST` parts out, exception texts
    out): its own code paths (fields parsed from the table line by line, structs by name, one
    info() answer kept), which must give the host's results and error codes."""
    code, _ = terse(Path(messages.__file__).read_text(encoding="utf-8"))
    mod = types.ModuleType("hexiao.protocol.messages_device")
    mod.__package__ = "hexiao.protocol"
    exec(compile(code, "messages.py (device build)", "exec"), mod.__dict__)
    assert mod._HOST is False and not hasattr(mod, "fields") and not hasattr(mod, "TYPES")
    return mod


def _device_outcome(device: types.ModuleType, payload: bytes) -> tuple:
    try:
        return ("ok", device.decode(payload))
    except ProtocolError as e:
        return ("err", e.code)


def test_device_build_info(device: types.ModuleType) -> None:
    for num, (name, direction, epoch, reliable, _) in messages.TYPES.items():
        assert device.info(name) == messages.info(name) == (num, direction, epoch, reliable)
        assert len(device._info) == 1  # the device keeps the last answer only
    for word in _NOT_TYPES:
        with pytest.raises(KeyError):
            device.info(word)
    assert device.OUTCOMES == messages.OUTCOMES and device.LEDS == messages.LEDS
    assert device.BEEPS == messages.BEEPS


@settings(max_examples=300, phases=NO_SHRINK)
@given(any_message(), st.randoms(use_true_random=False))
def test_device_build_agrees_with_the_host(
    device: types.ModuleType, msg: dict, rnd: random.Random
) -> None:
    payload = codecs.encode(msg)
    assert device.encode(msg) == payload
    assert same(device.decode(payload), msg)
    w = messages.to_wire(msg)
    for p in (cbor.dumps(_mutate(w, rnd)), Mutator(rnd, 0.05).encode(w)):
        assert _same_outcome(_device_outcome(device, p), decode_outcome(p)), p.hex()
    bad = _mutate_named(msg, rnd)
    try:
        want = messages.encode(bad)
    except ValueError:
        with pytest.raises(ValueError):
            device.encode(bad)
    else:
        assert device.encode(bad) == want
    for counter in (0, 1):
        try:
            messages.check_epoch(counter, msg)
        except ProtocolError as e:
            with pytest.raises(ProtocolError) as got:
                device.check_epoch(counter, msg)
            assert got.value.code == e.code
        else:
            device.check_epoch(counter, msg)
