"""QR injection into a live ESC/POS stream: one QR block per receipt, before its real cut.

Rules this module keeps (sans-I/O: bytes and the time go in, bytes come out):
- Every original byte is forwarded, in order; the only change is whole blocks inserted at
  command boundaries. Removing the reported blocks gives back the input byte for byte.
- The block goes after the receipt's last printed mark and before the feeds/settings that lead
  to its cut (so the QR is not cut through), found by holding back those NEUTRAL events (at most
  `hold_limit` bytes). Status requests and real-time commands are never held: the POS may be
  waiting for their reply. The block restores what it changed (alignment, print modes, line
  spacing, Chinese mode, the POS's own GS ( k settings) to the state at that point.
- Which receipts get a block: those that printed something, whose framing is certain (no unknown
  or truncated command, see receipt.py), not in page mode; a receipt that already carries a QR
  gets ours too unless `existing_qr="skip"`. Receipts end at a real cut, at ESC @ after printed
  content on a printer without a cutter, and at the end of a job (`close`, or `idle` at a command
  boundary): an uncut receipt still gets its QR before its trailing feeds.
- Fail-open: a template, signing or encoding error skips that receipt's block (counted); any
  other error forwards every byte not yet forwarded unchanged and passes the rest of the stream
  through untouched. Nothing raises out of `feed`, `idle` or `close`.
- Holding is bounded by `hold_limit` bytes and by the job end the caller signals (`idle`).
- Memory is bounded whatever the stream: no input bytes are kept past forwarding, a receipt's
  text is bounded (receipt.py), and the records of only the last `keep` receipts and blocks are
  kept (`counters` count them all): a job that never cuts, or a million tiny receipts, cost
  no more than `keep` receipts.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import string
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from hexiao.hostd.tap import qr as escpos_qr
from hexiao.hostd.tap.escpos import Command, Event, Parser, Payload
from hexiao.hostd.tap.receipt import (
    BARRIER,
    BOUNDARY,
    CUT,
    DEFAULT_TOTALS,
    NEUTRAL,
    VOID_WORDS,
    Assembler,
    PrinterState,
    Receipt,
)


@dataclass(frozen=True)
class PrinterProfile:
    """What a printer can do; the tap keeps one per printer."""
    name: str = "generic-80"
    qr: str = "native"          # "native" (GS ( k) or "raster" (printers without native QR)
    raster: str = "gsv0"        # "gsv0" or "escstar" (printers without GS v 0)
    width: int = 576            # printable dots per line: 576 for 80 mm, 384 for 58 mm (203 dpi)
    cutter: bool = True
    encoding: str = "gb18030"   # text encoding in Chinese mode
    kanji_default: bool = True  # Chinese mode is on at power-up / after ESC @
    escstar_spacing: int = 24   # ESC 3 n that makes 24-dot ESC * bands touch

    def __post_init__(self) -> None:
        if self.qr not in ("native", "raster") or self.raster not in ("gsv0", "escstar"):
            raise ValueError(f"profile {self.name}: qr must be native|raster, "
                             f"raster gsv0|escstar")
        if not 48 <= self.width <= 4096:
            raise ValueError(f"profile {self.name}: width {self.width} dots is implausible")


PROFILES = {p.name: p for p in (
    PrinterProfile(),
    PrinterProfile("generic-58", width=384),
    PrinterProfile("raster-80", qr="raster"),
    PrinterProfile("raster-58", qr="raster", width=384),
    PrinterProfile("escstar-58", qr="raster", raster="escstar", width=384),
    PrinterProfile("nocutter-58", qr="raster", width=384, cutter=False),
)}


def load_profile(spec: str) -> PrinterProfile:
    """A built-in profile by name, or a JSON file of PrinterProfile fields."""
    if spec in PROFILES:
        return PROFILES[spec]
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"no printer profile {spec!r}: use one of {', '.join(PROFILES)} "
                         f"or a JSON file")
    fields = json.loads(path.read_text(encoding="utf-8"))
    known = {f.name for f in dataclasses.fields(PrinterProfile)}
    if not isinstance(fields, dict) or set(fields) - known:
        raise ValueError(f"{spec}: profile keys must be among {', '.join(sorted(known))}")
    return PrinterProfile(**{"name": path.stem, **fields})


@dataclass(frozen=True)
class QRStyle:
    module: int = 6             # dots per module (native: GS ( k 1 C n, 1..16)
    align: str = "center"       # left | center | right
    ec: str = "M"               # L | M | Q | H
    caption: str = ""           # a line under the QR; a template like the content

    def __post_init__(self) -> None:
        if self.align not in ("left", "center", "right") or self.ec not in escpos_qr.EC_LEVELS:
            raise ValueError("align must be left|center|right and ec one of L, M, Q, H")
        if not 1 <= self.module <= 16:
            raise ValueError("module size must be 1..16 dots")


# ---- content templates and the signed per-receipt token -------------------------------------

FIELDS = frozenset({"token", "lane", "total", "time", "epoch", "digest", "index"})
TOKEN_VERSION = 1
_MAC_LABEL = b"hexiao/receipt-token/1"
_MAC_LEN, _DIGEST_LEN = 16, 12


class TokenError(ValueError):
    """A token that is malformed or whose MAC does not verify."""


def check_template(template: str) -> set[str]:
    """The fields a template uses; ValueError on anything but plain {field} placeholders."""
    used = set()
    for _, name, spec, conv in string.Formatter().parse(template):
        if name is None:
            continue
        if name not in FIELDS or spec or conv:
            raise ValueError(f"template field {{{name}}}: use only "
                             + ", ".join(f"{{{f}}}" for f in sorted(FIELDS)))
        used.add(name)
    return used


def _zigzag(v: int) -> bytes:
    z = (v << 1) ^ (v >> 63)
    out = bytearray()
    while True:
        out.append((z & 0x7F) | (0x80 if z > 0x7F else 0))
        z >>= 7
        if not z:
            return bytes(out)


def _unzigzag(data: bytes, i: int) -> tuple[int, int]:
    z = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise TokenError("truncated token")
        b = data[i]
        z |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return (z >> 1) ^ -(z & 1), i


def make_token(key: bytes, lane: str, when: int, total: Decimal | None, digest: bytes) -> str:
    """version | flags | time u32 | [total in fen, zigzag varint] | lane | digest[:12] | MAC[:16],
    base64url without padding: ~60 characters for a typical lane name."""
    lane_b = lane.encode("utf-8")
    if len(lane_b) > 64 or not 0 <= when < 2**32:
        raise ValueError("lane name over 64 bytes or time out of range")
    body = bytes((TOKEN_VERSION, 1 if total is not None else 0)) + when.to_bytes(4, "big")
    if total is not None:
        body += _zigzag(int((total * 100).quantize(Decimal(1), ROUND_HALF_UP)))
    body += bytes((len(lane_b),)) + lane_b + digest[:_DIGEST_LEN]
    mac = hmac.new(key, _MAC_LABEL + body, hashlib.sha256).digest()[:_MAC_LEN]
    return base64.urlsafe_b64encode(body + mac).rstrip(b"=").decode("ascii")


@dataclass(frozen=True)
class TokenInfo:
    lane: str
    time: int
    total: Decimal | None
    digest: str       # hex of the receipt digest prefix


def _decode_canonical(token: str) -> bytes:
    """The bytes of a token in its one encoding (base64url, no padding, zero trailing bits).

    base64 decoders accept padding, ignored characters and nonzero unused bits of the last
    character, so several strings decode to the same bytes; a token is accepted only if it is
    exactly what make_token would produce for them (anything that deduplicates tokens by string,
    a points claim say, then sees one token per receipt).
    """
    if not isinstance(token, str) or not token.isascii():
        raise TokenError("not base64url")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError as exc:
        raise TokenError("not base64url") from exc
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != token.encode("ascii"):
        raise TokenError("not the canonical encoding of a token (padding, a stray character "
                         "or altered trailing bits)")
    return raw


def verify_token(keys: Iterable[bytes], token: str) -> TokenInfo:
    """Check the MAC (constant time) under any of `keys`; TokenError if it does not verify.
    Only the canonical encoding verifies: one receipt, one token string."""
    raw = _decode_canonical(token)
    if len(raw) < 7 + _DIGEST_LEN + _MAC_LEN:
        raise TokenError("too short for a receipt token")
    body, mac = raw[:-_MAC_LEN], raw[-_MAC_LEN:]
    if not any(hmac.compare_digest(
            hmac.new(key, _MAC_LABEL + body, hashlib.sha256).digest()[:_MAC_LEN], mac)
            for key in keys):
        raise TokenError("MAC does not verify under the tap key")
    if body[0] != TOKEN_VERSION:
        raise TokenError(f"unknown token version {body[0]}")
    when, i = int.from_bytes(body[2:6], "big"), 6
    total = None
    if body[1] & 1:
        fen, i = _unzigzag(body, i)
        total = Decimal(fen).scaleb(-2)  # fen -> yuan, keeping the two decimals
    if i >= len(body):
        raise TokenError("truncated token")
    n = body[i]
    lane, digest = body[i + 1:i + 1 + n], body[i + 1 + n:]
    if len(digest) != _DIGEST_LEN:
        raise TokenError("malformed token")
    return TokenInfo(lane.decode("utf-8", "replace"), when, total, digest.hex())


@dataclass(frozen=True)
class Content:
    """What the QR says: a template over FIELDS; {token} needs the tap key."""
    template: str = "{token}"
    lane: str = "lane-1"
    key: bytes | None = None

    def __post_init__(self) -> None:
        if "token" in check_template(self.template) and not self.key:
            raise ValueError("the content uses {token}: a tap key is needed to sign it")

    def fields(self, rc: Receipt, now: float) -> dict[str, str]:
        when = int(now)
        values = {"lane": self.lane, "total": "" if rc.total is None else str(rc.total),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when)),
                  "epoch": str(when), "digest": rc.digest, "index": str(rc.index)}
        if self.key:
            values["token"] = make_token(self.key, self.lane, when, rc.total,
                                         bytes.fromhex(rc.digest))
        return values


# ---- the injector ----------------------------------------------------------------------------

_ALIGN = {"left": 0, "center": 1, "right": 2}


def qr_block(profile: PrinterProfile, style: QRStyle, content: str, caption: str,
             st: PrinterState) -> bytes:
    """The bytes of one QR block for a printer in state `st`, restoring that state after."""
    data = content.encode("utf-8")
    out = [b"\n" if st.line_open else b"", b"\x1ba" + bytes((_ALIGN[style.align],))]
    if profile.qr == "native":
        out.append(escpos_qr.native(data, style.module, style.ec))
    else:
        mx = escpos_qr.matrix(data, style.ec)
        scale = escpos_qr.fit_module(len(mx[0]), style.module, profile.width)
        if profile.raster == "gsv0":
            out.append(escpos_qr.raster_gs_v0(mx, scale))
        else:
            out.append(escpos_qr.raster_esc_star(mx, scale, profile.escstar_spacing))
            out.append(b"\x1b2" if st.spacing is None else b"\x1b3" + bytes((st.spacing,)))
    if caption:
        text = caption.encode(profile.encoding)  # strict: an unprintable caption is an error
        chinese = not caption.isascii() and not (
            profile.kanji_default if st.kanji is None else st.kanji)
        out += [b"\x1b!\x00", b"\x1d!\x00" if st.size else b"", b"\x1dB\x00" if st.reverse else b"",
                b"\x1c&" if chinese else b"", text, b"\n", b"\x1c." if chinese else b"",
                b"\x1b!" + bytes((st.esc_bang,))]
        if st.emph != (st.esc_bang >> 3) & 1:
            out.append(b"\x1bE" + bytes((st.emph,)))
        if st.underline != (st.esc_bang >> 7) & 1:
            out.append(b"\x1b-" + bytes((st.underline,)))
        out += [b"\x1d!" + bytes((st.size,)) if st.size else b"",
                b"\x1dB\x01" if st.reverse else b""]
    out.append(b"\x1ba" + bytes((st.align,)))
    if profile.qr == "native":  # the POS's own QR settings, as it last sent them
        out += [st.qr_settings[fn] for fn in sorted(st.qr_settings)]
    return b"".join(out)


@dataclass
class Injector:
    """One per byte stream (a print connection or a capture file). See the module rules."""
    profile: PrinterProfile = field(default_factory=PrinterProfile)
    style: QRStyle = field(default_factory=QRStyle)
    content: Content = field(default_factory=lambda: Content("{digest}"))
    totals: tuple[tuple[str, str], ...] = DEFAULT_TOTALS
    void_words: tuple[str, ...] = VOID_WORDS  # a whole sale voided (receipt.find_void)
    existing_qr: str = "inject"    # or "skip": leave receipts that print their own QR alone
    hold_limit: int = 4096
    enabled: bool = True           # False: only assemble and record receipts (dry run)
    keep: int = 1000               # receipt records and injections kept: the most recent ones

    def __post_init__(self) -> None:
        if self.existing_qr not in ("inject", "skip"):
            raise ValueError("existing_qr must be inject|skip")
        if self.keep < 1:
            raise ValueError("keep must be at least 1 receipt")
        check_template(self.style.caption)
        self.style.caption.encode(self.profile.encoding)
        self._parser = Parser()
        self._asm = Assembler(self.profile.encoding, self.profile.kanji_default,
                              self.profile.cutter, self.totals, self.void_words)
        self.receipts: list[Receipt] = []
        self.injections: list[tuple[int, int]] = []  # (output offset, length) of each block
        self.counters: Counter[str] = Counter()
        self.errors: list[str] = []
        self.passthrough = False
        self._unsent = bytearray()   # input not yet forwarded (what fail-open must send)
        self._sent = 0               # bytes output so far
        self._held: list[bytes] = []
        self._held_size = 0
        self._snapshot: PrinterState | None = None
        self._hash = hashlib.sha256()
        self._now = 0.0

    @property
    def at_boundary(self) -> bool:
        """Between two commands: a job may end here (ending one mid-command would hand the
        printer the next job's bytes as parameters). Never, once passing bytes through."""
        return self._parser.at_boundary and not self.passthrough

    # -- public surface: every call returns the bytes to send to the printer now --

    def feed(self, data: bytes, now: float) -> bytes:
        return self._run(lambda: self._parser.feed(data), data, now, None)

    def idle(self, now: float) -> bytes:
        """Nothing arrived for the idle timeout: flush, and end the job at a command boundary."""
        return self._run(self._parser.flush, b"", now, "idle")

    def close(self, now: float) -> bytes:
        """End of stream (connection closed, end of capture file)."""
        return self._run(self._parser.close, b"", now, "close")

    # -- internals --

    def _run(self, step: Callable[[], list[Event]], data: bytes, now: float,
             end: str | None) -> bytes:
        if self.passthrough:
            self._sent += len(data)
            return bytes(data)
        self._now = now
        self._unsent += data
        out = bytearray()
        blocks: list[tuple[int, int]] = []
        try:
            for ev in step():
                self._event(ev, out, blocks)
            if end == "close" or (end == "idle" and self._parser.at_boundary):
                self._close_receipt("job", out, blocks)
            forwarded = self._check(out, blocks)
        except Exception as exc:  # fail-open: whatever went wrong, the POS's bytes go out as sent
            self.counters["failopen"] += 1
            self.errors.append(f"{type(exc).__name__}: {exc}")
            self.passthrough = True
            out = bytearray(self._unsent)
            self._unsent.clear()
            self._sent += len(out)
            return bytes(out)
        del self._unsent[:forwarded]
        if blocks:
            self.injections += [(self._sent + off, n) for off, n in blocks]
            if len(self.injections) > self.keep:
                del self.injections[:-self.keep]
        self._sent += len(out)
        return bytes(out)

    def _check(self, out: bytearray, blocks: list[tuple[int, int]]) -> int:
        # every byte between the blocks must be the input, in order: else fail open
        pos_in = pos_out = 0
        with memoryview(out) as mo, memoryview(self._unsent) as mu:
            for off, n in [*blocks, (len(out), 0)]:
                size = off - pos_out
                if mo[pos_out:off] != mu[pos_in:pos_in + size]:
                    raise AssertionError("output differs from input outside injected blocks")
                pos_in, pos_out = pos_in + size, off + n
        return pos_in

    def _forward(self, raw: bytes, out: bytearray) -> None:
        self._hash.update(raw)
        out += raw

    def _flush_held(self, out: bytearray) -> None:
        for raw in self._held:
            self._forward(raw, out)
        self._held.clear()
        self._held_size = 0
        self._snapshot = None

    def _event(self, ev: Event, out: bytearray, blocks: list[tuple[int, int]]) -> None:
        asm = self._asm
        role = asm.classify(ev)
        if role == CUT:
            snap = self._snapshot or asm.state.copy()
            asm.apply(ev, role)
            self._close_receipt("cut", out, blocks, snap, ev.raw)
            return
        if role == BOUNDARY:
            self._close_receipt("init", out, blocks)
        # a hold starts only at a command boundary (never at a payload piece) and only after
        # something was printed: the block must land between whole commands, after the marks
        if role == NEUTRAL and asm.current.printed and (
                self._held or not isinstance(ev, Payload)):
            if not self._held:
                self._snapshot = asm.state.copy()
            asm.apply(ev, role)
            self._held.append(ev.raw)
            self._held_size += len(ev.raw)
            if self._held_size > self.hold_limit:
                self._flush_held(out)  # the block then goes later in the tail: still before the cut
            return
        self._flush_held(out)
        asm.apply(ev, role)
        self._forward(ev.raw, out)
        if role == BARRIER:
            self.counters["uncertain_events"] += 1
        elif isinstance(ev, Command) and ev.reply:
            self.counters["status_requests"] += 1  # the printer will answer: replies flow back

    def _close_receipt(self, end: str, out: bytearray, blocks: list[tuple[int, int]],
                       snap: PrinterState | None = None, trailing: bytes = b"") -> None:
        # block (if any), then the held tail, then the event that ended the receipt
        self._inject(end, out, blocks, snap or self._snapshot or self._asm.state.copy())
        self._flush_held(out)
        self._forward(trailing, out)
        self._hash = hashlib.sha256()

    def _inject(self, end: str, out: bytearray, blocks: list[tuple[int, int]],
                snap: PrinterState) -> None:
        rc = self._asm.finish(end)
        if not rc.printed:
            return
        rc.digest = self._hash.hexdigest()
        self.receipts.append(rc)
        if len(self.receipts) > self.keep:
            del self.receipts[0]
        self.counters["receipts"] += 1
        reason = ("dry run" if not self.enabled else
                  "uncertain framing (unknown or truncated command)" if rc.uncertain else
                  "page mode" if snap.page_mode else
                  "already has a QR" if rc.has_qr and self.existing_qr == "skip" else "")
        if reason:
            rc.skipped = reason
            self.counters["skipped"] += 1
            return
        try:
            values = self.content.fields(rc, self._now)
            text = self.content.template.format_map(values)
            caption = self.style.caption.format_map(values)
            block = qr_block(self.profile, self.style, text, caption, snap)
        except Exception as exc:  # a template, signing or encoding error: this receipt unchanged
            rc.skipped = f"error: {type(exc).__name__}: {exc}"
            self.counters["errors"] += 1
            self.errors.append(f"receipt {rc.index}: {rc.skipped}")
            return
        blocks.append((len(out), len(block)))
        out += block
        rc.injected, rc.content = True, text
        self.counters["injected"] += 1


def remove_blocks(output: bytes, injections: list[tuple[int, int]]) -> bytes:
    """The output without the injected blocks: the original stream."""
    parts, pos = [], 0
    for off, n in injections:
        parts.append(output[pos:off])
        pos = off + n
    parts.append(output[pos:])
    return b"".join(parts)
