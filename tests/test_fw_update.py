"""Firmware over the signed link, checked by the device itself (SPEC 6.8; firmware/app_update,
fw_update, ed25519; protocol/fw_image): a real bundle flashed onto a sim board's folder, the
real MicroPython running it, the update sent through the real link on a pty cable.

A sim board "resets" by exiting with status 6 (fw_update.reset): these tests start it again,
as a board's reset would. Each refusal must leave the last good firmware running and the
device saying why (fw_status)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import test_firmware_hal as hal
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hexiao.hostd.lanes.serial_link import SerialLink, keystore_from
from hexiao.protocol import fw_image
from hexiao.tools import micropython
from hexiao.tools.install import bundle, keys
from hexiao.tools.install import flash as F
from hexiao.tools.sim import relay
from hexiao.tools.sim.board import recover_switch
from test_firmware_hal import boards  # noqa: F401
from test_firmware_sim import KID, Host, Sim, device_cfg, open_writer

RESET, CUT = 6, 9  # the sim board's exit statuses: a reset it asked for; power cut (cut=)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("fwkit")
    keys.generate(d / "sign.key")
    key = keys.load_private_key(d / "sign.key")
    v1 = bundle.build_bundle("sim", "1.0.0", 2, key, d)
    b = bundle.read_bundle(v1)
    return {"v1": v1, "key": key, "pub": keys.load_public_key(d / "sign.key.pub"),
            "files": b.files, "manifest": b.manifest}


def forged(kit: dict[str, Any], version: str, counter: int,
           key: Ed25519PrivateKey | None = None,
           files: dict[str, bytes] | None = None) -> tuple[dict[str, Any], bytes]:
    """(fw_offer, image) of a bundle with v1's files (or `files`) as `version`/`counter`,
    signed by `key` (default: the devices' key)."""
    files = files or kit["files"]
    m = json.loads(kit["manifest"])
    m.update(version=version, counter=counter, files={
        n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)} for n, d in files.items()})
    raw = bundle.canonical(m)
    return fw_image.offer(raw, (key or kit["key"]).sign(raw), files)


@pytest.fixture
def board(kit: dict[str, Any], tmp_path: Path) -> Path:
    """v1 flashed on a sim board's folder; the device's firmware key in its state folder."""
    root = tmp_path / "board"
    root.mkdir()
    F.flash(kit["v1"], kit["pub"], F.DirTarget(root))
    (root / "state").mkdir()
    (root / "state" / "fw_key").write_text(_raw_pub(kit["pub"]).hex())
    return root


def _raw_pub(pub: Any) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


DEVICE_KEY = bytes(range(32))


@contextlib.contextmanager
def running(root: Path, *args: str) -> Iterator[tuple[Sim, Host]]:
    """The board's installed firmware with a host on its link, session open."""
    recover_switch(root)  # what the board's root main.py does first (the sim board's runner)
    fifo = root / f"scanner-{time.monotonic_ns()}"
    os.mkfifo(fifo)
    argv, env = micropython.command(
        "hexiao.firmware.main", root,
        args=[f"cfg={device_cfg(root, DEVICE_KEY)}", f"scanner={fifo}", f"hid={root}/hid.log",
              f"state={root}/state", *args])
    cable = relay.Cable().start()
    device = relay.DeviceProcess(cable, argv, env, str(root))
    try:
        writer = open_writer(fifo, device)
    except BaseException:
        cable.close()
        device.stop(1)
        raise
    host = Host(lambda scan: None)
    s = Sim(cable, device, writer, root / "hid.log", host)
    try:
        s.link = SerialLink.open(cable.host_port, keystore_from({KID: DEVICE_KEY}),
                                 host.on_event)
        host.port = s.link
        s.link.start()
        host.wait(lambda: s.link is not None and s.link.is_open(), 30, "the session")
        yield s, host
    finally:
        if s.shutdown() not in (0, RESET):  # shown with a failing test's captured output
            print("device exit", s.done[0], "stderr:", *s.device.other[-12:], sep="\n  ")


