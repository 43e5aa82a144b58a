"""Framing: wire = COBS(cose || crc32_le(cose)) || 0x00, and the streaming deframer."""

from __future__ import annotations

import random
import zlib

import pytest
from cobs import cobs as c_cobs
from hexiao.protocol import frame
from hexiao.protocol.errors import ProtocolError
from hexiao.protocol.frame import MAX_FRAME, MAX_WIRE, Deframer
from hypothesis import given, settings
from hypothesis import strategies as st

# -- an oracle written from the spec: checks in order oversize, cobs, truncated, crc ----------


def oracle(raw: bytes) -> tuple:
    """What the bytes between two delimiters must decode to: ("ok", cose) or ("err", code)."""
    if len(raw) > MAX_WIRE:
        return ("err", "oversize")
    try:
        body = c_cobs.decode(raw)
    except c_cobs.DecodeError:
        return ("err", "cobs")
    if len(body) > MAX_FRAME:
        return ("err", "oversize")
    if len(body) < 5:
        return ("err", "truncated")
    if zlib.crc32(body[:-4]).to_bytes(4, "little") != body[-4:]:
        return ("err", "crc")
    return ("ok", body[:-4])


def stream_oracle(stream: bytes) -> list:
    """What a deframer fed `stream` (in any chunks) must return."""
    pieces = stream.split(b"\x00")
    out = [oracle(p) for p in pieces[:-1] if p]
    if len(pieces[-1]) > MAX_WIRE:  # an unfinished frame is reported once it is too long
        out.append(("err", "oversize"))
    return out


def result(item) -> tuple:
    if isinstance(item, ProtocolError):
        return ("err", item.code)
    assert isinstance(item, bytes)
    return ("ok", item)


def decode_result(raw: bytes) -> tuple:
    try:
        return ("ok", frame.decode(raw))
    except ProtocolError as e:
        return ("err", e.code)


def feed_chunks(stream: bytes, cuts: list[int]) -> list:
    d = Deframer()
    out = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        out.extend(result(x) for x in d.feed(stream[a:b]))
        assert d.pending() <= MAX_WIRE
    return out


coses = st.binary(min_size=1, max_size=MAX_FRAME - 4)
small_coses = st.binary(min_size=1, max_size=300)


# -- round trip ---------------------------------------------------------------------------------


@settings(max_examples=300)
@given(coses)
def test_round_trip(cose: bytes) -> None:
    wire = frame.encode(cose)
    assert wire.endswith(b"\x00") and wire.count(0) == 1
    assert len(wire) - 1 <= MAX_WIRE
    assert frame.decode(wire[:-1]) == cose
    assert Deframer().feed(wire) == [cose]
    assert oracle(wire[:-1]) == ("ok", cose)


@pytest.mark.parametrize("n", [1, 249, 250, 251, 253, 254, 255, 507, 508, MAX_FRAME - 4])
@pytest.mark.parametrize("fill", [b"\x00", b"\x11", b"\x00\x11"])
def test_round_trip_sizes(n: int, fill: bytes) -> None:
    cose = (fill * n)[:n]
    wire = frame.encode(cose)
    assert frame.decode(wire[:-1]) == cose
    assert Deframer().feed(wire) == [cose]


def test_encode_refuses_oversize() -> None:
    frame.encode(b"\x11" * (MAX_FRAME - 4))
    with pytest.raises(ValueError):
        frame.encode(b"\x11" * (MAX_FRAME - 3))


def test_crc32_le() -> None:
    assert frame.crc32_le(b"123456789") == (0xCBF43926).to_bytes(4, "little")
    assert frame.crc32_le(b"") == b"\x00\x00\x00\x00"


# -- explicit rejections ------------------------------------------------------------------------


