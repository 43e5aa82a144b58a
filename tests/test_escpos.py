"""The streaming ESC/POS parser (hostd/tap/escpos.py) and receipt assembly (hostd/tap/receipt.py).

Framing is checked three ways: against python-escpos (an independent POS-side encoder) for what
it can send, against a table of hand-written commands each followed by a sentinel byte (a length
off by one either way eats the sentinel or leaks a byte), and by hypothesis: any split of any
input gives the same events, the events always add up to the input, nothing raises.
"""

from __future__ import annotations

import io
import json
import os
import random
from contextlib import redirect_stderr, redirect_stdout
from decimal import Decimal
from pathlib import Path

import pytest
from escpos.printer import Dummy
from hexiao.hostd.tap import escpos_commands as k
from hexiao.hostd.tap import receipt
from hexiao.hostd.tap.escpos import (
    PIECE,
    TEXT_MAX,
    Command,
    Control,
    Parser,
    Payload,
    Text,
    Truncated,
    Unknown,
    parse,
)
from hexiao.hostd.tap.receipt import (
    LINE_MAX,
    LINES_HEAD,
    LINES_TAIL,
    Assembler,
    find_totals,
    parse_amount,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

CORPUS = Path(__file__).resolve().parent / "receipts"
MANIFEST = json.loads((CORPUS / "corpus.json").read_text(encoding="utf-8"))
SENTINEL = b"Z"


def pos() -> Dummy:
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        return Dummy()


def joined(events: list) -> bytes:
    return b"".join(e.raw for e in events)


def chunked(data: bytes, cuts: list[int]) -> list:
    p, out, last = Parser(), [], 0
    for c in [*sorted(set(cuts)), len(data)]:
        out += p.feed(data[last:c])
        last = c
    return out + p.close()


def commands(events: list) -> list[Command]:
    return [e for e in events if isinstance(e, Command)]


# ---- exact lengths, command by command --------------------------------------------------------

def _u16(n: int) -> bytes:
    return n.to_bytes(2, "little")


# (command bytes, name, kind, payload length, reply): each must parse as exactly one Command,
# its payload, then the sentinel as text
TABLE = [
    (b"\x1b@", "ESC @", k.INIT, 0, False),
    (b"\x1b!\x38", "ESC !", k.MODE, 0, False),
    (b"\x1b \x05", "ESC 20", k.MODE, 0, False),
    (b"\x1b$\x10\x00", "ESC $", k.MODE, 0, False),
    (b"\x1bW\x00\x00\x00\x00\x00\x02\x00\x02", "ESC W", k.MODE, 0, False),
    (b"\x1bc3\x00", "ESC c", k.MODE, 0, False),
    (b"\x1bd\x05", "ESC d", k.FEED, 0, False),
    (b"\x1bJ\x40", "ESC J", k.FEED, 0, False),
    (b"\x1bp\x00\x19\xfa", "ESC p", k.PULSE, 0, False),
    (b"\x1bt\x10", "ESC t", k.MODE, 0, False),
    (b"\x1bi", "ESC i", k.CUT, 0, False),
    (b"\x1bm", "ESC m", k.CUT, 0, False),
    (b"\x1bv", "ESC v", k.STATUS, 0, True),
    (b"\x1bu\x00", "ESC u", k.STATUS, 0, True),
    (b"\x1b*\x00" + _u16(10), "ESC *", k.PRINT, 10, False),
    (b"\x1b*\x01" + _u16(10), "ESC *", k.PRINT, 10, False),
    (b"\x1b*\x20" + _u16(10), "ESC *", k.PRINT, 30, False),
    (b"\x1b*\x21" + _u16(300), "ESC *", k.PRINT, 900, False),
    (b"\x1b(A\x04\x000\x01", "ESC ( A", k.PULSE, 2, False),
    (b"\x1bD\x08\x10\x18\x00", "ESC D", k.MODE, 0, False),
    (b"\x1bZ\x00\x01\x06" + _u16(5), "ESC Z", k.PRINT, 5, False),
    (b"\x1d!\x11", "GS !", k.MODE, 0, False),
    (b"\x1dV\x00", "GS V", k.CUT, 0, False),
    (b"\x1dV\x01", "GS V", k.CUT, 0, False),
    (b"\x1dV0", "GS V", k.CUT, 0, False),
    (b"\x1dV1", "GS V", k.CUT, 0, False),
    (b"\x1dVA\x10", "GS V", k.CUT, 0, False),
    (b"\x1dVB\x00", "GS V", k.CUT, 0, False),
    (b"\x1dVa\x05", "GS V", k.CUT, 0, False),
    (b"\x1dVh\x05", "GS V", k.CUT, 0, False),
    (b"\x1dv0\x00" + _u16(3) + _u16(4), "GS v 0", k.PRINT, 12, False),
    (b"\x1dv0\x33" + _u16(72) + _u16(1000), "GS v 0", k.PRINT, 72_000, False),
    (b"\x1d(L" + _u16(12) + b"0p", "GS ( L", k.DEFINE, 10, False),
    (b"\x1d(L\x02\x0002", "GS ( L", k.PRINT, 0, False),
    (b"\x1d(L\x02\x0000", "GS ( L", k.STATUS, 0, True),
    (b"\x1d(L\x06\x000E", "GS ( L", k.PRINT, 4, False),
    (b"\x1d8L" + (70_010).to_bytes(4, "little") + b"0p", "GS 8 L", k.DEFINE, 70_008, False),
    (b"\x1d8L\x02\x00\x00\x0002", "GS 8 L", k.PRINT, 0, False),
    (b"\x1d(k\x04\x001A", "GS ( k", k.MODE, 2, False),
    (b"\x1d(k\x07\x001P", "GS ( k", k.DEFINE, 5, False),
    (b"\x1d(k\x03\x001Q", "GS ( k", k.PRINT, 1, False),
    (b"\x1d(k\x03\x001R", "GS ( k", k.STATUS, 1, True),
    (b"\x1d(H\x06\x000\x00", "GS ( H", k.STATUS, 4, True),
    (b"\x1d(k\x00\x00", "GS ( k", k.MODE, 0, False),    # zero length: no data bytes at all
    (b"\x1d(k\x01\x001", "GS ( k", k.MODE, 0, False),   # one data byte, all in the header
    (b"\x1dk\x00123456789012\x00", "GS k", k.PRINT, 0, False),
    (b"\x1dk\x04HX-77\x00", "GS k", k.PRINT, 0, False),
    (b"\x1dkI\x0a{B20240501", "GS k", k.PRINT, 0, False),
    (b"\x1dkC\x0c690123456789", "GS k", k.PRINT, 0, False),
    (b"\x1d*\x02\x03", "GS *", k.DEFINE, 48, False),
    (b"\x1d/\x00", "GS /", k.PRINT, 0, False),
    (b"\x1dr\x01", "GS r", k.STATUS, 0, True),
    (b"\x1da\x0f", "GS a", k.STATUS, 0, True),
    (b"\x1dI\x01", "GS I", k.STATUS, 0, True),
    (b"\x1dg2\x00\x14\x00", "GS g", k.STATUS, 0, True),
    (b"\x1dC0\x01\x02", "GS C", k.MODE, 0, False),
    (b"\x1dz0\x01\x02", "GS z", k.MODE, 0, False),
    (b"\x1c&", "FS &", k.MODE, 0, False),
    (b"\x1c.", "FS .", k.MODE, 0, False),
    (b"\x1c!\x0c", "FS !", k.MODE, 0, False),
    (b"\x1cp\x01\x00", "FS p", k.PRINT, 0, False),
    (b"\x1c2\xfe\xa1" + bytes(72), "FS 2", k.DEFINE, 0, False),
    (b"\x1cg1\x00\x00\x00\x00\x00\x03\x00", "FS g", k.DEFINE, 3, False),
    (b"\x1cg2\x00\x00\x00\x00\x00\x03\x00", "FS g", k.STATUS, 0, True),
    (b"\x1c(e\x02\x003\x08", "FS ( e", k.STATUS, 0, True),
    (b"\x10\x04\x01", "DLE 04", k.STATUS, 0, True),
    (b"\x10\x04\x07\x01", "DLE 04", k.STATUS, 0, True),
    (b"\x10\x04\x08\x03", "DLE 04", k.STATUS, 0, True),
    (b"\x10\x05\x02", "DLE 05", k.PULSE, 0, False),
    (b"\x10\x14\x01\x00\x05", "DLE 14", k.PULSE, 0, False),
    (b"\x10\x14\x08\x01\x03\x14\x01\x06\x02\x08", "DLE 14", k.STATUS, 0, True),
]


@pytest.mark.parametrize(("cmd", "name", "kind", "payload", "reply"), TABLE,
                         ids=[repr(t[0][:4]) for t in TABLE])
def test_command_lengths(cmd: bytes, name: str, kind: str, payload: int, reply: bool) -> None:
    data = cmd + (b"\x1dV\x00\x1b@" * payload)[:payload] + SENTINEL  # payload looks like commands
    events = parse(data)
    assert joined(events) == data
    assert isinstance(events[0], Command)
    head = events[0]
    assert (head.name, head.kind, head.payload, head.reply) == (name, kind, payload, reply)
    assert all(isinstance(e, Payload) for e in events[1:-1])
    assert sum(len(e.raw) for e in events[1:-1]) == payload
    assert events[-1] == Text(SENTINEL)
    assert head.realtime == cmd.startswith(b"\x10")


def test_segmented_commands_esc_amp_and_fs_q() -> None:
    # ESC & y=3 c1='A' c2='B': two characters, x=2 and x=1 columns of 3 bytes
    amp = b"\x1b&\x03AB" + b"\x02" + bytes(6) + b"\x01" + bytes(3)
    # FS q n=2: images of 1x1 (8 bytes) and 2x1 (16 bytes)
    fsq = b"\x1cq\x02" + b"\x01\x00\x01\x00" + bytes(8) + b"\x02\x00\x01\x00" + bytes(16)
    for cmd, name in ((amp, "ESC &"), (fsq, "FS q")):
        events = parse(cmd + SENTINEL)
        assert joined(events) == cmd + SENTINEL
        assert events[0].name == name and events[-1] == Text(SENTINEL)
        assert all(isinstance(e, Payload) for e in events[1:-1])


def test_esc_d_stops_where_the_printer_does() -> None:
    # positions must increase; the first that does not is ordinary data (Epson's rule)
    assert parse(b"\x1bD\x08\x10\x08Z")[0].raw == b"\x1bD\x08\x10"
    assert parse(b"\x1bD" + bytes(range(1, 40)))[0].raw == b"\x1bD" + bytes(range(1, 33))


@pytest.mark.parametrize("data", [
    b"\x1b\x7fZ",            # no such ESC function
    b"\x1b*\x05\x01\x00Z",   # ESC * with an undefined mode
    b"\x1dv1\x00Z",          # GS v other than 0
    b"\x1dV\x07Z",           # GS V with an undefined m
    b"\x1dk\x0712\x00Z",     # GS k with an undefined symbology
    b"\x1dk\x0212\n3\x00Z",  # barcode data interrupted by a control byte
    b"\x1d8QZZZZZ",          # GS 8 other than L
    b"\x1c\x7fZ",
])
def test_unknown_falls_back_to_two_bytes(data: bytes) -> None:
    events = parse(data)
    assert joined(events) == data
    assert events[0] == Unknown(data[:2])


def test_unterminated_barcode_is_bounded() -> None:
    data = b"\x1dk\x04" + b"A" * 300 + b"\x00"
    events = parse(data)
    assert events[0] == Unknown(b"\x1dk") and joined(events) == data


def test_dle_outside_real_time_commands_is_a_lone_byte() -> None:
    assert parse(b"\x10AZ") == [Control(b"\x10"), Text(b"AZ")]


def test_vendor_commands_can_be_taught() -> None:
    assert parse(b"\x1b\x7f\x01Z")[0] == Unknown(b"\x1b\x7f")
    taught = parse(b"\x1b\x7f\x01Z", extra={(0x1B, 0x7F): 1})
    assert taught[0].raw == b"\x1b\x7f\x01" and taught[1] == Text(b"Z")


# ---- python-escpos as the POS: what it sends is framed exactly --------------------------------

def _image(w: int, h: int) -> Image.Image:
    img = Image.new("1", (w, h), 1)
    for x in range(0, w, 3):
        img.putpixel((x, x % h), 0)
    return img


@pytest.mark.parametrize(("impl", "name"), [("bitImageRaster", "GS v 0"),
                                            ("bitImageColumn", "ESC *"), ("graphics", "GS ( L")])
def test_python_escpos_images(impl: str, name: str) -> None:
    p = pos()
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        p.image(_image(203, 50), impl=impl, center=False)
    p.cut()
    events = parse(p.output)
    assert joined(events) == p.output
    assert not [e for e in events if isinstance(e, (Unknown, Truncated, Text))]
    names = [c.name for c in commands(events)]
    assert names.count(name) >= 1 and names[-1] == "GS V" and names.count("GS V") == 1
    payload = sum(len(e.raw) for e in events if isinstance(e, Payload))
    assert payload == sum(c.payload for c in commands(events))
    if impl == "bitImageColumn":  # 203 columns, 3 bytes each, one band per 24 rows
        assert [c.payload for c in commands(events) if c.name == "ESC *"] == [609, 609, 609]


def test_python_escpos_barcodes_qr_text_and_cuts() -> None:
    p = pos()
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        p.hw("INIT")
        p.set(align="center", bold=True, double_width=True, underline=1)
        p.text("Hello\n")
        p.barcode("690123456789", "EAN13", function_type="A")
        p.barcode("{B012345", "CODE128", function_type="B")
        p.qr("https://example.com/q?x=1", native=True, size=8)
        p.cashdraw(2)
        p.cut(mode="PART")
        p.cut(feed=False)
    events = parse(p.output)
    assert joined(events) == p.output
    assert not [e for e in events if isinstance(e, (Unknown, Truncated))]
    names = [c.name for c in commands(events)]
    assert names.count("GS k") == 2 and names.count("GS V") == 2 and "ESC p" in names
    assert [e.raw for e in events if isinstance(e, Text)] == [b"Hello"]
    qr = [c for c in commands(events) if c.name == "GS ( k"]
    assert [c.raw[6] for c in qr] == [65, 67, 69, 80, 81]


# ---- the corpus: real cuts only ---------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_corpus_cuts_are_the_real_ones(name: str) -> None:
    data = (CORPUS / name).read_bytes()
    events = parse(data)
    assert joined(events) == data
    assert sum(1 for c in commands(events) if c.kind == k.CUT) == MANIFEST[name]["cuts"]


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_corpus_text_and_totals(name: str) -> None:
    expect = MANIFEST[name]
    asm = Assembler(cutter=expect.get("profile") != "nocutter-58")
    receipts = []
    for ev in parse((CORPUS / name).read_bytes()):
        role = asm.classify(ev)
        if role == "boundary":
            receipts.append(asm.finish("init"))
        asm.apply(ev, role)
        if role == "cut":
            receipts.append(asm.finish("cut"))
    receipts.append(asm.finish("job"))
    printed = [r for r in receipts if r.printed]
    assert len(printed) == len(expect["receipts"])
    for got, want in zip(printed, expect["receipts"], strict=True):
        assert (None if got.total is None else str(got.total)) == want["total"]
        assert got.has_qr == want["has_qr"]
        assert got.uncertain == want.get("uncertain", False)
        for line in want["contains"]:
            assert line in got.lines


# ---- chunking, fuzzing, soak ------------------------------------------------------------------

def _corpus_blob() -> bytes:
    return b"".join((CORPUS / n).read_bytes() for n in sorted(MANIFEST) if n != "truncated.bin")


BLOB = _corpus_blob()
_bytes_biased = st.lists(st.one_of(
    st.binary(min_size=1, max_size=8),
    st.sampled_from([b"\x1b", b"\x1d", b"\x1c", b"\x10", b"\x00", b"\n", b"\x1dV\x00",
                     b"\x1b@", b"\x1dv0\x00", b"\x1b*!", b"\x1d(k", b"\x1d8L", b"\x1dk\x02",
                     b"\x1dkI", b"\x1b&\x03", b"\x1cq\x02", "合计".encode("gb18030")]),
), max_size=60).map(b"".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, len(BLOB)), max_size=40))
def test_corpus_any_split_same_events(cuts: list[int]) -> None:
    assert chunked(BLOB, cuts) == parse(BLOB)


