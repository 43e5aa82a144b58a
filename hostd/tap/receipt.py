"""Receipt assembly from parser events: printer state, text, totals, and where receipts end.

Rules this module keeps:
- It only reads events (escpos.py); no I/O, no clock.
- Printer state is tracked as the printer would: alignment, print modes, line spacing, code page,
  Chinese (kanji) mode, page mode, whether the line buffer holds unprinted data. A stream that
  does not start with ESC @ is assumed to start from the printer's power-on defaults.
- Text is decoded with the encoding in force: the profile's (GB18030) in Chinese mode, else the
  ESC t code page. Decoders are incremental, so a multibyte character split across Text events
  (or chunks) is never broken; a decoder is finished only at a line end or an encoding change.
- Every event has a role for the injector: PRINTS (puts marks on paper), NEUTRAL (feeds and
  settings: may follow an injected block without changing the receipt), URGENT (status requests
  and real-time commands: never held back), CUT, BOUNDARY (ESC @ after printed content on a
  printer without a cutter) or BARRIER (unknown or truncated commands: framing is uncertain).
- Receipt boundaries: a real cut (GS V, ESC i, ESC m) always ends a receipt; on a printer without
  a cutter so does ESC @ after printed content; the end of a job (end of stream, connection
  close, idle) ends whatever is open. A receipt after an unknown command is `uncertain` until the
  next ESC @ (re-initialisation is the only point where framing is known again).
- What a receipt keeps is bounded whatever the stream: LINE_MAX characters of a line (the rest
  is not even decoded, the line ends in "…"), and its first LINES_HEAD and last LINES_TAIL lines
  (`lines_dropped` counts the middle; totals sit near the end). A job of any length that never
  cuts costs the same memory as a long receipt; the bytes themselves are not kept here at all.
- A void (the POS cancelling a whole sale) is a receipt with a void word (VOID_WORDS, or the
  tap's `void_words`) in its first VOID_HEAD lines or on a total's line or the line next to it;
  a word among the items (a line void: one item taken off a sale) is not a void. Latin words
  match whole and case-blind. The receipt's own number and the number of the sale it voids
  are read when printed (NUMBER, ORIGINAL); nothing is guessed here (members/service.py links
  a void without a number).
"""

from __future__ import annotations

import codecs
import dataclasses
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation

from hexiao.hostd.tap import escpos_commands as k
from hexiao.hostd.tap.escpos import Command, Control, Event, Payload, Text, Truncated, Unknown

PRINTS, NEUTRAL, URGENT, CUT, BOUNDARY, BARRIER = (
    "prints", "neutral", "urgent", "cut", "boundary", "barrier")

LF, CR, HT, FF = 0x0A, 0x0D, 0x09, 0x0C

# what one receipt keeps of its text: an 80 mm line holds 48-64 characters, a long supermarket
# receipt a few hundred lines; anything beyond is hostile or broken and is summarised, not kept
LINE_MAX = 256
LINES_HEAD, LINES_TAIL = 150, 100   # at most 64K characters a receipt

# ESC t n -> Python codec, for single-byte mode (Chinese mode off)
CODE_PAGES = {0: "cp437", 2: "cp850", 3: "cp860", 4: "cp863", 5: "cp865", 16: "cp1252",
              17: "cp866", 18: "cp852", 19: "cp858", 45: "cp1250", 46: "cp1251", 47: "cp1253",
              48: "cp1254", 49: "cp1255", 50: "cp1256", 51: "cp1257", 52: "cp1258"}

