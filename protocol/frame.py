# Framing: wire = COBS(cose || crc32_le(cose)) || 0x00 (SPEC.md, "Framing").
#
# Rules kept here:
# - a frame is everything between two 0x00 delimiters; empty frames are ignored (a sender may send
#   a lone 0x00 to flush a receiver's partial frame, e.g. after boot);
# - checks run in a fixed order, each with its own code: oversize, cobs, truncated, crc;
# - after any bad frame the deframer is back in sync at the next delimiter; nothing is buffered
#   beyond MAX_WIRE bytes: the bytes of a longer frame are dropped as they come, never kept;
# - its memory is bounded whatever arrives: push() keeps a reference to the bytes given, take()
#   returns one item at a time (a frame or its error), so a chunk holding a hundred bad frames
#   never has a hundred errors alive at once (issue 17: a zero-heavy flood exhausted the device's
#   heap when every bad frame of a chunk was decoded into one list first).

import binascii
import sys

from . import cobs as _cobs_pure
from .errors import ProtocolError

if sys.implementation.name != "micropython":  # the C implementation from the `cobs` package
    from cobs import cobs as _cobs_c

    def _cobs_decode(raw):
        try:
            return _cobs_c.decode(raw)
        except _cobs_c.DecodeError:
            return _cobs_pure.decode(raw)  # raises the precise ProtocolError

    def _cobs_encode(body, tail):
        return _cobs_c.encode(body) + tail

else:  # the shared pure one; decode() returns a memoryview, to spare a 1 KB frame a copy
    _cobs_decode = _cobs_pure.decode_view
    _cobs_encode = _cobs_pure.encode

MAX_FRAME = 1024  # bytes of COSE + CRC, after COBS decoding
MAX_WIRE = MAX_FRAME + MAX_FRAME // 254 + 1  # COBS-encoded, without the delimiter
MIN_FRAME = 4 + 1  # CRC and at least one byte of COSE


def crc32_le(data):
    return (binascii.crc32(data) & 0xFFFFFFFF).to_bytes(4, "little")


def encode(cose):
    if len(cose) + 4 > MAX_FRAME:
        raise ValueError("frame would exceed MAX_FRAME")
    return _cobs_encode(cose + crc32_le(cose), b"\x00")


def decode(raw):
    """raw: the bytes between two delimiters (non-empty). Returns the COSE bytes (a memoryview
    of them on the device)."""
    if len(raw) > MAX_WIRE:
        raise ProtocolError("oversize", "frame longer than %d bytes" % MAX_WIRE)
    body = _cobs_decode(raw)
    if len(body) > MAX_FRAME:
        raise ProtocolError("oversize", "decoded frame longer than %d bytes" % MAX_FRAME)
    if len(body) < MIN_FRAME:
        raise ProtocolError("truncated", "frame shorter than %d bytes" % MIN_FRAME)
    cose = body[:-4]
    if binascii.crc32(cose) & 0xFFFFFFFF != int.from_bytes(body[-4:], "little"):
        raise ProtocolError("crc", "CRC-32 mismatch")
    return cose


class Deframer:
    """Bytes in, frames out: push(data), then take() until it returns None; each item is a
    frame's COSE bytes or the ProtocolError that rejected it. feed(data) does both, as a list."""

    def __init__(self):
        self._buf = bytearray()  # the unfinished frame, at most MAX_WIRE bytes
        self._discarding = False  # dropping the rest of an oversize frame, already reported
        self._data = b""  # what push() gave, read from _pos on
        self._pos = 0

    def push(self, data):
        """Bytes received; take() returns what they end. Push again only once take() said None."""
        self._data = data
        self._pos = 0

    def take(self):
        """The next frame (COSE bytes) or ProtocolError of what push() gave; None when done."""
        data = self._data
        n = len(data)
        while self._pos < n:
            pos = self._pos
            end = data.find(b"\x00", pos)
            if end < 0:  # no delimiter: the frame goes on in the next push
                end = n
            self._pos = end + 1
            held = len(self._buf) + end - pos
            if self._discarding:
                if end < n:
                    self._discarding = False  # in step again from here
            elif held > MAX_WIRE:  # dropped now, not buffered (SPEC §2.5: reported once)
                self._buf = bytearray()
                if end < n:
                    return ProtocolError("oversize", "frame longer than %d bytes" % MAX_WIRE)
                self._discarding = True
                return ProtocolError("oversize", "no delimiter within MAX_WIRE")
            elif end == n:
                self._buf.extend(data[pos:])
            elif self._buf or end > pos:  # (an empty frame is ignored)
                raw = data[pos:end]
                if self._buf:  # the end of a frame begun in an earlier push
                    self._buf.extend(raw)
                    raw = self._buf
                    self._buf = bytearray()
                try:
                    return decode(raw)
                except ProtocolError as e:
                    return e
        self._data = b""
        return None

    if sys.implementation.name != "micropython":  # host code and tests; the device takes items

        def feed(self, data):
            """push(data) and every item take() returns, as a list."""
            self.push(data)
            out = []
            item = self.take()
            while item is not None:
                out.append(item)
                item = self.take()
            return out

        def pending(self):
            return len(self._buf)
