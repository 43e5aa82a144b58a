# Framing: wire = COBS(cose || crc32_le(cose)) || 0x00 (SPEC.md, "Framing").
#
# Rules kept here:
# - a frame is everything between two 0x00 delimiters; empty frames are ignored (a sender may send
#   a lone 0x00 to flush a receiver's partial frame, e.g. after boot);
# - checks run in a fixed order, each with its own code: oversize, cobs, truncated, crc;
# - after any bad frame the deframer is back in sync at the next delimiter; nothing is buffered
#   beyond MAX_WIRE bytes.

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
    """Bytes in, frames out: feed() returns a list of COSE bytes or ProtocolError instances."""

    def __init__(self):
        self._buf = bytearray()
        self._discarding = False

    def feed(self, data):
        if not self._buf and not self._discarding and data.find(b"\x00") == len(data) - 1 > 0:
            pieces, tail = [data[:-1]], b""  # the common case, exactly one whole frame: no split
        else:
            # bytes.split finds every delimiter at C speed; the last piece is an unfinished frame
            pieces = data.split(b"\x00")
            if self._buf:
                self._buf.extend(pieces[0])
                pieces[0] = bytes(self._buf)
                self._buf = bytearray()
            tail = pieces.pop()
        out = []
        for i in range(len(pieces)):
            raw = pieces[i]
            if self._discarding:  # the rest of an oversize frame: skipped, already reported
                self._discarding = False
            elif raw:
                try:
                    out.append(decode(raw))
                except ProtocolError as e:
                    out.append(e)
        if self._discarding or len(tail) > MAX_WIRE:
            if not self._discarding:
                out.append(ProtocolError("oversize", "no delimiter within MAX_WIRE"))
            self._discarding = True
        elif tail:
            self._buf.extend(tail)
        return out

    def pending(self):
        return len(self._buf)