# (name, label pattern), in priority order: the first label found gives the receipt's total.
# 应收 (amount due) before 合计/总计 (sum) before Total; 实收 (tendered) last: it may exceed
# what was due.
DEFAULT_TOTALS: tuple[tuple[str, str], ...] = (
    ("应收", r"应\s*收"), ("合计", r"合\s*计"), ("总计", r"总\s*计"),
    ("Total", r"(?i)(?<![a-z])(?:grand\s+)?total(?![a-z])"), ("实收", r"实\s*收"),
)
# a void of a whole sale, as POS receipts print it; matched in the head and near the total only
VOID_WORDS: tuple[str, ...] = ("VOID", "VOIDED", "作废", "撤销", "取消交易")
VOID_HEAD = 8
# the receipt's own number and the one it voids ("原单号 000123"); (?<!原) keeps them apart.
# A latin label needs "No." / "#" / ":" after it ("keep this receipt for..." is no number).
_ID = r"([A-Za-z0-9][A-Za-z0-9_-]{2,31})"
_ZH = r"(?:单\s*号|流\s*水\s*号|小\s*票\s*号|票\s*号)\s*[:：#]?\s*" + _ID
_EN = r"(?<![a-z])(?:receipt|trans(?:action)?)\s*(?:(?:No\.?|#|Number)\s*[:：]?|[:：])\s*" + _ID
NUMBER = re.compile(rf"(?i)(?<!原)(?<!原\s){_ZH}|(?<!orig\.\s)(?<!original\s){_EN}")
ORIGINAL = re.compile(rf"(?i)原\s*{_ZH}|(?<![a-z])orig(?:inal|\.)?\s*{_EN}")
# an amount: thousands with commas, a decimal point, or a decimal comma with two digits (6,50)
_AMOUNT = re.compile(
    r"[-−]?\s*(?:[¥￥$]|RMB|CNY)?\s*(\d{1,3}(?:,\d{3})+|\d+)(\.\d+|,\d{2}(?!\d))?")


@dataclass
class PrinterState:
    align: int = 0
    esc_bang: int = 0        # ESC ! n as last sent
    emph: int = 0            # ESC E (and ESC ! bit 3)
    underline: int = 0       # ESC - (and ESC ! bit 7)
    size: int = 0            # GS ! n
    reverse: int = 0         # GS B n
    spacing: int | None = None   # ESC 3 n; None = default (ESC 2)
    code_page: int = 0
    kanji: bool | None = None    # FS & / FS .; None = printer default (profile)
    page_mode: bool = False
    line_open: bool = False      # the line buffer holds data a LF would print
    qr_settings: dict[int, bytes] = field(default_factory=dict)  # GS ( k 1 A/C/E as sent

    def copy(self) -> PrinterState:
        return dataclasses.replace(self, qr_settings=dict(self.qr_settings))

    def text_encoding(self, encoding: str, kanji_default: bool) -> str:
        kanji = kanji_default if self.kanji is None else self.kanji
        return encoding if kanji else CODE_PAGES.get(self.code_page, "cp437")


@dataclass
class Receipt:
    """One receipt: what it says and what happened to it."""
    index: int
    lines: list[str] = field(default_factory=list)
    totals: list[tuple[str, Decimal]] = field(default_factory=list)
    total: Decimal | None = None
    printed: bool = False        # anything reached the paper
    has_qr: bool = False         # the POS printed its own QR (GS ( k print, or ESC Z)
    uncertain: bool = False      # unknown or truncated command: framing not guaranteed
    end: str = ""                # "cut", "init" (ESC @ on a cutter-less printer), "job"
    lines_dropped: int = 0       # lines between the kept head and tail (see LINES_HEAD)
    void: bool = False           # the POS voided a whole sale with this receipt
    number: str = ""             # the receipt's own number, when printed
    void_of: str = ""            # a void's original receipt number, when printed
    # filled by the injector
    digest: str = ""             # SHA-256 (hex) of the bytes up to the injection point
    injected: bool = False
    content: str = ""
    skipped: str = ""            # why no QR was added, when none was

    def as_json(self) -> dict[str, object]:
        return {"index": self.index, "end": self.end, "lines": self.lines,
                "lines_dropped": self.lines_dropped,
                "totals": [[name, str(v)] for name, v in self.totals],
                "total": None if self.total is None else str(self.total),
                "printed": self.printed, "has_qr": self.has_qr, "uncertain": self.uncertain,
                "digest": self.digest, "injected": self.injected, "content": self.content,
                "skipped": self.skipped, "void": self.void, "number": self.number,
                "void_of": self.void_of}


