"""The held-out adversarial corpus (issue 6): byte-exact, one QR before each real cut.

The streams in tests/receipts/heldout/ were written from the ESC/POS reference by
tests/heldout_gen.py, not from our parser; each sidecar says where the real cuts are, which of
them get a QR, and the spans of every multi-byte command or character (no block may land inside
one). Expectations come only from the sidecars, never from the parser.
"""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
from hexiao.hostd.inject import Content, Injector, remove_blocks

HERE = Path(__file__).resolve().parent
HELDOUT = HERE / "receipts" / "heldout"
NAMES = sorted(p.stem for p in HELDOUT.glob("*.bin"))
NOW = 1_714_537_805.0
# known defects: name -> exact reason (strict xfail: the case fails until the defect is fixed)
DEFECTS: dict[str, str] = {}


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


def run(data: bytes, sizes: list[int]) -> tuple[bytes, list[tuple[int, int]]]:
    inj = Injector(content=Content("https://x.example/{digest}", "lane-1", None))
    out, pos = bytearray(), 0
    for size in sizes:
        out += inj.feed(data[pos:pos + size], NOW)
        pos += size
    out += inj.close(NOW)
    assert pos == len(data)
    return bytes(out), [tuple(i) for i in inj.injections]  # type: ignore[misc]


def input_positions(injections: list[tuple[int, int]]) -> list[int]:
    # an injection at output offset `off` sits before the input byte off - (bytes injected so far)
    pos, added = [], 0
    for off, n in injections:
        pos.append(off - added)
        added += n
    return pos


def check(name: str) -> None:
    data = (HELDOUT / f"{name}.bin").read_bytes()
    side = json.loads((HELDOUT / f"{name}.json").read_text(encoding="utf-8"))
    runs = {label: run(data, sizes) for label, sizes in _chunkings(len(data), len(name)).items()}
    out, injections = runs["whole"]
    for label, (o, i) in runs.items():  # streaming is invisible
        assert (o, i) == (out, injections), f"{name}: {label} differs from whole"
    verify(name, data, side, out, injections)


def verify(name: str, data: bytes, side: dict, out: bytes,
           injections: list[tuple[int, int]]) -> None:
    assert remove_blocks(out, injections) == data, f"{name}: bytes not preserved"
    assert len(injections) == len(side["qrs"]), \
        f"{name}: {len(injections)} QR blocks, expected {len(side['qrs'])} ({side['why']})"
    cuts = side["cut_offsets"]
    assert len(cuts) == side["cuts"]
    for ip, target in zip(input_positions(injections), side["qrs"], strict=True):
        if target == "end":
            lo, hi = (cuts[-1] + 1 if cuts else 0), len(data)
        else:
            lo, hi = (cuts[target - 1] + 1 if target else 0), cuts[target]
        # before its cut (so output offset < the cut's output offset), after the previous cut
        assert lo <= ip <= hi, f"{name}: block at input {ip} not in its receipt [{lo}, {hi}]"
        inside = [s for s in side["spans"] if s[0] < ip < s[1]]
        assert not inside, f"{name}: block at input {ip} inside command/char {inside}"


CASES = [pytest.param(n, marks=pytest.mark.xfail(strict=True, reason=DEFECTS[n]))
         if n in DEFECTS else n for n in NAMES]


@pytest.mark.parametrize("name", CASES)
def test_heldout_stream(name: str) -> None:
    check(name)


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
