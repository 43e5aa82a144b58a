"""The held-out adversarial corpus (issue 6): byte-exact, one QR before each real cut.

The streams in tests/receipts/heldout/ were written from the ESC/POS reference by
tests/heldout_gen.py, not from our parser; each sidecar says where the real cuts are, which of
them get a QR, and the spans of every multi-byte command or character (no block may land inside
one). Expectations come only from the sidecars, never from the parser.

Every stream runs under each printer profile kind: native QR (generic-80), raster QR by GS v 0
(raster-80) and by ESC * (escstar-58), and no cutter (nocutter-58). The profile changes the
block, never the bytes around it nor where it goes, with one documented exception (inject.py,
receipt.py): on a printer without a cutter, ESC @ after printed matter also ends a receipt. The
nocutter expectation splits the sidecar's receipts at such an ESC @, found from the sidecar's
spans with the ESC/POS reference's list of what prints (`printed_inits`).
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import zxingcpp
from hexiao.hostd.tap.inject import PROFILES, Content, Injector, PrinterProfile, remove_blocks
from hexiao.hostd.tap.render import render

HERE = Path(__file__).resolve().parent
HELDOUT = HERE / "receipts" / "heldout"
NAMES = sorted(p.stem for p in HELDOUT.glob("*.bin"))
NOW = 1_714_537_805.0
PROFILE_NAMES = ["generic-80", "raster-80", "escstar-58", "nocutter-58"]
# known defects: (profile, name) -> exact reason (strict xfail: fails until the defect is fixed)
DEFECTS: dict[tuple[str, str], str] = {}

# What a multi-byte command does to the paper, from the ESC/POS reference (not from our parser):
# these put marks on it; GS ( L / GS 8 L only with fn 50 ("print the graphics buffer") and
# GS ( k only with fn 81 ("print the symbol"): their other functions store or set.
PRINTS = (b"\x1b*", b"\x1dv0", b"\x1dk")
# settings, feeds, status requests, drawer kicks: nothing printed
NEUTRAL = (b"\x10\x04", b"\x1dr", b"\x1bp", b"\x1b-", b"\x1bE", b"\x1b2", b"\x1b3", b"\x1bR",
           b"\x1ba", b"\x1bd", b"\x1bt", b"\x1c&", b"\x1c.", b"\x1d!", b"\x1dH", b"\x1dh",
           b"\x1dw", b"\x1dV", b"\x1bi", b"\x1bm")


def _chunkings(n: int, seed: int) -> dict[str, list[int]]:
    rng = random.Random(seed)
    out: dict[str, list[int]] = {"whole": [n], "1-byte": [1] * n}
    for k in range(3):  # random splits, some tiny and some large
        sizes, left = [], n
        while left > 0:
            step = min(left, rng.choice([1, 2, 3, 5, 8, 13, 64, 500, 4096]) + rng.randint(0, k * 7))
            sizes.append(step)
            left -= step
        out[f"random-{k}"] = sizes
    return out


def run(data: bytes, sizes: list[int], profile: PrinterProfile = PROFILES["generic-80"]
        ) -> tuple[bytes, list[tuple[int, int]], list[str]]:
    inj = Injector(profile, content=Content("https://x.example/{digest}", "lane-1", None))
    out, pos = bytearray(), 0
    for size in sizes:
        out += inj.feed(data[pos:pos + size], NOW)
        pos += size
    out += inj.close(NOW)
    assert pos == len(data)
    contents = [rc.content for rc in inj.receipts if rc.injected]
    return bytes(out), [tuple(i) for i in inj.injections], contents  # type: ignore[misc]


def input_positions(injections: list[tuple[int, int]]) -> list[int]:
    # an injection at output offset `off` sits before the input byte off - (bytes injected so far)
    pos, added = [], 0
    for off, n in injections:
        pos.append(off - added)
        added += n
    return pos


def printed_inits(data: bytes, side: dict) -> list[int]:
    """Offsets of the ESC @ commands that follow printed matter since the last cut or ESC @
    (where a printer without a cutter ends a receipt), from the sidecar's spans and cuts."""
    spans = {s: e for s, e in side["spans"]}
    cuts, found, printed, pos = set(side["cut_offsets"]), [], False, 0
    while pos < len(data):
        end = spans.get(pos, pos + 1)
        cmd = data[pos:end]
        if pos in cuts:
            printed = False
        elif cmd == b"\x1b@":
            if printed:
                found.append(pos)
            printed = False
        elif end - pos == 1:  # a byte of its own: ASCII text prints, LF / CR only feed
            if cmd not in (b"\n", b"\r"):
                assert cmd[0] >= 0x20, f"unclassified control byte {cmd!r} at {pos}"
                printed = True
        elif cmd[0] >= 0x80 or cmd.startswith(PRINTS):  # a GB18030 character, image, barcode
            printed = True
        elif cmd.startswith((b"\x1d(L", b"\x1d8L")):
            printed |= cmd[6 if cmd[1] == 0x28 else 8:][:1] == b"2"
        elif cmd.startswith(b"\x1d(k"):
            printed |= cmd[6:7] == b"Q"
        else:
            assert cmd.startswith(NEUTRAL), f"unclassified command {cmd[:4]!r} at {pos}"
        pos = end
    return found