def parse_amount(text: str) -> Decimal | None:
    matches = list(_AMOUNT.finditer(text))
    if not matches:
        return None
    m = matches[-1]  # the last number on the line is the amount
    try:
        value = Decimal(m.group(1).replace(",", "") + (m.group(2) or "").replace(",", "."))
    except InvalidOperation:
        return None
    return -value if m.group(0).lstrip().startswith(("-", "−")) else value


def find_totals(lines: list[str], patterns: Iterable[tuple[str, str]] = DEFAULT_TOTALS,
                gap: int | None = None) -> tuple[list[tuple[str, Decimal]], Decimal | None]:
    """Every labelled amount, and the receipt total (first pattern in priority order).

    The amount is the last number after the label on its line (columns put quantities first),
    or on the next line when the label's line has none. `gap`: lines were left out before
    `lines[gap]`, so the line before it has no next line.
    """
    compiled = [(name, re.compile(rx)) for name, rx in patterns]
    found: list[tuple[str, Decimal]] = []
    best: dict[str, Decimal] = {}
    for i, line in enumerate(lines):
        for name, rx in compiled:
            m = rx.search(line)
            if not m:
                continue
            amount = parse_amount(line[m.end():])
            if amount is None and i + 1 < len(lines) and i + 1 != gap and not any(
                    r.search(lines[i + 1]) for _, r in compiled):
                amount = parse_amount(lines[i + 1])
            if amount is not None:
                found.append((name, amount))
                best[name] = amount  # the last occurrence of a label wins
            break  # one label per line: the highest-priority one
    total = next((best[name] for name, _ in compiled if name in best), None)
    return found, total


def void_words(words: Iterable[str]) -> re.Pattern[str]:
    """One pattern for the void words: latin ones whole and case-blind, others as written."""
    parts = [rf"(?<![A-Za-z]){re.escape(w)}(?![A-Za-z])" if w.isascii() else re.escape(w)
             for w in sorted(words, key=len, reverse=True) if w.strip()]
    if not parts:
        raise ValueError("void_words: expected at least one word")
    return re.compile("(?i)" + "|".join(parts))


def find_void(lines: list[str], words: re.Pattern[str],
              patterns: Iterable[tuple[str, str]] = DEFAULT_TOTALS) -> bool:
    """Whether the receipt voids a whole sale: a void word on a total's line ("VOID TOTAL"), or
    as a banner (a line without an amount) in the first VOID_HEAD lines or next to a total's
    line. A void word on an item line ("VOID Cola -3.00": one item off the sale) is not."""
    labels = [re.compile(rx) for _, rx in patterns]
    totals = {i for i, line in enumerate(lines) if any(rx.search(line) for rx in labels)}
    near = set(range(min(VOID_HEAD, len(lines)))) | {j for i in totals for j in (i - 1, i + 1)}
    for i, line in enumerate(lines):
        if words.search(line) and (i in totals or (i in near and parse_amount(line) is None)):
            return True
    return False


def find_numbers(lines: list[str]) -> tuple[str, str]:
    """(the receipt's own number, the original's number for a void), "" where not printed;
    the first of each wins (headers come first)."""
    number = original = ""
    for line in lines:
        if not original and (m := ORIGINAL.search(line)):
            original = m.group(1) or m.group(2)
        elif not number and (m := NUMBER.search(line)):
            number = m.group(1) or m.group(2)
    return number, original