def reboot(root: Path, *args: str) -> tuple[int, list[dict[str, Any]]]:
    """Boot the installed firmware once with no host and no scanner input (it comes up and
    ends at once), or until it resets or is cut: (exit status, its events)."""
    recover_switch(root)
    argv, env = micropython.command(
        "hexiao.firmware.main", root,
        args=[f"cfg={device_cfg(root, DEVICE_KEY)}", "scanner=/dev/null",
              f"hid={root}/hid.log", f"state={root}/state", *args])
    r = subprocess.run(argv, env=env, cwd=root, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120)
    if r.returncode not in (0, 4, RESET, CUT):  # shown with a failing test's output
        print("boot exit", r.returncode, r.stderr[-1500:])
    evs = []
    for line in r.stderr.splitlines():
        with contextlib.suppress(ValueError):
            evs.append(json.loads(line))
    return r.returncode, evs


def until_up(root: Path, *args: str) -> list[int]:
    """Boot until the firmware runs (resets in between, at most 4): the exit statuses."""
    out = []
    for _ in range(5):
        rc, _ = reboot(root, *args)
        out.append(rc)
        if rc != RESET:
            return out
    raise AssertionError(f"the board kept resetting: {out}")


def installed(root: Path) -> dict[str, Any]:
    return json.loads((root / "hexiao" / "manifest.json").read_bytes())


def send_and_commit(host: Host, sim: Sim, offer: dict[str, Any], img: bytes) -> dict[str, Any]:
    out = fw_image.send(host.ask, offer, img, timeout=30)
    assert sim.device.proc.wait(60) == RESET  # it resets to install
    return out


def status(root: Path) -> dict[str, Any]:
    with running(root) as (_, host):
        return host.ask({"type": "fw_query"}, "fw_status")


def test_a_good_update_is_verified_switched_tried_and_confirmed(kit, board: Path) -> None:
    offer, img = forged(kit, "1.1.0", 3)
    with running(board) as (sim, host):
        assert (board / "state" / "fw_counter").read_text() == "2"  # v1's, at its first boot
        out = send_and_commit(host, sim, offer, img)
    assert out["resumed_from"] == 0 and out["sent"] == len(img)
    assert out["why"] == "restarting to check and install"
    assert until_up(board) == [RESET, 0]  # checked and switched, then the new one runs
    assert installed(board)["version"] == "1.1.0" and (board / "hexiao.old").is_dir()
    assert (board / "state" / "fw_counter").read_text() == "2"  # not before it is confirmed
    with running(board, "stable=200") as (sim, host):
        sim.device.wait_for(lambda evs: [e for e in evs if e.get("ev") == "log"
                                         and "1.1.0 confirmed" in e.get("text", "")], 60)
        st = host.ask({"type": "fw_query"}, "fw_status")
    assert (st["state"], st["version"]) == (5, "1.1.0")
    assert not (board / "hexiao.old").exists() and not (board / "hexiao.new").exists()
    assert (board / "state" / "fw_counter").read_text() == "3"
    assert not list((board / "state").glob("fwup*"))


def _refused_at_boot(kit, board: Path, offer: dict[str, Any], img: bytes, why: str) -> None:
    with running(board) as (sim, host):
        send_and_commit(host, sim, offer, img)
    assert until_up(board) == [RESET, 0]  # refused: no switch; v1 runs
    assert installed(board)["version"] == "1.0.0"
    assert not (board / "hexiao.new").exists() and not (board / "hexiao.old").exists()
    st = status(board)
    assert st["state"] == 6 and why in st["why"], st
    assert not list((board / "state").glob("fwup*"))


