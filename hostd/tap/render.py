"""Draw what an ESC/POS stream would print, so a person (or a barcode decoder) can look at it.

Rules this module keeps:
- Input is parser events (escpos.py); printer state comes from receipt.Assembler, so the
  renderer and the injector agree on alignment, modes, code pages and Chinese mode.
- Raster data is drawn exactly as sent (GS v 0, ESC *, GS ( L / GS 8 L, GS * + GS /): 1 = black,
  leftmost/topmost dot in the most significant bit. QR (GS ( k, ESC Z) and 1D barcodes (GS k) are
  drawn from their data with segno and python-barcode; what cannot be drawn (NV logos stored in
  the printer, unsupported symbologies) becomes a labelled box. Cuts are dashed lines.
- Layout is an approximation of a 203 dpi printer (12x24 font A, 24-dot Chinese characters,
  30-dot default line spacing); it is for looking at, not for measuring.
- Never raises on any input: a drawing error becomes a labelled box.
"""

from __future__ import annotations

import codecs
from pathlib import Path

import segno
from hexiao.hostd.tap import escpos_commands as k
from hexiao.hostd.tap.escpos import Command, Control, Event, Payload, Text, parse
from hexiao.hostd.tap.receipt import CUT, Assembler
from PIL import Image, ImageDraw, ImageFont

FONT_CANDIDATES = (  # a CJK-capable font first; DejaVu draws Latin only
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/wenquanyi/wqy-zenhei/wqy-zenhei.ttc",
    "/System/Library/Fonts/PingFang.ttc", "C:/Windows/Fonts/msyh.ttc",
    "C:/Windows/Fonts/simsun.ttc",
    "/usr/share/fonts/truetype/dejavu/DejaVuSansMono.ttf",
)
CHAR_H, DEFAULT_SPACING, MARGIN = 24, 30, 16
_BARCODES = {0: "upca", 65: "upca", 2: "ean13", 67: "ean13", 3: "ean8", 68: "ean8",
             4: "code39", 69: "code39", 5: "itf", 70: "itf", 6: "codabar", 71: "codabar",
             73: "code128"}
_EC = {48: "l", 49: "m", 50: "q", 51: "h"}


