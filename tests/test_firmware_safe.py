"""Safe mode after repeated crashes (firmware/safe.py) on the sim board under real MicroPython:
the firmware process is run again and again with a crash injected (the sim entry point's
crash= argument), as a board resets after each; and the safe loop's product rule against the
application's own (CPython, the same modules the device runs)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from pathlib import Path

import pytest
from hexiao.firmware import app, safe
from hexiao.tools import micropython
from hexiao.tools.install import bundle, keys
from hexiao.tools.install import flash as F
from hypothesis import given
from hypothesis import strategies as st

EAN = b"5901234123457"  # valid GS1 check digit
QR = b"]Q1287463512093"  # a coupon
SCANS = b"]E0" + EAN + b"\r\n" + QR + b"\r\n" + b"]E05901234123458\r\n" + b"]E496385074\n"
# HID usages of "5901234123457" + Enter, then "96385074" + Enter: press, release each
TYPED = [u for c in EAN.decode() + "\n" + "96385074" + "\n"
         for u in ({"\n": 0x28, "0": 0x27}.get(c) or 0x1D + int(c), 0)]
CRASH = "RuntimeError: crash= argument"


def boot(root: Path, *args: str, scans: bytes = b"") -> tuple[int, list[dict], list[int]]:
    """One run of the sim board from its folder `root` (state in root/state) until its scanner
    input (a file: `scans`, then end of file) is used up; (status, events, HID usages)."""
    (root / "cfg.json").write_text(json.dumps({"id": "till-1", "key": os.urandom(32).hex()}))
    (root / "scans").write_bytes(scans)
    hid = root / "hid.log"
    hid.unlink(missing_ok=True)
    (root / "state").mkdir(exist_ok=True)
    argv, env = micropython.command(
        "hexiao.firmware.main", root, heap=micropython.HEAP,
        args=["cfg=cfg.json", "scanner=scans", "hid=hid.log", f"state={root / 'state'}", *args])
    r = subprocess.run(argv, env=env, cwd=root, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=60)
    evs = []
    for line in r.stderr.splitlines():
        with contextlib.suppress(ValueError):  # the traceback of a crash
            evs.append(json.loads(line))
    usages = [int(line.split()[2], 16) for line in hid.read_text().splitlines()] \
        if hid.exists() else []
    return r.returncode, evs, usages


def record(root: Path) -> str | None:
    p = root / "state" / "crash"
    return p.read_text() if p.exists() else None


def crash_thrice(root: Path, *args: str) -> None:
    for n in (1, 2, 3):
        rc, evs, _ = boot(root, "crash=1", *args)
        assert rc == 4, evs
        assert [e["ev"] for e in evs] == ["boot", "crash"]
        assert evs[0]["crashes"] == n - 1 and evs[1] == {"ev": "crash", "why": CRASH,
                                                         "crashes": n}


def assert_safe(rc: int, evs: list[dict], typed: list[int], why: str) -> None:
    assert rc == 5, evs
    assert evs[0] == {"ev": "safe", "why": why}
    assert {"ev": "log", "seq": 0, "level": 2, "text": "safe mode: " + why} in evs
    assert "boot" not in [e["ev"] for e in evs]  # the application never ran
    verdicts = [(e["outcome"], e["beep"], e["led"], e["text"]) for e in evs if e["ev"] == "verdict"]
    # the LED goes blue at once; the QR and the EAN with a bad check digit are refused
    assert verdicts == [("info", "error", "blue", "safe mode")] + 2 * [
        ("refused", "error", "blue", "safe mode: not typed")]
    assert typed == TYPED  # the two valid EAN/UPC products only, each with Enter


@pytest.fixture
def dev(mpy_stage: Path, tmp_path: Path) -> Path:
    """A development build (no manifest) in its own folder."""
    root = tmp_path / "dev"
    root.mkdir()
    (root / "hexiao").symlink_to(mpy_stage / "hexiao")
    return root


def test_three_crashes_in_a_row_then_safe_mode_until_power_is_cycled(dev: Path) -> None:
    crash_thrice(dev)
    assert record(dev) == f"3 1 dev {CRASH}"  # pending: the firmware asked for this reset
    why = f"3 crashes in a row, last: {CRASH}"
    # the reset the firmware asked for reads as power-on on the sim (its default): the record
    # says it was the firmware's own, so it does not let the device out
    assert_safe(*boot(dev, scans=SCANS), why)
    assert record(dev) == f"3 0 dev {CRASH}"
    assert_safe(*boot(dev, "reset=soft", scans=SCANS), why)  # a soft reset: still safe
    # someone cycles power: the application runs again, and a clean end clears the record
    rc, evs, typed = boot(dev, "reset=power_on", scans=b"]E0" + EAN + b"\r")
    assert rc == 0 and evs[0]["ev"] == "boot" and evs[0]["crashes"] == 0, evs
    assert typed == TYPED[: 2 * (len(EAN) + 1)]
    assert record(dev) is None


def test_a_reset_button_lets_the_device_out_too(dev: Path) -> None:
    crash_thrice(dev)
    assert boot(dev)[0] == 5
    rc, evs, _ = boot(dev, "reset=hard")
    assert rc == 0 and evs[0]["ev"] == "boot", evs


def test_watchdog_resets_count_as_crashes(dev: Path) -> None:
    for n in (1, 2):
        rc, evs, _ = boot(dev, "reset=watchdog")
        assert rc == 0 and evs[0]["crashes"] == n, evs  # an app that ends cleanly clears it...
        (dev / "state" / "crash").write_text(f"{n} 0 dev watchdog reset")  # ...so put it back
    rc, evs, typed = boot(dev, "reset=watchdog", scans=SCANS)
    assert_safe(rc, evs, typed, "3 crashes in a row, last: watchdog reset")


def test_crashes_not_in_a_row_do_not_add_up(dev: Path) -> None:
    for _ in range(2):
        assert boot(dev, "crash=1")[0] == 4
    assert record(dev) == f"2 1 dev {CRASH}"
    rc, evs, _ = boot(dev)  # a run that ends cleanly is a stable one
    assert rc == 0 and evs[0]["crashes"] == 2
    assert record(dev) is None
    rc, evs, _ = boot(dev, "crash=1")
    assert evs[-1] == {"ev": "crash", "why": CRASH, "crashes": 1}


def test_a_run_of_stable_ms_clears_the_record_while_the_app_runs(dev: Path) -> None:
    for _ in range(2):
        assert boot(dev, "crash=1")[0] == 4
    (dev / "cfg.json").write_text(json.dumps({"id": "till-1", "key": os.urandom(32).hex()}))
    fifo = dev / "scanner"
    os.mkfifo(fifo)
    argv, env = micropython.command(
        "hexiao.firmware.main", dev, heap=micropython.HEAP,
        args=["cfg=cfg.json", f"scanner={fifo}", "hid=hid.log", f"state={dev / 'state'}",
              "stable=0"])
    p = subprocess.Popen(argv, env=env, cwd=dev, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        w = os.open(fifo, os.O_WRONLY)  # blocks until the device opens its scanner
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=0.05)
        for _ in range(600):  # until the first loop turn's idle() (bounded: 30 s)
            if record(dev) is None:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=0.05)
        assert record(dev) is None and p.poll() is None  # gone while it still runs
        os.close(w)
        assert p.wait(timeout=60) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_a_corrupt_record_counts_as_none(dev: Path) -> None:
    (dev / "state").mkdir()
    (dev / "state" / "crash").write_text("three 1 dev ?")
    rc, evs, _ = boot(dev, "reset=soft")
    assert rc == 0 and evs[0]["crashes"] == 0, evs


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    d = tmp_path_factory.mktemp("bundles")
    keys.generate(d / "sign.key")
    key = keys.load_private_key(d / "sign.key")
    return {"v1": bundle.build_bundle("sim", "1.0.0", 1, key, d),
            "v2": bundle.build_bundle("sim", "1.0.1", 2, key, d),
            "pub": keys.load_public_key(d / "sign.key.pub")}


def test_a_new_firmware_leaves_safe_mode(bundles, tmp_path: Path) -> None:
    root = tmp_path / "board"
    target = F.DirTarget.create(root)
    F.flash(bundles["v1"], bundles["pub"], target)  # type: ignore[arg-type]
    crash_thrice(root, "reset=soft")
    assert boot(root, "reset=soft")[0] == 5
    F.flash(bundles["v2"], bundles["pub"], target)  # type: ignore[arg-type]
    rc, evs, _ = boot(root, "reset=soft")
    assert rc == 0 and evs[0]["ev"] == "boot" and evs[0]["crashes"] == 0, evs


# -- the safe product rule is the application's own (CPython) ---------------------------------

SYMS = ["]E0", "]E4", "]E3", "]Q1", "]C0", "]d1", "]e0", "E0]"]


@given(st.sampled_from(SYMS), st.one_of(st.text("0123456789", max_size=20).map(str.encode),
                                        st.binary(max_size=20)))
def test_safe_product_rule_agrees_with_the_app(sym: str, d: bytes) -> None:
    rule = app.DEFAULT_RULES[2][0]
    assert rule[0] == 0  # the default product rule
    ids = [rule[1][i:i + 3] for i in range(0, len(rule[1]), 3)]  # one text of 3-char ids
    want = d if sym in ids and app.gs1_ok(d) else None
    assert safe.product(sym.encode() + d) == want
    if want is not None:
        assert app.classify(app.DEFAULT_RULES, sym, d) == 0  # the app types it too


class Keys:
    def __init__(self) -> None:
        self.keys: list[tuple[int, int]] = []
        self.verdicts: list[tuple[int, ...]] = []
        self.notes: list[str] = []

    def key(self, mod: int, usage: int) -> None:
        self.keys.append((mod, usage))

    def verdict(self, sid: int, outcome: int, beep: int, led: int, text: str) -> None:
        self.verdicts.append((outcome, beep, led))

    def note(self, seq: int, level: int, text: str) -> None:
        self.notes.append(text)


def test_safe_keystrokes_are_the_apps_us_layout() -> None:
    b = Keys()
    safe.scanned(b, bytearray(b"]E0" + EAN))
    want = []
    for c in EAN:
        u = app.US[c - 32]
        want += [(2 if u & 0x80 else 0, u & 0x7F), (0, 0)]
    assert b.keys == [*want, (0, app.SUFFIX["enter"]), (0, 0)]
    b = Keys()
    safe.scanned(b, bytearray(QR))
    assert b.keys == [] and b.verdicts == [(1, 2, 4)] and b.notes == ["safe mode: not typed"]