class TextBuilder:
    """Decoded lines of text; multibyte sequences survive any split of the Text events.
    Bounded: LINE_MAX characters a line, the first LINES_HEAD and last LINES_TAIL lines."""

    def __init__(self) -> None:
        self.lines: list[str] = []       # the head
        self.dropped = 0                 # lines left out between head and tail
        self._tail: deque[str] = deque(maxlen=LINES_TAIL)
        self._parts: list[str] = []
        self._size = 0                   # characters in _parts
        self._over = False               # the line went past LINE_MAX: the rest is skipped
        self._encoding = ""
        self._decoder: codecs.IncrementalDecoder | None = None

    def text(self, raw: bytes, encoding: str) -> None:
        if self._size >= LINE_MAX:  # not decoded at all: the line is cut at LINE_MAX anyway
            self._over = True
            return
        if encoding != self._encoding:
            self._finish_decoder()
            self._encoding = encoding
            self._decoder = codecs.getincrementaldecoder(encoding)(errors="replace")
        assert self._decoder is not None
        self._add(self._decoder.decode(raw))

    def tab(self) -> None:
        self._add("\t")

    def _add(self, piece: str) -> None:
        room = LINE_MAX - self._size
        if len(piece) > room:
            piece, self._over = piece[:room], True
        if piece:
            self._parts.append(piece)
            self._size += len(piece)

    def _finish_decoder(self) -> None:
        if self._decoder is not None:
            rest = self._decoder.decode(b"", final=True)  # an unfinished character: U+FFFD
            if rest:
                self._add(rest)
            self._decoder.reset()

    def newline(self) -> None:
        self._finish_decoder()
        if self._parts:  # a line of only bit-image bands (ESC *) is no text line
            line = "".join(self._parts).rstrip() + ("…" if self._over else "")
            if len(self.lines) < LINES_HEAD:
                self.lines.append(line)
            else:
                self.dropped += len(self._tail) == LINES_TAIL
                self._tail.append(line)
        self._parts.clear()
        self._size, self._over = 0, False

    def end(self) -> list[str]:
        """All lines kept: the head, then the tail (`dropped` lines were between them)."""
        if self._parts:
            self.newline()
        return self.lines + list(self._tail)