def windows(data: bytes, side: dict, cutter: bool = True) -> list[tuple[int, int]]:
    """[lo, hi] input positions for each expected block, in order."""
    cuts, n = side["cut_offsets"], len(data)
    receipts = [(cuts[i - 1] + 1 if i else 0, c, i in side["qrs"]) for i, c in enumerate(cuts)]
    receipts.append((cuts[-1] + 1 if cuts else 0, n, "end" in side["qrs"]))
    inits = [] if cutter else printed_inits(data, side)
    out = []
    for lo, hi, gets_qr in receipts:
        split = [k for k in inits if lo <= k < hi]
        assert gets_qr or not split, f"ESC @ at {split} inside a receipt without a QR: decide"
        if gets_qr:  # each ESC @ ends one receipt there; the next starts after it
            out += list(zip([lo] + [k + 1 for k in split], [*split, hi], strict=True))
    return out


def verify(name: str, data: bytes, side: dict, out: bytes, injections: list[tuple[int, int]],
           cutter: bool = True) -> None:
    assert remove_blocks(out, injections) == data, f"{name}: bytes not preserved"
    assert len(side["cut_offsets"]) == side["cuts"]
    expect = windows(data, side, cutter)
    assert len(injections) == len(expect), \
        f"{name}: {len(injections)} QR blocks, expected {len(expect)} ({side['why']})"
    for ip, (lo, hi) in zip(input_positions(injections), expect, strict=True):
        # before its cut (so output offset < the cut's output offset), after the previous cut
        assert lo <= ip <= hi, f"{name}: block at input {ip} not in its receipt [{lo}, {hi}]"
        inside = [s for s in side["spans"] if s[0] < ip < s[1]]
        assert not inside, f"{name}: block at input {ip} inside command/char {inside}"


def check_blocks(profile: PrinterProfile, out: bytes, injections: list[tuple[int, int]],
                 contents: list[str]) -> None:
    """Each block is in the profile's QR form and decodes to its receipt's content."""
    forms = {"native": b"\x1d(k", "gsv0": b"\x1dv0", "escstar": b"\x1b*"}
    want = forms["native" if profile.qr == "native" else profile.raster]
    for (off, n), content in zip(injections, contents, strict=True):
        block = out[off:off + n]
        assert [form for form in forms.values() if form in block] == [want], block[:40]
        img = render(block, width=profile.width)
        got = [r.text for r in zxingcpp.read_barcodes(img, formats=zxingcpp.BarcodeFormat.QRCode)]
        assert got == [content] and content.startswith("https://x.example/")


def check(name: str, profile: str = "generic-80") -> None:
    prof = PROFILES[profile]
    data = (HELDOUT / f"{name}.bin").read_bytes()
    side = json.loads((HELDOUT / f"{name}.json").read_text(encoding="utf-8"))
    runs = {label: run(data, sizes, prof)
            for label, sizes in _chunkings(len(data), len(name)).items()}
    out, injections, contents = runs["whole"]
    for label, (o, i, _) in runs.items():  # streaming is invisible
        assert (o, i) == (out, injections), f"{name}: {label} differs from whole"
    verify(name, data, side, out, injections, prof.cutter)
    check_blocks(prof, out, injections, contents)