@settings(max_examples=400, deadline=None)
@given(_bytes_biased, st.lists(st.integers(0, 500), max_size=12))
def test_fuzz_any_split_same_events_and_lossless(data: bytes, cuts: list[int]) -> None:
    whole = parse(data)
    assert joined(whole) == data
    assert chunked(data, [c for c in cuts if c <= len(data)]) == whole


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_fuzz_random_bytes_never_raise(data: bytes) -> None:
    events = parse(data)
    assert joined(events) == data
    for ev in events:  # bounded events whatever the length fields say
        assert len(ev.raw) <= max(PIECE, TEXT_MAX, 400)


def test_absurd_length_streams_in_bounded_pieces() -> None:
    p = Parser()
    head = b"\x1d8L\xff\xff\xff\xff0p"
    events = p.feed(head)
    assert events[0].payload == 0xFFFFFFFF - 2
    fed = 0
    for _ in range(40):
        chunk = b"\x1dV\x00" * 10_000
        events = p.feed(chunk)
        fed += len(chunk)
        assert all(isinstance(e, Payload) and len(e.raw) <= PIECE for e in events)
    tail = p.close()
    assert isinstance(tail[-1], Truncated) and tail[-1].missing == 0xFFFFFFFF - 2 - fed


def test_close_reports_a_partial_header_and_resets() -> None:
    p = Parser()
    assert p.feed(b"abc\x1dv0\x00\x10") == [Text(b"abc")]
    assert p.pending == 5 and not p.at_boundary
    assert p.close() == [Truncated(b"\x1dv0\x00\x10")]
    assert p.feed(b"\x1b@") == [Command(b"\x1b@", "ESC @", k.INIT)]