def test_error_order_and_limits() -> None:
    assert decode_result(b"\x11" * (MAX_WIRE + 1)) == ("err", "oversize")
    assert decode_result(b"\x00" * (MAX_WIRE + 1)) == ("err", "oversize")  # before cobs
    # MAX_WIRE bytes whose decoded body is longer than MAX_FRAME
    raw = c_cobs.encode(b"\x00" * (MAX_FRAME + 1))
    assert len(raw) <= MAX_WIRE
    assert decode_result(raw) == ("err", "oversize")
    assert decode_result(b"\x05abc") == ("err", "cobs")
    assert decode_result(b"\x02a\x00") == ("err", "cobs")
    assert decode_result(b"\x01") == ("err", "truncated")
    assert decode_result(c_cobs.encode(b"abcd")) == ("err", "truncated")
    assert decode_result(c_cobs.encode(b"abcde")) == ("err", "crc")
    good = frame.encode(b"x")[:-1]
    assert decode_result(good) == ("ok", b"x")


def test_largest_frame_passes_and_one_more_byte_is_oversize() -> None:
    cose = bytes(range(1, 256)) * 4
    cose = cose[: MAX_FRAME - 4]
    wire = frame.encode(cose)
    assert frame.decode(wire[:-1]) == cose
    body = cose + b"\x01" + frame.crc32_le(cose + b"\x01")
    raw = c_cobs.encode(body)
    assert decode_result(raw) == ("err", "oversize")
    assert oracle(raw) == ("err", "oversize")


# -- corruption, truncation, extension --------------------------------------------------------


def _check_corrupted(wire: bytes, i: int, v: int) -> None:
    bad = bytearray(wire)
    bad[i] = v
    bad = bytes(bad)
    got = [result(x) for x in Deframer().feed(bad)]
    assert got == stream_oracle(bad)
    assert got, "a corrupted frame vanished"
    assert all(r[0] == "err" for r in got), (i, v, got)
    if v != 0:
        assert decode_result(bad[:-1]) == oracle(bad[:-1])


@pytest.mark.parametrize("n", [1, 20, 100, 251, 260])
def test_every_single_byte_corruption_is_rejected(n: int) -> None:
    """Exhaustive: every position of the frame (not the delimiter) and every other byte value."""
    cose = bytes(random.Random(n).randrange(256) for _ in range(n))
    wire = frame.encode(cose)
    for i in range(len(wire) - 1):
        for v in range(256):
            if v != wire[i]:
                _check_corrupted(wire, i, v)


@settings(max_examples=300)
@given(coses, st.data())
def test_single_byte_corruption_is_rejected(cose: bytes, data: st.DataObject) -> None:
    wire = frame.encode(cose)
    i = data.draw(st.integers(0, len(wire) - 2))
    v = data.draw(st.integers(0, 255).filter(lambda x: x != wire[i]))
    _check_corrupted(wire, i, v)


@settings(max_examples=100)
@given(small_coses)
def test_every_truncation_is_rejected(cose: bytes) -> None:
    raw = frame.encode(cose)[:-1]
    for k in range(1, len(raw)):
        got = decode_result(raw[:k])
        assert got == oracle(raw[:k])
        assert got[0] == "err"
        assert [result(x) for x in Deframer().feed(raw[:k] + b"\x00")] == [got]
    assert Deframer().feed(raw[:0] + b"\x00") == []  # an empty frame is ignored