class Assembler:
    """Events in, roles and finished receipts out. Call `classify`, then `apply`, per event."""

    def __init__(self, encoding: str = "gb18030", kanji_default: bool = True,
                 cutter: bool = True,
                 totals: Iterable[tuple[str, str]] = DEFAULT_TOTALS,
                 void: Iterable[str] = VOID_WORDS) -> None:
        codecs.lookup(encoding)  # a bad profile fails here, not mid-receipt
        self.encoding, self.kanji_default, self.cutter = encoding, kanji_default, cutter
        self.totals = tuple(totals)
        self.void = void_words(void)
        for _, rx in self.totals:
            re.compile(rx)
        self.state = PrinterState()
        self.unsure = False           # an unknown command since the last ESC @
        self._count = 0
        self._payload_role = NEUTRAL
        self._collect: bytearray | None = None   # a GS ( k setting being gathered
        self._collect_left = 0
        self._new_receipt()

    def _new_receipt(self) -> None:
        self.current = Receipt(-1, uncertain=self.unsure)
        self._text = TextBuilder()

    def classify(self, ev: Event) -> str:
        st = self.state
        if isinstance(ev, Text):
            return PRINTS
        if isinstance(ev, Payload):
            return self._payload_role
        if isinstance(ev, Control):
            b = ev.raw[0]
            if b == HT or (b in (LF, CR, FF) and (st.line_open or (b == FF and st.page_mode))):
                return PRINTS
            return NEUTRAL
        if isinstance(ev, Command):
            kind = ev.kind
            if ev.realtime or kind == k.STATUS:
                return URGENT
            if kind == k.PRINT:
                return PRINTS
            if kind == k.FEED:
                return PRINTS if st.line_open else NEUTRAL
            if kind == k.CUT:
                return CUT
            if kind == k.INIT and not self.cutter and self.current.printed:
                return BOUNDARY
            return NEUTRAL
        return BARRIER  # Unknown, Truncated

    def apply(self, ev: Event, role: str) -> None:
        st, rc = self.state, self.current
        if role == PRINTS:
            rc.printed = True
        if isinstance(ev, Text):
            st.line_open = True
            self._text.text(ev.raw, st.text_encoding(self.encoding, self.kanji_default))
        elif isinstance(ev, Control):
            b = ev.raw[0]
            if b == HT:
                st.line_open = True
                self._text.tab()
            elif b in (LF, CR, FF):
                if st.line_open:
                    self._text.newline()
                st.line_open = False
                if b == FF:
                    st.page_mode = False
        elif isinstance(ev, Payload):
            if self._collect is not None:
                self._collect += ev.raw
                self._collect_left -= len(ev.raw)
                if self._collect_left <= 0:
                    st.qr_settings[self._collect[6]] = bytes(self._collect)
                    self._collect = None
        elif isinstance(ev, Command):
            self._command(ev, role)
        elif isinstance(ev, Unknown):
            self.unsure = rc.uncertain = True
        elif isinstance(ev, Truncated):
            rc.uncertain = True

    def _command(self, ev: Command, role: str) -> None:
        st, rc, raw = self.state, self.current, ev.raw
        self._payload_role = role if ev.payload else NEUTRAL
        key = raw[:2]
        a = raw[2] if len(raw) > 2 else 0
        if ev.kind == k.INIT:
            self.state = PrinterState()  # ESC @: back to power-on defaults
            self.unsure = False          # ... and framing is known again
            if not rc.printed:
                rc.uncertain = False
        elif ev.kind in (k.CUT, k.FEED):
            if st.line_open:
                self._text.newline()
            st.line_open = False
        elif key == b"\x1b*":
            st.line_open = True
        elif key == b"\x1ba" and a in (0, 1, 2, 48, 49, 50):
            st.align = a % 48
        elif key == b"\x1b!":
            st.esc_bang, st.emph, st.underline = a, (a >> 3) & 1, (a >> 7) & 1
        elif key == b"\x1bE":
            st.emph = a & 1
        elif key == b"\x1b-":
            st.underline = a % 48 if a % 48 in (0, 1, 2) else st.underline
        elif key == b"\x1d!":
            st.size = a
        elif key == b"\x1dB":
            st.reverse = a & 1
        elif key == b"\x1b2":
            st.spacing = None
        elif key == b"\x1b3":
            st.spacing = a
        elif key == b"\x1bt":
            st.code_page = a
        elif key == b"\x1c&":
            st.kanji = True
        elif key == b"\x1c.":
            st.kanji = False
        elif key == b"\x1bL":
            st.page_mode = True
        elif key == b"\x1bS":
            st.page_mode = False
        elif ev.name == "GS ( k" and len(raw) == 7:
            cn, fn = raw[5], raw[6]
            if cn == 49 and fn == 81:
                rc.has_qr = True
            elif cn == 49 and fn in (65, 67, 69):
                self._collect, self._collect_left = bytearray(raw), ev.payload
                if not ev.payload:
                    st.qr_settings[fn], self._collect = raw, None
        elif key == b"\x1bZ":
            rc.has_qr = True

    def finish(self, end: str) -> Receipt:
        """Close the current receipt (text, totals) and start the next one."""
        rc = self.current
        rc.end = end
        if rc.printed:  # receipts are numbered from 0; an empty stretch gets no number
            rc.index, self._count = self._count, self._count + 1
        rc.lines = self._text.end()
        rc.lines_dropped = self._text.dropped
        rc.totals, rc.total = find_totals(rc.lines, self.totals,
                                          LINES_HEAD if rc.lines_dropped else None)
        rc.void = find_void(rc.lines, self.void, self.totals)
        rc.number, rc.void_of = find_numbers(rc.lines)
        self._new_receipt()
        return rc
