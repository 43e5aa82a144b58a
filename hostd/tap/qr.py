"""ESC/POS bytes that print a QR code: native GS ( k, or a raster image (GS v 0 / ESC *).

Rules this module keeps:
- Pure functions from content and size to bytes; the QR matrix comes from segno (ISO 18004).
- Raster output is 1 bit per dot, most significant bit leftmost (GS v 0) or topmost (ESC *),
  black = 1, with the standard 4-module quiet zone, as the Epson reference defines them.
- Nothing here knows about receipts or printer state; inject.py frames these bytes with the
  alignment, caption and state restoration a receipt needs.
"""

from __future__ import annotations

import segno

EC_LEVELS = {"L": 48, "M": 49, "Q": 50, "H": 51}   # GS ( k 1 E n
MAX_CONTENT = 1024    # bytes; a receipt QR is a URL or a token, never a document
QUIET = 4             # modules of white around the symbol (ISO 18004)


def _gs_k(fn: int, data: bytes) -> bytes:
    n = len(data) + 2  # pL pH count cn, fn and the parameters
    return b"\x1d(k" + bytes((n & 0xFF, n >> 8, 49, fn)) + data


def native(content: bytes, module: int, ec: str) -> bytes:
    """Model 2 QR via GS ( k: select model, module size, error correction, store, print."""
    if not 1 <= module <= 16:
        raise ValueError(f"module size {module} is outside 1..16")
    if not content or len(content) > MAX_CONTENT:
        raise ValueError(f"QR content of {len(content)} bytes (1..{MAX_CONTENT})")
    return b"".join((
        _gs_k(65, b"\x32\x00"),             # model 2
        _gs_k(67, bytes((module,))),        # dots per module
        _gs_k(69, bytes((EC_LEVELS[ec],))),
        _gs_k(80, b"\x30" + content),       # store symbol data
        _gs_k(81, b"\x30"),                 # print it
    ))


def matrix(content: bytes, ec: str) -> list[list[bool]]:
    """The QR modules, quiet zone included, row by row (True = dark)."""
    if not content or len(content) > MAX_CONTENT:
        raise ValueError(f"QR content of {len(content)} bytes (1..{MAX_CONTENT})")
    qr = segno.make_qr(content, error=ec.lower(), boost_error=False)
    return [[bool(v) for v in row] for row in qr.matrix_iter(scale=1, border=QUIET)]


def fit_module(modules: int, module: int, width: int) -> int:
    """The largest module size <= `module` whose symbol fits `width` dots; error if none does."""
    fitted = min(module, width // modules)
    if fitted < 1:
        raise ValueError(f"a {modules}-module QR does not fit {width} dots")
    return fitted


def _scaled_rows(mx: list[list[bool]], scale: int) -> tuple[int, list[int]]:
    # each row as one integer of width*scale bits, leftmost dot in the most significant bit
    width = len(mx[0]) * scale
    rows = []
    for row in mx:
        bits = 0
        for dark in row:
            bits = (bits << scale) | (((1 << scale) - 1) if dark else 0)
        rows.extend([bits] * scale)
    return width, rows


def raster_gs_v0(mx: list[list[bool]], scale: int) -> bytes:
    """GS v 0 0 xL xH yL yH + rows of ceil(width/8) bytes."""
    width, rows = _scaled_rows(mx, scale)
    nbytes = (width + 7) // 8
    pad = nbytes * 8 - width
    body = b"".join((bits << pad).to_bytes(nbytes, "big") for bits in rows)
    return (b"\x1dv0\x00" + nbytes.to_bytes(2, "little") + len(rows).to_bytes(2, "little")
            + body)


def raster_esc_star(mx: list[list[bool]], scale: int, spacing: int) -> bytes:
    """24-dot double-density ESC * bands (m = 33), each ended by LF, at line spacing `spacing`.

    The caller restores the line spacing afterwards; `spacing` is what makes bands touch on the
    printer (24 on 203 dpi printers whose motion unit is one dot).
    """
    width, rows = _scaled_rows(mx, scale)
    rows += [0] * (-len(rows) % 24)
    out = [b"\x1b3" + bytes((spacing,))]
    head = b"\x1b*\x21" + width.to_bytes(2, "little")
    for top in range(0, len(rows), 24):
        band = rows[top:top + 24]
        cols = bytearray(3 * width)
        for r, bits in enumerate(band):
            if not bits:
                continue
            byte, mask = r // 8, 0x80 >> (r % 8)
            for x in range(width):
                if bits >> (width - 1 - x) & 1:
                    cols[3 * x + byte] |= mask
        out.append(head + bytes(cols) + b"\n")
    return b"".join(out)