def test_flush_emits_text_and_payload_but_not_a_partial_header() -> None:
    p = Parser()
    assert p.feed(b"\x1dv0\x00\x01\x00\x04\x00\xff\xff") == [
        Command(b"\x1dv0\x00\x01\x00\x04\x00", "GS v 0", k.PRINT, 4)]
    assert p.flush() == [Payload(b"\xff\xff")]
    assert p.feed(b"\xff\xffhi") == [Payload(b"\xff\xff")]
    assert p.flush() == [Text(b"hi")]
    assert p.feed(b"\x1d") == [] and p.flush() == [] and p.pending == 1


def test_long_text_runs_split_at_fixed_offsets() -> None:
    data = b"x" * (TEXT_MAX * 2 + 5) + b"\n"
    for cuts in ([], [1], list(range(0, len(data), 999))):
        assert [len(e.raw) for e in chunked(data, cuts)] == [TEXT_MAX, TEXT_MAX, 5, 1]


@pytest.mark.soak
def test_soak_a_million_streams() -> None:
    n = int(os.environ.get("HEXIAO_SOAK_N", 1_000_000))
    rng = random.Random(2024)
    pieces = [b"\x1b", b"\x1d", b"\x1c", b"\x10", b"\n", b"\x00", b"\x1dV\x00", b"\x1b@",
              b"\x1dv0\x00", b"\x1b*!", b"\x1d(k", b"\x1d8L", b"\x1dk\x02", b"\x1b&\x03",
              b"\x1cq\x01", "应收".encode("gb18030")]
    for _ in range(n):
        parts = [rng.choice(pieces) if rng.random() < 0.5 else rng.randbytes(rng.randint(1, 6))
                 for _ in range(rng.randint(1, 24))]
        data = b"".join(parts)
        p, events, pos = Parser(), [], 0
        while pos < len(data):
            step = rng.randint(1, 16)
            events += p.feed(data[pos:pos + step])
            pos += step
        events += p.close()
        assert joined(events) == data