def test_a_freshly_provisioned_board_accepts_a_signed_update(kit, tmp_path: Path) -> None:
    from hexiao.tools.install import provision
    from hexiao.tools.install.device import Board

    root = tmp_path / "board"
    root.mkdir()
    F.flash(kit["v1"], kit["pub"], F.DirTarget(root))
    # `hexiao provision --fw-pubkey KEY.pub`: no other step writes the firmware key
    provision.provision(Board(root, None), "till-1", "lane-1", tmp_path / "ks.jsonl", False,
                        _raw_pub(kit["pub"]))
    offer, img = forged(kit, "1.1.0", 3)
    with running(root) as (sim, host):
        send_and_commit(host, sim, offer, img)
    assert until_up(root) == [RESET, 0]
    assert installed(root)["version"] == "1.1.0"


def test_a_flipped_byte_in_a_file_is_refused_by_the_device(kit, board: Path) -> None:
    offer, img = forged(kit, "1.1.0", 3)
    bad = bytearray(img)
    bad[offer["manifest_size"] + 100] ^= 0x01  # in the first file, after the manifest
    offer["digest"] = hashlib.sha256(bad).digest()  # as a damaged bundle would be offered
    _refused_at_boot(kit, board, offer, bytes(bad), "changed since it was signed: hexiao/")


