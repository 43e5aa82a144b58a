"""The ESC/POS command table: how long every command really is.

Rules this module keeps:
- A command is an introducer (ESC 1B, FS 1C, GS 1D, DLE 10) and a function byte, then parameters.
  `measure(buf, i, n)` looks at the command starting at `buf[i]` (bytes up to `n` are available)
  and answers NEED (more bytes are needed to know), BAD (no length is known for this function or
  its parameters are invalid: the caller falls back, see escpos.py) or a `Size`.
- A `Size` splits the command into a header (bounded: at most ~300 bytes, fully parsed) and a
  payload (raster data etc., any length, streamed by the caller without buffering), optionally
  followed by `segments` repeated (segment header, payload) blocks (ESC &, FS q).
- Lengths follow the Epson ESC/POS reference, with the Chinese-printer commands (FS &, FS ., FS 2,
  ESC B, ESC Z) that GB18030 printers add. Nothing here keeps state or does I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

ESC, FS, GS, DLE = 0x1B, 0x1C, 0x1D, 0x10
INTRODUCERS = {ESC: "ESC", FS: "FS", GS: "GS", DLE: "DLE"}

# command kinds: what a command does to the paper (receipt.py decides roles from these)
INIT = "init"        # ESC @
CUT = "cut"          # GS V, ESC i, ESC m
PRINT = "print"      # puts marks on paper: images, barcodes, symbols, NV logos, page print
FEED = "feed"        # moves paper, prints the line buffer if it holds anything
MODE = "mode"        # changes settings only
DEFINE = "define"    # stores data (user characters, graphics, symbol data) without printing
STATUS = "status"    # asks the printer for a reply (or enables automatic status back)
PULSE = "pulse"      # drawer kick, buzzer, power-off: hardware, prints nothing
PAGE = "page"        # page-mode enter/leave

NEED = None          # measure(): not enough bytes yet
BAD = -1             # measure(): no known length; caller falls back


class Size(NamedTuple):
    header: int                  # bytes parsed as the command header (includes up to 2 data bytes)
    payload: int = 0             # bytes streamed after the header
    kind: str = MODE
    reply: bool = False          # the printer answers (DLE EOT, GS r, ...): pass replies back
    realtime: bool = False       # executed on receipt, even mid-buffer (DLE commands)
    segments: int = 0            # repeated blocks after the payload (ESC &, FS q)
    seg_header: int = 0          # bytes in each block's header
    seg_payload: Callable[[bytes], int] | None = None  # block header -> block payload length


Measure = Callable[[bytes, int, int], "Size | int | None"]

# fixed-length commands: (introducer, function) -> (parameter count, kind, reply)
_FIXED: dict[tuple[int, int], tuple[int, str, bool]] = {}


def _fixed(intro: int, spec: str) -> None:
    # "c:n:kind[:r]" entries, one per command; c is the function character
    for entry in spec.split():
        parts = entry.split(":")
        fn = ord(parts[0]) if len(parts[0]) == 1 else int(parts[0], 16)
        _FIXED[(intro, fn)] = (int(parts[1]), parts[2], len(parts) > 3)


_fixed(ESC, "0c:0:print 20:1:mode !:1:mode $:2:mode %:1:mode -:1:mode 2:0:mode 3:1:mode "
            "<:0:mode =:1:mode ?:1:define @:0:init E:1:mode G:1:mode J:1:feed L:0:page "
            "M:1:mode R:1:mode S:0:page T:1:mode U:1:mode V:1:mode W:8:mode \\:2:mode a:1:mode "
            "c:2:mode d:1:feed e:1:feed i:0:cut m:0:cut p:3:pulse r:1:mode t:1:mode "
            "u:1:status:r v:0:status:r {:1:mode B:2:pulse")
_fixed(GS, "!:1:mode $:2:mode /:1:print 3a:0:mode B:1:mode E:1:mode H:1:mode I:1:status:r "
           "L:2:mode P:2:mode T:1:mode W:2:mode \\:2:mode ^:3:mode a:1:status:r b:1:mode "
           "c:0:print f:1:mode h:1:mode j:1:status:r r:1:status:r w:1:mode z:3:mode Z:1:mode")
_fixed(FS, "!:1:mode &:0:mode -:1:mode .:0:mode 2:74:define C:1:mode S:2:mode W:1:mode "
           "p:2:print ?:2:define")


def _u16(buf: bytes, i: int) -> int:
    return buf[i] | buf[i + 1] << 8


def _len16(kinds: Callable[[int, int], tuple[str, bool]]) -> Measure:
    # X ( fn pL pH d1..dk: k = pL + 256 pH; the first two data bytes (m/cn, fn) go in the header
    def measure(buf: bytes, i: int, n: int) -> Size | int | None:
        if n - i < 5:
            return NEED
        k = _u16(buf, i + 3)
        lead = min(k, 2)
        if n - i < 5 + lead:
            return NEED
        fn = buf[i + 2]
        sub = buf[i + 6] if lead == 2 else -1
        kind, reply = kinds(fn, sub)
        return Size(5 + lead, k - lead, kind, reply)
    return measure


def _gs_paren_kind(fn: int, sub: int) -> tuple[str, bool]:
    if fn == 0x6B:  # GS ( k: 2D symbols; sub is fn within cn
        return (PRINT, False) if sub == 81 else (STATUS, True) if sub == 82 else \
            (DEFINE, False) if sub == 80 else (MODE, False)
    if fn == 0x4C:  # GS ( L graphics
        return _graphics_kind(sub)
    if fn == 0x48:  # GS ( H: request a response or status
        return STATUS, True
    if fn == 0x41:  # GS ( A: test print
        return PRINT, False
    return MODE, False


def _graphics_kind(fn: int) -> tuple[str, bool]:
    if fn in (48, 51, 52, 64, 80):
        return STATUS, True
    if fn in (50, 69, 85):
        return PRINT, False
    return (MODE, False) if fn == 49 else (DEFINE, False)


def _gs_8(buf: bytes, i: int, n: int) -> Size | int | None:
    # GS 8 L p1 p2 p3 p4 m fn ...: the 32-bit form of GS ( L
    if n - i < 3:
        return NEED
    if buf[i + 2] != 0x4C:
        return BAD
    if n - i < 7:
        return NEED
    k = int.from_bytes(buf[i + 3:i + 7], "little")
    lead = min(k, 2)
    if n - i < 7 + lead:
        return NEED
    kind, reply = _graphics_kind(buf[i + 8] if lead == 2 else -1)
    return Size(7 + lead, k - lead, kind, reply)


def _esc_star(buf: bytes, i: int, n: int) -> Size | int | None:
    # ESC * m nL nH: 8-dot modes (m 0, 1) one byte per column, 24-dot modes (32, 33) three
    if n - i < 5:
        return NEED
    per = {0: 1, 1: 1, 32: 3, 33: 3}.get(buf[i + 2])
    return BAD if per is None else Size(5, per * _u16(buf, i + 3), PRINT)


def _esc_amp(buf: bytes, i: int, n: int) -> Size | int | None:
    # ESC & y c1 c2 [x d1..d(y*x)] per character c1..c2
    if n - i < 5:
        return NEED
    y, c1, c2 = buf[i + 2], buf[i + 3], buf[i + 4]
    if not 1 <= y <= 4 or c2 < c1:
        return BAD
    return Size(5, 0, DEFINE, segments=c2 - c1 + 1, seg_header=1,
                seg_payload=lambda h, y=y: y * h[0])


def _esc_d(buf: bytes, i: int, n: int) -> Size | int | None:
    # ESC D n1..nk NUL: ends at NUL, after 32 positions, or before a position that does not
    # increase (that byte is then ordinary data, as the printer treats it)
    j, prev = i + 2, 0
    while j < n and j - i - 2 < 32:
        v = buf[j]
        if v == 0:
            return Size(j + 1 - i)
        if v <= prev:
            return Size(j - i)
        prev, j = v, j + 1
    return Size(j - i) if j - i - 2 >= 32 else NEED


_BARCODE_NUL_MAX = 255


def _gs_k(buf: bytes, i: int, n: int) -> Size | int | None:
    # GS k m d1..dk NUL (m 0..6) or GS k m n d1..dn (m 65..79); data stays in the header
    if n - i < 3:
        return NEED
    m = buf[i + 2]
    if m <= 6:
        end = min(n, i + 3 + _BARCODE_NUL_MAX + 1)
        for j in range(i + 3, end):
            if buf[j] < 0x20:  # barcode data is printable; NUL ends it, any other control is bad
                return Size(j + 1 - i, 0, PRINT) if buf[j] == 0 else BAD
        return NEED if end == n and end - i - 3 <= _BARCODE_NUL_MAX else BAD
    if 65 <= m <= 79:
        if n - i < 4:
            return NEED
        size = 4 + buf[i + 3]
        return Size(size, 0, PRINT) if n - i >= size else NEED
    return BAD


def _gs_v(buf: bytes, i: int, n: int) -> Size | int | None:
    # GS v 0 m xL xH yL yH: raster image, (xL + 256 xH) bytes per row, (yL + 256 yH) rows
    if n - i < 3:
        return NEED
    if buf[i + 2] != 0x30:
        return BAD
    if n - i < 8:
        return NEED
    return Size(8, _u16(buf, i + 4) * _u16(buf, i + 6), PRINT)


def _gs_cut(buf: bytes, i: int, n: int) -> Size | int | None:
    # GS V m (m 0, 1, 48, 49) or GS V m n (65, 66 feed and cut; 97, 98 preset; 103, 104)
    if n - i < 3:
        return NEED
    m = buf[i + 2]
    if m in (0, 1, 48, 49):
        return Size(3, 0, CUT)
    if m in (65, 66, 97, 98, 103, 104):
        return Size(4, 0, CUT) if n - i >= 4 else NEED
    return BAD


def _gs_star(buf: bytes, i: int, n: int) -> Size | int | None:
    # GS * x y d1..d(x*y*8): define downloaded bit image
    if n - i < 4:
        return NEED
    return Size(4, buf[i + 2] * buf[i + 3] * 8, DEFINE)


def _gs_c(buf: bytes, i: int, n: int) -> Size | int | None:
    # GS C 0 n m / GS C 1 aL aH bL bH n r / GS C 2 nL nH (obsolete counter printing)
    if n - i < 3:
        return NEED
    extra = {0: 2, 48: 2, 1: 6, 49: 6, 2: 2, 50: 2}.get(buf[i + 2])
    if extra is None:
        return BAD
    return Size(3 + extra) if n - i >= 3 + extra else NEED


def _gs_g(buf: bytes, i: int, n: int) -> Size | int | None:
    # GS g 0 m nL nH (reset maintenance counter) / GS g 2 m nL nH (transmit it)
    if n - i < 6:
        return NEED
    sub = buf[i + 2]
    return Size(6, 0, STATUS, True) if sub in (2, 50) else Size(6)


def _fs_q(buf: bytes, i: int, n: int) -> Size | int | None:
    # FS q n [xL xH yL yH d1..d(x*y*8)] * n: define NV bit images
    if n - i < 3:
        return NEED
    count = buf[i + 2]
    if count == 0:
        return BAD
    return Size(3, 0, DEFINE, segments=count, seg_header=4,
                seg_payload=lambda h: _u16(h, 0) * _u16(h, 2) * 8)


def _fs_g(buf: bytes, i: int, n: int) -> Size | int | None:
    # FS g 1 m a1..a4 nL nH d1..dk (write NV user memory) / FS g 2 m a1..a4 nL nH (read it)
    if n - i < 10:
        return NEED
    sub = buf[i + 2]
    if sub in (1, 49):
        return Size(10, _u16(buf, i + 8), DEFINE)
    if sub in (2, 50):
        return Size(10, 0, STATUS, True)
    return BAD


def _esc_z(buf: bytes, i: int, n: int) -> Size | int | None:
    # ESC Z m n k dL dH d1..d(dL + 256 dH): print a 2D symbol (QR) on Chinese printers
    if n - i < 7:
        return NEED
    return Size(7, _u16(buf, i + 5), PRINT)


def _dle_eot(buf: bytes, i: int, n: int) -> Size | int | None:
    # DLE EOT n (n 7 and 8 take one more byte): real-time status, answered at once
    if n - i < 3:
        return NEED
    size = 4 if buf[i + 2] in (7, 8) else 3
    return Size(size, 0, STATUS, True, True) if n - i >= size else NEED


def _dle_enq(buf: bytes, i: int, n: int) -> Size | int | None:
    return Size(3, 0, PULSE, False, True) if n - i >= 3 else NEED


def _dle_dc4(buf: bytes, i: int, n: int) -> Size | int | None:
    # DLE DC4 fn ...: 1 pulse (m t), 2 power off (a b), 3 buzzer (a n r t1 t2),
    # 7 transmit status (m), 8 clear buffers (d1..d7, answers with 3 bytes)
    if n - i < 3:
        return NEED
    fn = buf[i + 2]
    spec = {1: (2, False), 2: (2, False), 3: (5, False), 7: (1, True), 8: (7, True)}.get(fn)
    if spec is None:
        return BAD
    size = 3 + spec[0]
    if n - i < size:
        return NEED
    return Size(size, 0, STATUS if spec[1] else PULSE, spec[1], True)


_SPECIAL: dict[tuple[int, int], Measure] = {
    (ESC, 0x2A): _esc_star, (ESC, 0x26): _esc_amp, (ESC, 0x44): _esc_d, (ESC, 0x5A): _esc_z,
    (ESC, 0x28): _len16(lambda fn, sub: (PULSE, False) if fn == 0x41 else (MODE, False)),
    (GS, 0x28): _len16(_gs_paren_kind), (GS, 0x38): _gs_8, (GS, 0x6B): _gs_k,
    (GS, 0x76): _gs_v, (GS, 0x56): _gs_cut, (GS, 0x2A): _gs_star, (GS, 0x43): _gs_c,
    (GS, 0x67): _gs_g,
    (FS, 0x28): _len16(lambda fn, sub: (STATUS, True) if fn == 0x65 else (MODE, False)),
    (FS, 0x71): _fs_q, (FS, 0x67): _fs_g,
    (DLE, 0x04): _dle_eot, (DLE, 0x05): _dle_enq, (DLE, 0x14): _dle_dc4,
}


def measure(buf: bytes, i: int, n: int,
            extra: dict[tuple[int, int], int] | None = None) -> Size | int | None:
    """Size of the command at buf[i] (an introducer byte); NEED or BAD as documented above."""
    if n - i < 2:
        return NEED
    key = (buf[i], buf[i + 1])
    fixed = _FIXED.get(key)
    if fixed is not None:
        size = 2 + fixed[0]
        return Size(size, 0, fixed[1], fixed[2]) if n - i >= size else NEED
    special = _SPECIAL.get(key)
    if special is not None:
        return special(buf, i, n)
    if extra and key in extra:  # installer-supplied vendor commands (fixed parameter counts)
        size = 2 + extra[key]
        return Size(size) if n - i >= size else NEED
    return BAD


def name_of(raw: bytes) -> str:
    """A readable command name: "GS V", "GS ( k", "ESC @"."""
    intro = INTRODUCERS.get(raw[0], f"{raw[0]:02X}")
    if len(raw) < 2:
        return intro
    fn = raw[1]
    text = chr(fn) if 0x21 <= fn <= 0x7E else f"{fn:02X}"
    if fn == 0x28 and len(raw) > 2:  # X ( fn
        text += " " + (chr(raw[2]) if 0x21 <= raw[2] <= 0x7E else f"{raw[2]:02X}")
    elif raw[:3] in (b"\x1d8L", b"\x1dv0"):
        text += " " + chr(raw[2])
    return intro + " " + text