# ---- text decoding and totals -----------------------------------------------------------------

def _lines(data: bytes, step: int) -> list[str]:
    p, asm = Parser(), Assembler()
    for i in range(0, len(data), step):
        for ev in p.feed(data[i:i + step]):
            asm.apply(ev, asm.classify(ev))
    for ev in p.close():
        asm.apply(ev, asm.classify(ev))
    return asm.finish("job").lines


def test_gb18030_survives_every_split(monkeypatch: pytest.MonkeyPatch) -> None:
    # two- and four-byte sequences (¥ and 𠀀 are four bytes), one straddling TEXT_MAX (a line
    # that long is cut at LINE_MAX: raised here so that the whole line can be compared)
    monkeypatch.setattr(receipt, "LINE_MAX", 2 * TEXT_MAX)
    text = "a" * (TEXT_MAX - 2) + "𠀀合计￥¥128.50 谢谢惠顾"
    data = text.encode("gb18030") + b"\n" + "第二行".encode("gb18030") + b"\n"
    assert len("𠀀".encode("gb18030")) == 4
    for step in (1, 2, 3, 5, 4096, len(data)):
        assert _lines(data, step) == [text, "第二行"]


def test_a_line_without_end_is_kept_up_to_line_max() -> None:
    # the attack: megabytes of text with no LF or cut were all decoded and kept in one line
    for step in (3, 4096, 65536):
        data = ("长" * 300_000).encode("gb18030") + b"\t" * 1000 + "合计 ¥7.50\nnext\n".encode(
            "gb18030")
        first, second = _lines(data, step)
        assert first == "长" * LINE_MAX + "…" and second == "next"