def find_font(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit
    return next((p for p in FONT_CANDIDATES if Path(p).is_file()), None)


def _bits(data: bytes, width: int, height: int) -> Image.Image:
    # 1 = black, MSB leftmost: Pillow's inverted 1-bit raw mode
    need = (width + 7) // 8 * height
    data = data[:need].ljust(need, b"\x00")
    return Image.frombytes("1", (width, height), data, "raw", "1;I").convert("L")


class Renderer:
    def __init__(self, width: int = 576, encoding: str = "gb18030", kanji_default: bool = True,
                 font: str | None = None) -> None:
        self.width = width
        self.asm = Assembler(encoding, kanji_default)
        path = find_font(font)
        self._font_path = path
        self._fonts: dict[int, ImageFont.ImageFont | ImageFont.FreeTypeFont] = {}
        self._ops: list[tuple[int, int, Image.Image]] = []   # (x, y, image)
        self._cuts: list[int] = []
        self.y = 0
        self._line: list[Image.Image] = []
        self._decoder: codecs.IncrementalDecoder | None = None
        self._encoding = ""
        self._cmd: Command | None = None
        self._data = bytearray()
        self._qr = {"module": 3, "ec": "l", "data": b""}
        self._bar = {"h": 162, "w": 3, "hri": 0}
        self._graphics: Image.Image | None = None
        self._stored: dict[bytes, Image.Image] = {}

    def _font(self, size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
        if size not in self._fonts:
            self._fonts[size] = (ImageFont.truetype(self._font_path, size) if self._font_path
                                 else ImageFont.load_default(size))
        return self._fonts[size]

    # -- layout --

    def _scale(self) -> tuple[int, int]:
        st = self.asm.state
        w, h = (st.size >> 4 & 7) + 1, (st.size & 7) + 1
        return w * (2 if st.esc_bang & 0x20 else 1), h * (2 if st.esc_bang & 0x10 else 1)

    def _text(self, text: str) -> None:
        if not text:
            return
        sw, sh = self._scale()
        font = self._font(CHAR_H)
        box = font.getbbox(text)
        img = Image.new("L", (max(1, box[2]), CHAR_H + 4), 255)
        ImageDraw.Draw(img).text((0, 0), text, font=font, fill=0)
        if self.asm.state.reverse:
            img = img.point(lambda v: 255 - v)
        self._line.append(img.resize((img.width * sw, img.height * sh)) if sw * sh > 1 else img)

    def _place(self, img: Image.Image) -> None:
        # a full-width block (raster, QR, barcode) at the current alignment
        self._end_line(feed=False)
        align = self.asm.state.align
        x = (0, (self.width - img.width) // 2, self.width - img.width)[align]
        self._ops.append((max(0, x), self.y, img))
        self.y += img.height

    def _end_line(self, feed: bool = True, dots: int | None = None) -> None:
        self._flush_text()
        spacing = self.asm.state.spacing or DEFAULT_SPACING
        if self._line:
            width = sum(i.width for i in self._line)
            height = max(i.height for i in self._line)
            x = (0, (self.width - width) // 2, self.width - width)[self.asm.state.align]
            for img in self._line:
                self._ops.append((max(0, x), self.y + height - img.height, img))
                x += img.width
            self._line = []
            self.y += max(height, spacing) if feed and dots is None else height
        elif feed and dots is None:
            self.y += spacing
        if dots is not None:
            self.y += dots

    def _flush_text(self) -> None:
        if self._decoder is not None:
            self._text(self._decoder.decode(b"", final=True))
            self._decoder = None

    # -- events --

    def feed(self, events: list[Event]) -> None:
        for ev in events:
            try:
                self._event(ev)
            except Exception as exc:  # a picture is never worth a crash
                self._place(self._box(f"[cannot draw: {type(exc).__name__}]"))

    def _event(self, ev: Event) -> None:
        asm = self.asm
        role = asm.classify(ev)
        if isinstance(ev, Text):
            enc = asm.state.text_encoding(asm.encoding, asm.kanji_default)
            if enc != self._encoding or self._decoder is None:
                self._flush_text()
                self._encoding = enc
                self._decoder = codecs.getincrementaldecoder(enc)(errors="replace")
            self._text(self._decoder.decode(ev.raw))
        elif isinstance(ev, Control):
            b = ev.raw[0]
            if b in (0x0A, 0x0C):  # CR is ignored (automatic line feed off, the default)
                self._end_line()
            elif b == 0x09:
                self._flush_text()
                self._line.append(Image.new("L", (48, CHAR_H), 255))
        elif isinstance(ev, Command):
            self._command(ev, role)
        elif isinstance(ev, Payload) and self._cmd is not None:
            self._data += ev.raw
            if len(self._data) >= self._cmd.payload:
                self._complete(self._cmd, bytes(self._data))
                self._cmd = None
        asm.apply(ev, role)

    def _command(self, ev: Command, role: str) -> None:
        if ev.kind != k.MODE:
            self._flush_text()
        if ev.payload:
            self._cmd, self._data = ev, bytearray()
            return
        self._complete(ev, b"")
        if role == CUT:
            self._end_line(feed=False)
            self._cuts.append(self.y)
            self.y += 8

    def _complete(self, ev: Command, data: bytes) -> None:
        key, a = ev.raw[:2], ev.raw[2:]
        if key in (b"\x1bd", b"\x1bJ"):
            self._end_line(dots=None if key == b"\x1bd" else a[0])
            if key == b"\x1bd":
                self.y += (self.asm.state.spacing or DEFAULT_SPACING) * max(0, a[0] - 1)
        elif ev.name == "GS v 0":
            x, y, m = a[2] | a[3] << 8, a[4] | a[5] << 8, a[1] & 3
            img = _bits(data, x * 8, y)
            self._place(img.resize((img.width * (1 + (m & 1)), img.height * (1 + (m >> 1)))))
        elif key == b"\x1b*":
            self._esc_star(a[0], data)
        elif ev.name in ("GS ( L", "GS 8 L"):
            self._graphics_cmd(ev.raw[-1], data)
        elif key == b"\x1d*":
            x, y = a[0], a[1]
            img = _bits(data, y * 8, x * 8).transpose(Image.Transpose.TRANSPOSE)
            self._stored[b"gs*"] = img
        elif key == b"\x1d/" and b"gs*" in self._stored:
            self._place(self._stored[b"gs*"])
        elif key == b"\x1dk":
            self._barcode(a[0], a[2:] if a[0] >= 65 else a[1:-1])
        elif key == b"\x1dh":
            self._bar["h"] = a[0]
        elif key == b"\x1dw":
            self._bar["w"] = a[0]
        elif key == b"\x1dH":
            self._bar["hri"] = a[0] % 48
        elif ev.name == "GS ( k" and len(ev.raw) == 7:
            self._symbol(ev.raw[5], ev.raw[6], data)
        elif key == b"\x1bZ":
            self._qr_image(data, _EC.get(48 + a[1], "m") if a[1] < 4 else "m", max(1, a[2]))
        elif key == b"\x1cp":
            self._place(self._box(f"[NV logo {a[0]}]"))

    def _esc_star(self, m: int, data: bytes) -> None:
        tall = 24 if m >= 32 else 8
        cols = len(data) // (tall // 8)
        img = _bits(data, tall, cols).transpose(Image.Transpose.TRANSPOSE)
        img = img.resize((img.width * (1 if m & 1 else 2), img.height * (1 if m >= 32 else 3)))
        self._flush_text()
        self._line.append(img)

    def _graphics_cmd(self, fn: int, data: bytes) -> None:
        if fn == 112 and len(data) >= 8:     # store raster graphics in the print buffer
            bx, by = data[1], data[2]
            x, y = data[4] | data[5] << 8, data[6] | data[7] << 8
            img = _bits(data[8:], x, y)
            self._graphics = img.resize((img.width * max(1, bx % 48), img.height * max(1, by % 48)))
        elif fn == 50 and self._graphics is not None:
            self._place(self._graphics)
            self._graphics = None
        elif fn in (67, 83) and len(data) >= 9:  # define NV / download graphics (raster)
            x, y = data[4] | data[5] << 8, data[6] | data[7] << 8
            self._stored[bytes(data[1:3])] = _bits(data[9:], x, y)
        elif fn in (69, 85) and len(data) >= 2:
            img = self._stored.get(bytes(data[:2]))
            label = f"[logo {data[:2].decode('latin-1')}]"
            self._place(img if img is not None else self._box(label))

    def _symbol(self, cn: int, fn: int, data: bytes) -> None:
        if cn != 49:
            if fn == 81:
                self._place(self._box("[2D symbol]"))
            return
        if fn == 67 and data:
            self._qr["module"] = max(1, data[0])
        elif fn == 69 and data:
            self._qr["ec"] = _EC.get(data[0], "l")
        elif fn == 80:
            self._qr["data"] = data[1:]
        elif fn == 81:
            self._qr_image(self._qr["data"], self._qr["ec"], self._qr["module"])

    def _qr_image(self, data: bytes, ec: str, module: int) -> None:
        qr = segno.make_qr(data, error=ec, boost_error=False)
        rows = list(qr.matrix_iter(scale=module, border=4))
        img = Image.new("L", (len(rows[0]), len(rows)), 255)
        img.putdata([0 if v else 255 for row in rows for v in row])
        self._place(img)

    def _barcode(self, m: int, data: bytes) -> None:
        import barcode  # python-barcode: symbology rules, drawn here as bars

        text = data.decode("ascii", "replace")
        kind = _BARCODES.get(m)
        if kind is None:
            self._place(self._box(f"[barcode {m}: {text}]"))
            return
        if kind == "code128":
            text = text[2:] if text.startswith("{") else text
        if kind == "upca" and len(text) == 12:
            text = text[:11]
        modules = barcode.get_barcode_class(kind)(text).build()[0]
        w, h = max(1, self._bar["w"]), max(1, self._bar["h"])
        img = Image.new("L", (len(modules) * w, h), 255)
        draw = ImageDraw.Draw(img)
        for i, bit in enumerate(modules):
            if bit == "1":
                draw.rectangle((i * w, 0, i * w + w - 1, h - 1), fill=0)
        if self._bar["hri"] & 2:
            hri = self._box(text, border=False)
            both = Image.new("L", (max(img.width, hri.width), h + hri.height), 255)
            both.paste(img, ((both.width - img.width) // 2, 0))
            both.paste(hri, ((both.width - hri.width) // 2, h))
            img = both
        self._place(img)

    def _box(self, label: str, border: bool = True) -> Image.Image:
        font = self._font(20)
        box = font.getbbox(label)
        img = Image.new("L", (box[2] + 12, 32), 255)
        draw = ImageDraw.Draw(img)
        if border:
            draw.rectangle((0, 0, img.width - 1, img.height - 1), outline=0)
        draw.text((6, 4), label, font=font, fill=0)
        return img

    def image(self) -> Image.Image:
        """The paper so far, with a white margin all round."""
        self._end_line(feed=False)
        height = max(self.y, 1) + 2 * MARGIN
        page = Image.new("L", (self.width + 2 * MARGIN, height), 255)
        for x, y, img in self._ops:
            page.paste(img, (x + MARGIN, y + MARGIN))
        draw = ImageDraw.Draw(page)
        for y in self._cuts:
            for x in range(0, page.width, 16):
                draw.line((x, y + MARGIN + 4, x + 8, y + MARGIN + 4), fill=0, width=2)
        return page


def render(data: bytes, width: int = 576, encoding: str = "gb18030",
           kanji_default: bool = True, font: str | None = None) -> Image.Image:
    r = Renderer(width, encoding, kanji_default, font)
    r.feed(parse(data))
    return r.image()
