"""The pure COBS codec (runs on MicroPython) against the `cobs` package's C codec (CPython)."""

from __future__ import annotations

import pytest
from cobs import cobs as c_cobs
from hexiao.protocol import cobs
from hexiao.protocol.errors import ProtocolError
from hypothesis import example, given, settings
from hypothesis import strategies as st

# Byte strings made of runs around the block size, where COBS encoders differ if anywhere.
_run = st.tuples(st.integers(0, 600), st.integers(1, 255)).map(lambda t: bytes([t[1]]) * t[0])
_edge_runs = st.lists(
    st.one_of(
        _run,
        st.sampled_from([b"\x00", b"\x00\x00"]),
        st.integers(250, 258).map(lambda n: b"\x11" * n),
    ),
    max_size=6,
).map(b"".join)
any_bytes = st.one_of(st.binary(max_size=1200), _edge_runs)


@settings(max_examples=300)
@given(any_bytes)
@example(b"")
@example(b"\x00")
@example(b"\x11" * 253)
@example(b"\x11" * 255)
@example(b"\x11" * 254 + b"\x00")
def test_encode_matches_c(data: bytes) -> None:
    assert cobs.encode(data) == c_cobs.encode(data)


@pytest.mark.parametrize("data", [b"\x11" * 254, b"\x00" + b"\x22" * 254, b"\x33" * 508])
def test_encode_full_final_block_matches_c(data: bytes) -> None:
    # regression: the pure encoder once added an empty 0x01 block after a final full block
    assert cobs.encode(data) == c_cobs.encode(data)
    assert len(cobs.encode(data)) == len(data) + len(data) // 254


@settings(max_examples=300)
@given(any_bytes)
def test_encode_has_no_zero_and_decodes_back(data: bytes) -> None:
    enc = cobs.encode(data)
    assert b"\x00" not in enc
    assert cobs.decode(enc) == data
    assert cobs.decode(c_cobs.encode(data)) == data
    assert c_cobs.decode(enc) == data
    # COBS overhead: at most one code byte per started 254-byte block
    assert len(enc) <= len(data) + len(data) // 254 + 1


def _outcome(decode, raw: bytes):
    try:
        return ("ok", decode(raw))
    except ProtocolError as e:
        assert e.code == "cobs"
        return ("err", "cobs")
    except c_cobs.DecodeError:
        return ("err", "cobs")


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=600), any_bytes.map(cobs.encode)))
def test_decode_agrees_with_c(raw: bytes) -> None:
    """Same output for every input the C codec accepts, an error for every input it refuses."""
    assert _outcome(cobs.decode, raw) == _outcome(c_cobs.decode, raw)


@settings(max_examples=200)
@given(st.binary(min_size=1, max_size=300), st.data())
def test_decode_rejects_a_zero_anywhere(data: bytes, draw: st.DataObject) -> None:
    enc = bytearray(cobs.encode(data))
    i = draw.draw(st.integers(0, len(enc) - 1))
    enc[i] = 0
    with pytest.raises(ProtocolError) as ei:
        cobs.decode(bytes(enc))
    assert ei.value.code == "cobs"


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00",  # a zero byte as block code
        b"\x02\x00",  # a zero byte inside a block
        b"\x01\x00\x01",
        b"\x02",  # block code runs past the end
        b"\x05abc",
        b"\xff" + b"\x11" * 253,
        b"\x03ab\x04ab",  # second block runs past the end
    ],
)
def test_decode_strict_errors(raw: bytes) -> None:
    with pytest.raises(ProtocolError) as ei:
        cobs.decode(raw)
    assert ei.value.code == "cobs"
    with pytest.raises(c_cobs.DecodeError):
        c_cobs.decode(raw)


@pytest.mark.parametrize(
    ("raw", "data"),
    [
        (b"", b""),
        (b"\x01", b""),
        (b"\x01\x01", b"\x00"),
        (b"\x03ab\x01", b"ab\x00"),
        (b"\x03ab\x02c", b"ab\x00c"),
        (b"\xff" + b"\x11" * 254, b"\x11" * 254),  # a final full block needs no 0x01 after it
        (b"\xff" + b"\x11" * 254 + b"\x01", b"\x11" * 254),
        (b"\xff" + b"\x11" * 254 + b"\x02\x22", b"\x11" * 254 + b"\x22"),
    ],
)
def test_decode_known_values(raw: bytes, data: bytes) -> None:
    assert cobs.decode(raw) == data
    assert c_cobs.decode(raw) == data