def test_a_receipt_keeps_its_head_and_tail_lines_and_its_total() -> None:
    n = 20_000
    body = "".join(f"{i:05d} 可口可乐 ¥3.50\n" for i in range(n))
    data = ("店名\n" + body + "合计:\n¥70000.00\n").encode("gb18030") + b"\x1dV\x00"
    p, asm = Parser(), Assembler()
    for i in range(0, len(data), 65536):
        for ev in p.feed(data[i:i + 65536]):
            asm.apply(ev, asm.classify(ev))
    rc = asm.finish("cut")
    assert len(rc.lines) == LINES_HEAD + LINES_TAIL and rc.lines[0] == "店名"
    assert rc.lines_dropped == n + 3 - LINES_HEAD - LINES_TAIL
    assert rc.lines[-2:] == ["合计:", "¥70000.00"] and rc.total == Decimal("70000.00")
    assert rc.as_json()["lines_dropped"] == rc.lines_dropped
    # a label that ends the head has no next line: the tail's first line is not its amount
    lines = ["合计:", "9.00"]
    assert find_totals(lines, gap=1)[1] is None and find_totals(lines)[1] == Decimal("9.00")


def test_code_page_and_chinese_mode_switches() -> None:
    data = (b"\x1c.\x1bt\x10" + "Crème".encode("cp1252") + b"\n\x1c&"
            + "中文".encode("gb18030") + b"\n\x1c.\x1bt\x11" + "Привет".encode("cp866") + b"\n")
    assert _lines(data, 1) == ["Crème", "中文", "Привет"]


@pytest.mark.parametrize(("line", "amount"), [
    ("合计: ¥128.50", "128.50"), ("合计 3件   1,280.00", "1280.00"), ("Total 6,50 €", "6.50"),
    ("应收 RMB 99", "99"), ("退款 -12.00", "-12.00"), ("nothing here", None),
])
def test_parse_amount(line: str, amount: str | None) -> None:
    got = parse_amount(line)
    assert (None if got is None else str(got)) == amount


def test_totals_priority_next_line_and_custom_patterns() -> None:
    lines = ["小计 100.00", "Subtotal 100.00", "合计:", "  ¥90.00", "实收 100.00", "应收 88.00"]
    found, total = find_totals(lines)
    assert total == Decimal("88.00")
    assert ("合计", Decimal("90.00")) in found and ("实收", Decimal("100.00")) in found
    assert not any(name == "Total" for name, _ in found)  # "Subtotal" is not a total
    _, total = find_totals(["应付金额 45.5"], [("应付", r"应付")])
    assert total == Decimal("45.5")
    assert find_totals(["Grand Total: 12.00"])[1] == Decimal("12.00")
