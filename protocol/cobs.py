# Consistent Overhead Byte Stuffing (Cheshire & Baker 1999), the framing's byte stuffing.
#
# Rules kept here:
# - encode() output never contains 0x00; the caller appends the 0x00 delimiter;
# - decode() is strict: a zero byte, or a block code that runs past the end, raises
#   ProtocolError("cobs"); it never returns bytes for input that encode() could not produce,
#   except that a final block may be shorter than 254 (as in every COBS implementation).
# This pure version runs on MicroPython; on CPython, frame.py uses the `cobs` package (C) and the
# tests check that the two agree byte for byte.

from .errors import ProtocolError


def encode(data):
    out = bytearray()
    start = 0
    n = len(data)
    while True:
        end = data.find(b"\x00", start) if start < n else -1
        if end < 0 or end - start >= 254:
            end = min(n, start + 254)
            block = data[start:end]
            out.append(len(block) + 1)
            out.extend(block)
            if end >= n:
                return bytes(out)  # a final full block needs no empty block after it
            start = end
            continue
        out.append(end - start + 1)
        out.extend(data[start:end])
        start = end + 1
        if start >= n:
            out.append(1)
            return bytes(out)


def decode(data):
    return bytes(decode_view(data))


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
