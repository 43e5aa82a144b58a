# Consistent Overhead Byte Stuffing (Cheshire & Baker 1999), the framing's byte stuffing.
#
# Rules kept here:
# - encode() output never contains 0x00 (but the tail the caller asks for: the delimiter);
# - decode() is strict: a zero byte, or a block code that runs past the end, raises
#   ProtocolError("cobs"); it never returns bytes for input that encode() could not produce,
#   except that a final block may be shorter than 254 (as in every COBS implementation).
# This pure version runs on MicroPython; on CPython, frame.py uses the `cobs` package (C) and the
# tests check that the two agree byte for byte. The device decodes with decode_view() only.

import sys

from .errors import ProtocolError

_DEVICE = sys.implementation.name == "micropython"


def encode(data, tail=b""):
    """COBS of `data` (bytes), then `tail` (the caller's 0x00 delimiter, if it likes): one buffer
    of the longest possible result, filled through views. The device gets a view of that buffer
    (a session's largest frame is about 600 bytes: a second copy of it at the heap's high-water
    mark is what fails first); CPython gets bytes."""
    n = len(data)
    out = bytearray(n + n // 254 + 1 + len(tail))
    src = memoryview(data)
    start = j = 0
    while True:
        end = data.find(b"\x00", start, start + 254) if start < n else -1
        zero = end >= 0  # else a block of 254 non-zero bytes, or the last block
        if not zero:
            end = min(n, start + 254)
        out[j] = end - start + 1
        out[j + 1 : j + 1 + end - start] = src[start:end]
        j += end - start + 1
        start = end + 1 if zero else end
        if start >= n:
            if zero:  # data ended with a zero: an empty last block stands for it
                out[j] = 1
                j += 1
            break  # (a final full block needs no empty block after it)
    out[j : j + len(tail)] = tail
    view = memoryview(out)[: j + len(tail)]
    return view if _DEVICE else bytes(view)


def decode_view(data):
    """decode() without the final copy: a memoryview of the decoded bytes (the device's path)."""
    out = bytearray(len(data))  # decoded is never longer: one allocation, no regrowth
    j = 0
    i = 0
    n = len(data)
    while i < n:
        code = data[i]
        if code == 0:
            raise ProtocolError("cobs", "zero byte inside frame")
        end = i + code
        if end > n:
            raise ProtocolError("cobs", "block runs past end of frame")
        block = data[i + 1 : end]
        if b"\x00" in block:
            raise ProtocolError("cobs", "zero byte inside frame")
        out[j : j + code - 1] = block
        j += code - 1
        i = end
        if code < 255 and i < n:
            j += 1  # the zero this block stood for (already 0 in `out`)
    return memoryview(out)[:j]


if sys.implementation.name != "micropython":  # host tools, tests and frame.py's C fallback

    def decode(data):
        return bytes(decode_view(data))
