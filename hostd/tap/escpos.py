"""A streaming, sans-I/O ESC/POS parser: bytes in, events out (in the style of h11).

Rules this module keeps:
- Lossless: the `raw` of the events, concatenated, is exactly the input, byte for byte.
- Never mis-frames: every command is measured with its true length (escpos_commands.py); the
  data of images, graphics, symbols and barcodes is never read as commands, so bytes inside
  image data that look like GS V or ESC @ are data.
- Chunking is invisible: any split of the same input gives the same events. Text runs are
  emitted when a control byte ends them (or every TEXT_MAX bytes), payload in PIECE-byte pieces
  counted from the start of the payload, so memory stays bounded whatever the length fields say.
- Unknown commands fall back safely: an introducer (ESC, FS, GS) followed by a function byte
  with no known length, or with invalid parameters, becomes `Unknown(introducer + function)` and
  parsing resumes at the next byte; consumers treat the receipt as uncertain (receipt.py never
  injects into it). DLE followed by anything but EOT/ENQ/DC4 is a lone control byte, as the
  printer treats it.
- No I/O, clocks or threads; no input makes it raise. `close()` reports an unfinished command as
  `Truncated` and returns the parser to its initial state.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from hexiao.hostd.tap import escpos_commands as cmds
from hexiao.hostd.tap.escpos_commands import BAD, DLE, ESC, FS, GS, NEED, Size

TEXT_MAX = 4096      # longest Text event; longer runs are split (decoders carry multibyte state)
PIECE = 64 * 1024    # payload is emitted in pieces of this size, counted from its start

_CTRL = re.compile(rb"[\x00-\x1f]")
_INTRO = frozenset((ESC, FS, GS))


@dataclass(frozen=True, slots=True)
class Text:
    """Printable bytes (0x20-0xFF) as sent; decoding depends on printer state (receipt.py)."""
    raw: bytes


@dataclass(frozen=True, slots=True)
class Control:
    """One C0 control byte outside a command: LF, CR, HT, FF, CAN, or an ignored one."""
    raw: bytes


@dataclass(frozen=True, slots=True)
class Command:
    """A command header; `payload` data bytes follow as Payload events."""
    raw: bytes
    name: str          # "GS V", "GS ( k", "ESC @"
    kind: str          # escpos_commands kinds: init, cut, print, feed, mode, define, ...
    payload: int = 0
    reply: bool = False     # the printer answers: the proxy must pass its reply back
    realtime: bool = False  # DLE commands: executed at once, never to be delayed

    @property
    def args(self) -> bytes:
        """Parameter bytes after the two-byte introducer + function."""
        return self.raw[2:]


@dataclass(frozen=True, slots=True)
class Payload:
    """A piece of the data of the last Command (images, graphics, symbol data)."""
    raw: bytes


@dataclass(frozen=True, slots=True)
class Unknown:
    """An introducer and function byte with no known length (see the fallback rule above)."""
    raw: bytes


@dataclass(frozen=True, slots=True)
class Truncated:
    """End of stream inside a command: its partial header, and how many bytes were missing."""
    raw: bytes
    missing: int | None = None  # None when the header itself was cut short


Event = Text | Control | Command | Payload | Unknown | Truncated


class Parser:
    """Feed bytes, get events. One parser per byte stream (connection or capture file)."""

    def __init__(self, extra: dict[tuple[int, int], int] | None = None) -> None:
        # extra: vendor commands an installer taught us, (introducer, function) -> parameter count
        self._extra = dict(extra) if extra else None
        self._reset()

    def _reset(self) -> None:
        self._rest = b""            # a partial command or segment header
        self._text = bytearray()    # a text run not yet ended
        self._payload = 0           # payload bytes still to come in this block
        self._piece = bytearray()   # payload bytes not yet emitted
        self._segments = 0          # (header, payload) blocks still to come
        self._seg_header = 0
        self._seg_payload: Callable[[bytes], int] | None = None

    @property
    def pending(self) -> int:
        """Bytes held inside a partial command header (they cannot be emitted on their own)."""
        return len(self._rest)

    @property
    def at_boundary(self) -> bool:
        """True between commands (a text run may be open): a safe place to end a job."""
        return not (self._rest or self._payload or self._segments)

    def feed(self, data: bytes) -> list[Event]:
        out: list[Event] = []
        buf = self._rest + data if self._rest else bytes(data)
        self._rest = b""
        pos, n = 0, len(buf)
        while pos < n:
            if self._payload:
                pos = self._take_payload(buf, pos, n, out)
                continue
            if self._segments and not self._payload:
                if n - pos < self._seg_header:
                    self._rest = buf[pos:]
                    return out
                head = buf[pos:pos + self._seg_header]
                pos += self._seg_header
                out.append(Payload(head))
                self._segments -= 1
                assert self._seg_payload is not None
                self._payload = self._seg_payload(head)
                continue
            b = buf[pos]
            if b >= 0x20:
                m = _CTRL.search(buf, pos)
                end = m.start() if m else n
                if m and not self._text and end - pos < TEXT_MAX:
                    out.append(Text(buf[pos:end]))  # the common case: a whole run in this chunk
                    pos = end
                    continue
                self._text += buf[pos:end]
                while len(self._text) >= TEXT_MAX:
                    out.append(Text(bytes(self._text[:TEXT_MAX])))
                    del self._text[:TEXT_MAX]
                pos = end
                continue
            if self._text:
                out.append(Text(bytes(self._text)))
                self._text.clear()
            if b in _INTRO or b == DLE:
                size = cmds.measure(buf, pos, n, self._extra)
                if size is NEED:
                    self._rest = buf[pos:]
                    return out
                if size == BAD:
                    if b == DLE:
                        out.append(Control(buf[pos:pos + 1]))
                        pos += 1
                    else:
                        out.append(Unknown(buf[pos:pos + 2]))
                        pos += 2
                    continue
                assert isinstance(size, Size)
                raw = buf[pos:pos + size.header]
                pos += size.header
                out.append(Command(raw, cmds.name_of(raw), size.kind,
                                   size.payload, size.reply, size.realtime))
                self._payload = size.payload
                self._segments = size.segments
                self._seg_header = size.seg_header
                self._seg_payload = size.seg_payload
                continue
            out.append(Control(buf[pos:pos + 1]))
            pos += 1
        return out

    def _take_payload(self, buf: bytes, pos: int, n: int, out: list[Event]) -> int:
        room = PIECE - len(self._piece)
        take = min(self._payload, room, n - pos)
        if not self._piece and (take == room or take == self._payload):
            out.append(Payload(buf[pos:pos + take]))  # a whole piece in one slice: no copy
        else:
            self._piece += buf[pos:pos + take]
            if len(self._piece) == PIECE or take == self._payload:
                out.append(Payload(bytes(self._piece)))
                self._piece.clear()
        self._payload -= take
        return pos + take

    def flush(self) -> list[Event]:
        """Emit what can be emitted now (idle line): a pending text run and payload bytes.

        A partial command header stays inside (`pending`); the caller decides what to do with
        it (the injector passes the stream through unchanged from then on).
        """
        out: list[Event] = []
        if self._text:
            out.append(Text(bytes(self._text)))
            self._text.clear()
        if self._piece:
            out.append(Payload(bytes(self._piece)))
            self._piece.clear()
        return out

    def close(self) -> list[Event]:
        """End of stream: flush, report an unfinished command, start over."""
        out = self.flush()
        if self._rest:
            out.append(Truncated(self._rest))
        elif self._payload or self._segments:
            out.append(Truncated(b"", self._payload))
        self._reset()
        return out


def parse(data: bytes, extra: dict[tuple[int, int], int] | None = None) -> list[Event]:
    """All events of a complete stream."""
    parser = Parser(extra)
    return parser.feed(data) + parser.close()