CASES = [pytest.param(p, n, marks=pytest.mark.xfail(strict=True, reason=DEFECTS[p, n]))
         if (p, n) in DEFECTS else (p, n) for p in PROFILE_NAMES for n in NAMES]


@pytest.mark.parametrize(("profile", "name"), CASES)
def test_heldout_stream(profile: str, name: str) -> None:
    check(name, profile)


def test_profiles_cover_each_qr_form_and_no_cutter() -> None:
    kinds = {(PROFILES[p].qr, PROFILES[p].raster if PROFILES[p].qr == "raster" else "",
              PROFILES[p].cutter) for p in PROFILE_NAMES}
    assert kinds == {("native", "", True), ("raster", "gsv0", True), ("raster", "escstar", True),
                     ("raster", "gsv0", False)}


def test_corpus_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("heldout_gen", HERE / "heldout_gen.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    built = gen.build()
    assert sorted(built) == NAMES and len(NAMES) >= 15
    for name, (stream, qrs, _, _) in built.items():
        assert bytes(stream.buf) == (HELDOUT / f"{name}.bin").read_bytes(), name
        side = json.loads((HELDOUT / f"{name}.json").read_text(encoding="utf-8"))
        assert (side["qrs"], side["cut_offsets"]) == (qrs, stream.cuts), name


def test_no_cutter_expectation_differs_where_the_rules_say() -> None:
    # the one stream with ESC @ after printed matter (its logo, then the header's ESC @)
    differ = [n for n in NAMES if (lambda d, s: windows(d, s) != windows(d, s, cutter=False))(
        (HELDOUT / f"{n}.bin").read_bytes(),
        json.loads((HELDOUT / f"{n}.json").read_text(encoding="utf-8")))]
    assert differ == ["gb_logo_gsv0"]


def test_two_uncut_receipts_split_at_esc_at_only_without_a_cutter() -> None:
    # no_cut twice in one job: one receipt (ending at job end) on a cutter printer, two without
    one = (HELDOUT / "no_cut.bin").read_bytes()
    side1 = json.loads((HELDOUT / "no_cut.json").read_text(encoding="utf-8"))
    data = one + one
    side = {**side1, "spans": side1["spans"] + [[s + len(one), e + len(one)]
                                                for s, e in side1["spans"]]}
    assert windows(data, side) == [(0, len(data))]
    assert windows(data, side, cutter=False) == [(0, len(one)), (len(one) + 1, len(data))]
    for profile in ("generic-80", "nocutter-58"):
        prof = PROFILES[profile]
        out, injections, contents = run(data, [len(data)], prof)
        verify("no_cut x2", data, side, out, injections, prof.cutter)
        check_blocks(prof, out, injections, contents)


@pytest.mark.parametrize(("where", "message"), [
    (11, "not in its receipt"), (3, "inside command/char"), (0, None)])
def test_verify_catches_a_misplaced_block(where: int, message: str | None) -> None:
    # the checker itself can fail: a block after its cut, or inside a command, is reported
    data = b"ab\x1b!\x00xyz\x1dV\x00tail"
    side = {"qrs": [0], "cut_offsets": [8], "cuts": 1, "spans": [[2, 5], [8, 11]], "why": ""}
    block = b"\x1d(k\x03\x001Q0"
    out = data[:where] + block + data[where:]
    if message is None:
        verify("t", data, side, out, [(where, len(block))])
        return
    with pytest.raises(AssertionError, match=message):
        verify("t", data, side, out, [(where, len(block))])
    with pytest.raises(AssertionError, match="1 QR blocks, expected 2"):
        verify("t", data, {**side, "qrs": [0, "end"]}, out, [(where, len(block))])


def test_check_blocks_catches_the_wrong_form_or_content() -> None:
    data = (HELDOUT / "no_cut.bin").read_bytes()
    out, injections, contents = run(data, [len(data)], PROFILES["raster-80"])
    check_blocks(PROFILES["raster-80"], out, injections, contents)
    with pytest.raises(AssertionError):
        check_blocks(PROFILES["generic-80"], out, injections, contents)  # raster, not native
    with pytest.raises(AssertionError):
        check_blocks(PROFILES["raster-80"], out, injections, ["https://x.example/other"])