def test_a_flipped_byte_in_the_manifest_fails_the_signature(kit, board: Path) -> None:
    offer, img = forged(kit, "1.1.0", 3)
    bad = bytearray(img)
    bad[offer["manifest_size"] // 2] ^= 0x20
    offer["digest"] = hashlib.sha256(bad).digest()
    _refused_at_boot(kit, board, offer, bytes(bad), "bad signature")


def test_a_bundle_signed_by_another_key_is_refused(kit, board: Path) -> None:
    offer, img = forged(kit, "1.1.0", 3, key=Ed25519PrivateKey.generate())
    _refused_at_boot(kit, board, offer, img, "bad signature")


def test_an_older_bundle_is_refused_at_the_offer_and_at_boot(kit, board: Path) -> None:
    offer, img = forged(kit, "0.9.0", 1)
    with running(board) as (_, host), pytest.raises(fw_image.Refused, match="downgrade"):
        fw_image.send(host.ask, offer, img, timeout=30)
    # an offer that lies about its counter gets as far as the boot's check of the manifest
    offer["counter"] = 9
    _refused_at_boot(kit, board, offer, img, "downgrade: security counter 1 is below 2")


def test_unplugged_mid_update_then_resumed(kit, board: Path) -> None:
    offer, img = forged(kit, "1.1.0", 3)
    sent: list[int] = []

    def unplugged_after(n: int):
        def ask(msg: dict[str, Any], answer: str, timeout: float) -> dict[str, Any]:
            if msg["type"] == "fw_chunk" and len(sent) >= n:
                raise ConnectionError("cable unplugged")
            out = host.ask(msg, answer, timeout)
            if msg["type"] == "fw_chunk":
                sent.append(out["offset"])
            return out
        return ask

    with running(board) as (sim, host), pytest.raises(ConnectionError):
        fw_image.send(unplugged_after(20), offer, img, timeout=30)
    # the cable was closed with the device (a USB-powered board loses power with it)
    held = (board / "state" / "fwup.img").stat().st_size
    assert held == sent[-1] == 20 * fw_image.CHUNK
    with running(board) as (sim, host):
        out = send_and_commit(host, sim, offer, img)
    assert out["resumed_from"] == held and out["sent"] == len(img) - held
    assert until_up(board) == [RESET, 0]
    assert installed(board)["version"] == "1.1.0"


def test_power_lost_mid_switch_boots_the_last_good_firmware_and_says_why(kit, board) -> None:
    offer, img = forged(kit, "1.1.0", 3)
    with running(board) as (sim, host):
        send_and_commit(host, sim, offer, img)
    rc, _ = reboot(board, "cut=switch")  # power cut as the switch starts
    assert rc == CUT and (board / "hexiao.new" / "manifest.json").exists()
    assert until_up(board) == [RESET, 0]  # rolled back, then the last good one runs
    assert installed(board)["version"] == "1.0.0"
    assert not (board / "hexiao.new").exists() and not (board / "hexiao.old").exists()
    st = status(board)
    assert st["state"] == 7 and "power lost while switching" in st["why"], st
    assert (board / "state" / "fw_counter").read_text() == "2"


def test_power_lost_between_the_switchs_renames_boots_the_last_good_firmware(kit, board) -> None:
    offer, img = forged(kit, "1.1.0", 3)
    with running(board) as (sim, host):
        send_and_commit(host, sim, offer, img)
    rc, _ = reboot(board, "cut=renamed")  # hexiao -> hexiao.old done, hexiao.new -> hexiao not
    assert rc == CUT and not (board / "hexiao").exists()
    assert (board / "hexiao.old").is_dir() and (board / "hexiao.new" / "manifest.json").exists()
    # the boot's first step puts hexiao.old back; fw_update then rolls back and says why
    assert until_up(board) == [RESET, 0]
    assert installed(board)["version"] == "1.0.0"
    assert not (board / "hexiao.new").exists() and not (board / "hexiao.old").exists()
    st = status(board)
    assert st["state"] == 7 and "power lost while switching" in st["why"], st
    assert (board / "state" / "fw_counter").read_text() == "2"


def test_power_lost_in_a_rollback_still_boots_the_last_good_firmware(kit, board) -> None:
    offer, img = forged(kit, "1.1.0", 3)
    with running(board) as (sim, host):
        send_and_commit(host, sim, offer, img)
    assert until_up(board, "crash=1") == [RESET, 4]  # switched; the new one crashes
    assert [reboot(board, "crash=1")[0] for _ in range(2)] == [4, 4]
    rc, _ = reboot(board, "cut=rollback")  # boot 4 rolls back: cut with the new one aside
    assert rc == CUT and not (board / "hexiao").exists() and (board / "hexiao.old").is_dir()
    assert until_up(board) == [RESET, 0]  # put back, the rollback finished, then v1 runs
    assert installed(board)["version"] == "1.0.0"
    assert not (board / "hexiao.new").exists() and not (board / "hexiao.old").exists()
    st = status(board)
    assert st["state"] == 7 and "power lost while switching" in st["why"], st


def test_recover_switch_puts_back_the_previous_or_a_complete_staged_firmware(tmp_path) -> None:
    assert recover_switch(tmp_path) is None  # nothing at all: nothing to do
    (tmp_path / "hexiao.new").mkdir()
    assert recover_switch(tmp_path) is None  # a staged folder cut short is no firmware
    (tmp_path / "hexiao.new" / "manifest.json").write_text("{}")
    (tmp_path / "hexiao.old").mkdir()
    assert recover_switch(tmp_path) == "hexiao.old" and (tmp_path / "hexiao").is_dir()
    assert recover_switch(tmp_path) is None  # hexiao/ present: nothing touched
    (tmp_path / "hexiao").rename(tmp_path / "gone")
    assert recover_switch(tmp_path) == "hexiao.new"  # no previous one: the staged, complete


def test_power_lost_while_unpacking_is_redone_from_the_staged_image(kit, board: Path) -> None:
    offer, img = forged(kit, "1.1.0", 3)
    with running(board) as (sim, host):
        send_and_commit(host, sim, offer, img)
    rc, _ = reboot(board, "cut=unpack")  # after the first file of the new firmware
    assert rc == CUT and installed(board)["version"] == "1.0.0"
    assert until_up(board) == [RESET, 0]
    assert installed(board)["version"] == "1.1.0"


def test_a_crash_loop_on_trial_rolls_back_by_itself(kit, board: Path) -> None:
    offer, img = forged(kit, "1.1.0", 3)
    with running(board) as (sim, host):
        send_and_commit(host, sim, offer, img)
    assert until_up(board, "crash=1") == [RESET, 4]  # switched; the new one crashes
    assert [reboot(board, "crash=1")[0] for _ in range(2)] == [4, 4]  # boots 2 and 3
    assert until_up(board) == [RESET, 0]  # boot 4: not confirmed in 3 boots: rolled back
    assert installed(board)["version"] == "1.0.0"
    st = status(board)
    assert st["state"] == 7 and "not confirmed after 3 boots" in st["why"], st
    assert "crash" in st["why"]


def test_a_bundle_for_another_board_is_refused_by_its_signed_manifest(kit, board) -> None:
    m = json.loads(kit["manifest"])
    m.update(board="rp2040", version="1.1.0", counter=3)
    raw = bundle.canonical(m)
    offer, img = fw_image.offer(raw, kit["key"].sign(raw), kit["files"])
    offer["board"] = "sim"  # what an offer claims counts for nothing
    _refused_at_boot(kit, board, offer, img, "built for board rp2040, this is a sim board")


def test_chunks_out_of_place_and_an_early_commit_change_nothing(kit, board: Path) -> None:
    offer, img = forged(kit, "1.1.0", 3)
    with running(board) as (sim, host):
        st = host.ask(offer, "fw_status")
        assert (st["state"], st["offset"], st["digest"]) == (1, 0, offer["digest"])
        # a chunk at the wrong offset is not written: the answer says where to resume
        st = host.ask({"type": "fw_chunk", "seq": 0, "offset": 256, "data": img[256:512]},
                      "fw_status")
        assert st["offset"] == 0
        st = host.ask({"type": "fw_chunk", "seq": 1, "offset": 0, "data": img[:256]},
                      "fw_status")
        assert st["offset"] == 256
        st = host.ask({"type": "fw_chunk", "seq": 2, "offset": 0, "data": img[:256]},
                      "fw_status")  # a duplicate
        assert st["offset"] == 256
        # a commit before the image is complete, or of another digest, is refused
        for digest in (offer["digest"], bytes(32)):
            r = host.ask({"type": "fw_commit", "digest": digest}, "fw_result")
            assert r["ok"] is False
        assert sim.device.proc.poll() is None  # still running, v1
    assert (board / "state" / "fwup.img").read_bytes() == img[:256]
    assert not (board / "state" / "fwup.go").exists()


def test_damaged_staging_files_end_in_a_refusal_not_a_crash_loop(board: Path) -> None:
    st = board / "state"
    (st / "fwup.hdr").write_bytes(b"\x00" * 96 + b"12 not-a-number")  # a header cut short
    (st / "fwup.img").write_bytes(b"{}")
    (st / "fwup.go").write_bytes(b"")
    assert until_up(board) == [RESET, 0]  # refused once, then v1 runs
    assert installed(board)["version"] == "1.0.0"
    assert (st / "fw_last").read_text().startswith("6 - cannot install: ValueError")
    assert not list(st.glob("fwup*"))


OVERLAY = """import gc
import sys
import hexiao.firmware.app_status
from hexiao.firmware import drop
for name in ("app_fwchunk", "app_update", "app_fwchunk", "app_update"):
    gc.collect()
    a = gc.mem_alloc()
    __import__("hexiao.firmware." + name)
    gc.collect()
    print(gc.mem_alloc() - a, "hexiao.firmware.app_update" in sys.modules
          and "hexiao.firmware.app_fwchunk" in sys.modules)
    drop(name)
"""


def test_the_staging_overlays_fit_the_heap_an_open_session_leaves(run_mpy, tmp_path) -> None:
    # loaded beside the running application with hostd's session open (4.5 KB free at the
    # offer, 64 KB), one at a time, neither importing the other: each load is a budget,
    # measured as the device loads it (the package's own cost excluded); the first loads also
    # intern the modules' names, for good (qstrs: 1.4 KB then, once)
    (tmp_path / "overlay.py").write_text(OVERLAY)
    r = run_mpy(tmp_path / "overlay.py")
    assert r.returncode == 0, r.stderr.decode()
    sizes = [line.split() for line in r.stdout.decode().splitlines()]
    assert [s[1] for s in sizes] == ["False"] * 4
    first, again = [int(s[0]) for s in sizes[:2]], [int(s[0]) for s in sizes[2:]]
    assert sum(first) <= 3800 and all(0 < n <= 1300 for n in again), sizes


# -- a real board's side (rp2040 bundle, its root main.py, on the stand-ins of test_firmware_hal)

PROD_STANDINS = """
class _MP:  # micropython: kbd_intr recorded (the REPL's way in is Ctrl-C)
    pass
_mp = _MP()
_mp.kbd_intr = lambda c: log.append(["kbd_intr", c])
sys.modules["micropython"] = _mp
def _idle():  # a production board halts here for good: the test ends it
    log.append(["idle"])
    raise SystemExit(0)
m.idle = _idle
try:
    import main"""


def _prod_board(boards: dict[str, Path], tmp_path: Path,  # noqa: F811
                production: bool) -> Path:
    root = hal.board_copy(boards, "rp2040", tmp_path)
    script = (root / "board.py").read_text()
    assert "try:\n    import main" in script
    (root / "board.py").write_text(script.replace("try:\n    import main", PROD_STANDINS))
    if production:
        (root / "production").write_text("1\n")
    return root


def test_a_production_board_turns_its_repl_off_first(boards, tmp_path) -> None:  # noqa: F811
    out = hal.power(_prod_board(boards, tmp_path, True), [b"]E0" + hal.EAN + b"\r"], cause=1)
    assert out["log"][0] == ["kbd_intr", -1]  # before the install check, the HAL, the app
    assert out["keys"] == hal.EAN_KEYS and "hexiao.firmware.app" in out["modules"]
    plain = hal.power(_prod_board(boards, tmp_path / "plain", False), [], cause=1)
    # the HAL's own, once the app starts (the link's Ctrl-C bytes), and production's, first
    assert plain["log"].count(["kbd_intr", -1]) == 1
    assert out["log"].count(["kbd_intr", -1]) == 2


def test_a_refused_production_board_halts_without_the_repl(boards, tmp_path) -> None:  # noqa: F811
    for production in (True, False):
        root = _prod_board(boards, tmp_path / str(production), production)
        (root / "main.py").write_text((root / "main.py").read_text() + "# edited\n")
        out = hal.power(root, [], cause=1)
        assert "refused: changed since it was installed: main.py" in out["stderr"]
        assert "hexiao.firmware.hal_rp2040" not in out["modules"]
        # production: halted here (idle, never back to the REPL); else back to the REPL
        assert (out["log"][-1:] == [["idle"]]) == production, out["log"]
        assert (["kbd_intr", -1] in out["log"]) == production  # Ctrl-C: the REPL, unless


def test_safe_mode_on_a_production_board_lets_no_ctrl_c_in(boards, tmp_path) -> None:  # noqa: F811
    for production in (True, False):
        root = _prod_board(boards, tmp_path / str(production), production)
        (root / "config.json").unlink()  # not provisioned: safe mode
        out = hal.power(root, [], end="exit", cause=1)
        assert "safe mode: not provisioned" in out["stderr"]
        assert (["kbd_intr", 3] in out["log"]) != production


def test_the_root_main_puts_back_the_firmware_of_a_cut_switch(boards, tmp_path) -> None:  # noqa: F811
    root = _prod_board(boards, tmp_path, False)
    (root / "hexiao").rename(root / "hexiao.old")  # cut between the switch's two renames
    out = hal.power(root, [b"]E0" + hal.EAN + b"\r"], cause=1)
    assert (root / "hexiao").is_dir() and not (root / "hexiao.old").exists()
    assert out["keys"] == hal.EAN_KEYS and "hexiao.firmware.app" in out["modules"]