@settings(max_examples=300)
@given(small_coses, st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\x00", b"\x07")))
def test_every_extension_is_rejected(cose: bytes, ext: bytes) -> None:
    raw = frame.encode(cose)[:-1]
    got = decode_result(raw + ext)
    assert got == oracle(raw + ext)
    assert got[0] == "err"


@pytest.mark.parametrize("n", [1, 60, 253, 254, 255])
def test_extension_by_one_byte_exhaustive(n: int) -> None:
    raw = frame.encode(b"\x42" * n)[:-1]
    for v in range(1, 256):
        got = decode_result(raw + bytes([v]))
        assert got == oracle(raw + bytes([v]))
        assert got[0] == "err"


# -- streams: chunking, resynchronisation, oversize ----------------------------------------------


def _segment() -> st.SearchStrategy[bytes]:
    return st.one_of(
        small_coses.map(frame.encode),  # a good frame
        small_coses.map(frame.encode),
        st.binary(max_size=30),  # garbage, maybe with delimiters
        st.just(b"\x00\x00"),  # empty frames
        st.integers(MAX_WIRE - 2, MAX_WIRE + 300).map(lambda n: b"\x5a" * n),  # long runs
        small_coses.map(lambda c: frame.encode(c)[:-1]),  # a frame without its delimiter
    )


@settings(max_examples=300)
@given(st.lists(_segment(), max_size=8).map(b"".join), st.data())
def test_any_chunking_yields_the_same_items(stream: bytes, data: st.DataObject) -> None:
    want = stream_oracle(stream)
    assert [result(x) for x in Deframer().feed(stream)] == want
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12)))
    assert feed_chunks(stream, cuts) == want


@settings(max_examples=30)
@given(st.lists(_segment(), max_size=6).map(b"".join))
def test_byte_by_byte_feeding(stream: bytes) -> None:
    assert feed_chunks(stream, list(range(1, len(stream)))) == stream_oracle(stream)


@settings(max_examples=200)
@given(st.binary(max_size=200), st.binary(max_size=200), small_coses, small_coses)
def test_resync_after_garbage(g1: bytes, g2: bytes, c1: bytes, c2: bytes) -> None:
    stream = g1 + b"\x00" + frame.encode(c1) + g2 + b"\x00" + frame.encode(c2)
    got = [result(x) for x in Deframer().feed(stream)]
    oks = [r[1] for r in got if r[0] == "ok"]
    assert oks[-2:] == [c1, c2]
    assert got[-1] == ("ok", c2)
    assert got == stream_oracle(stream)


@pytest.mark.parametrize("chunk", [1, 7, 1000, 10_000])
def test_oversize_is_reported_once_then_resync(chunk: int) -> None:
    good = frame.encode(b"after")
    stream = b"\x5a" * 5000 + b"\x00" + good + b"\x33" * (MAX_WIRE + 1) + b"\x00" + good
    got = feed_chunks(stream, list(range(chunk, len(stream), chunk)))
    assert got == [("err", "oversize"), ("ok", b"after"), ("err", "oversize"), ("ok", b"after")]


def test_exactly_max_wire_is_not_oversize() -> None:
    raw = b"\x5a" * MAX_WIRE
    got = feed_chunks(raw + b"\x00", [MAX_WIRE // 2])
    assert got == [("err", "cobs")]
    got = feed_chunks(raw + b"\x5a\x00", [MAX_WIRE // 2])
    assert got == [("err", "oversize")]


def test_unfinished_frame_stays_pending() -> None:
    d = Deframer()
    wire = frame.encode(b"hello")
    assert d.feed(wire[:-1]) == []
    assert d.pending() == len(wire) - 1
    assert d.feed(b"\x00") == [b"hello"]
    assert d.pending() == 0


# -- soak ---------------------------------------------------------------------------------------


@pytest.mark.soak
def test_soak_million_fuzzed_frames() -> None:
    rnd = random.Random(1)
    d = Deframer()
    n = 0
    while n < 1_000_000:
        parts = []
        for _ in range(100):
            wire = bytearray(frame.encode(rnd.randbytes(rnd.randrange(1, 120))))
            for _ in range(rnd.choice((0, 0, 1, 2))):
                wire[rnd.randrange(len(wire))] = rnd.randrange(256)
            if rnd.random() < 0.05:
                del wire[rnd.randrange(len(wire)) :]
            parts.append(bytes(wire))
        stream = b"\x00" + b"".join(parts)
        cuts = sorted(rnd.sample(range(len(stream)), 20))
        got = []
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            got.extend(result(x) for x in d.feed(stream[a:b]))
        d.feed(b"\x00")
        assert got == stream_oracle(stream)[: len(got)]
        n += 100
