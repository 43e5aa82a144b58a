"""`hexiao flash`: real signed bundles flashed onto the sim board's directory (hashes computed by
the real MicroPython), the flashed firmware run under MicroPython, every refusal and every
interruption point, and the mpremote transport against the unix port's raw REPL on a pty."""

from __future__ import annotations

import errno
import json
import os
import pty
import shutil
import subprocess
import tty
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hexiao.tools import micropython
from hexiao.tools.install import bundle as B
from hexiao.tools.install import flash as F
from hexiao.tools.install import keys

NFILES = len(B.device_sources(board="sim"))  # the modules a sim bundle carries


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("flash")
    keys.generate(d / "sign.key")
    keys.generate(d / "other.key")
    key = keys.load_private_key(d / "sign.key")
    out = {"dir": d, "pub": d / "sign.key.pub", "other": d / "other.key.pub",
           "public": keys.load_public_key(d / "sign.key.pub")}
    for name, (board, version, counter) in {"v1": ("sim", "0.9.0", 1), "v2": ("sim", "1.0.0", 2),
                                            "v3": ("sim", "1.1.0", 3)}.items():
        out[name] = B.build_bundle(board, version, counter, key, d)
    out["flashed"] = d / "flashed"
    F.flash(out["v2"], out["public"], F.DirTarget.create(out["flashed"]))
    return out


def cli(*args: Any, input: str | None = None):
    return CliRunner().invoke(F.main, [str(a) for a in args], input=input,
                              catch_exceptions=False)


def runs(dev: Path) -> str:
    """The installed firmware imports and computes under real MicroPython; returns its version."""
    code = "import hexiao.protocol.frame as f; print(f.crc32_le(b'abc'))"
    r = subprocess.run(
        [micropython.executable("micropython"), "-X", f"heapsize={micropython.HEAP}", "-c", code],
        env={"MICROPYPATH": f"{dev}:.frozen", "PATH": "/usr/bin:/bin"}, cwd=dev,
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == repr(b"\xc2A$5")  # CRC-32 of b"abc", little-endian
    return json.loads((dev / "hexiao" / "manifest.json").read_bytes())["version"]


def tree(dev: Path) -> dict[str, bytes]:
    return {str(p.relative_to(dev)): p.read_bytes() for p in sorted(dev.rglob("*")) if p.is_file()}


class Wrap:
    """A DirTarget with faults: `fail` = (op, first arg or None, after N such calls) raises
    TargetGone (an unplug); counts writes; free_bytes and write errors can be overridden."""

    def __init__(self, inner: F.DirTarget, fail: tuple[str, str | None, int] | None = None,
                 free: int | None = None, enospc_after: int | None = None,
                 corrupt: str | None = None) -> None:
        self.inner, self.fail, self.free, self.enospc_after = inner, fail, free, enospc_after
        self.corrupt, self.calls, self.writes = corrupt, {}, []

    def _op(self, op: str, *args: Any) -> Any:
        if self.fail and self.fail[0] == op and self.fail[1] in (None, args[0] if args else None):
            n = self.calls[op] = self.calls.get(op, 0) + 1
            if n > self.fail[2]:
                raise F.TargetGone(f"unplugged during {op}")
        return getattr(self.inner, op)(*args)

    def write_file(self, path: str, data: bytes) -> None:
        if self.enospc_after is not None and len(self.writes) >= self.enospc_after:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.writes.append(path)
        if self.corrupt and path.endswith(self.corrupt):
            data = data[:-1] + bytes([data[-1] ^ 1])  # a flash cell that flips a bit
        self._op("write_file", path, data)

    def free_bytes(self) -> int:
        return self.inner.free_bytes() if self.free is None else self.free

    def __getattr__(self, op: str) -> Any:
        return lambda *args: self._op(op, *args)


def installed(kit: dict, dev: Path, name: str = "v2") -> None:
    """A sim board with 1.0.0 on it: a copy of one flashed once per module."""
    assert name == "v2"
    shutil.copytree(kit["flashed"], dev)


def test_flash_sim_dir_then_the_firmware_runs(kit, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    F.DirTarget.create(dev)
    res = cli(kit["v2"], "--pubkey", kit["pub"], "--sim-dir", dev, "--yes")
    assert res.exit_code == 0, res.output
    size = sum(len(d) for d in B.read_bundle(kit["v2"]).files.values())
    assert res.stdout == (f"installed sim 1.0.0 (counter 2): {NFILES} files written "
                          f"({size} bytes), "
                          "0 already staged; device reset\n")
    assert "copying" in res.stderr  # the progress bar (rendered in full on a terminal)
    b = B.read_bundle(kit["v2"])
    assert (dev / "hexiao" / "manifest.json").read_bytes() == b.manifest
    assert (dev / "hexiao" / "manifest.sig").read_bytes() == b.signature
    for name, data in b.files.items():
        assert (dev / name).read_bytes() == data  # hexiao/protocol/x.mpy at /hexiao/protocol/
    assert sorted(p.name for p in dev.iterdir()) == ["board.json", "hexiao"]
    assert runs(dev) == "1.0.0"
    again = cli(kit["v2"], "--pubkey", kit["pub"], "--sim-dir", dev, "--yes")
    assert again.exit_code == 0
    assert again.stdout == "up to date: sim 1.0.0 (counter 2) is installed\n"


def test_json_result_and_no_progress(kit, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    installed(kit, dev, "v2")
    res = cli(kit["v3"], "--pubkey", kit["pub"], "--sim-dir", dev, "--json", "--yes")
    assert res.exit_code == 0 and res.stderr == ""
    out = json.loads(res.stdout)
    assert out == {"ok": True, "action": "installed", "board": "sim", "version": "1.1.0",
                   "counter": 3, "previous": {"version": "1.0.0", "counter": 2}, "written": NFILES,
                   "skipped": 0, "bytes_written": out["bytes_written"], "repaired": None,
                   "bundle": str(kit["v3"]), "target": str(dev)}
    assert out["bytes_written"] > 20000 and runs(dev) == "1.1.0"


@pytest.mark.parametrize("how,code,text", [
    ("unsigned", 11, "is not signed (no manifest.sig); refusing to install an unsigned bundle"),
    ("tampered", 13, "hexiao/protocol/frame.mpy does not match its SHA-256 in the signed"),
    ("other-key", 12, "the manifest signature does not verify with key"),
])
def test_bad_bundle_refused_before_anything_is_written(kit, tmp_path: Path, how, code,
                                                       text) -> None:
    dev = tmp_path / "dev"
    installed(kit, dev, "v2")
    before = tree(dev)
    good, path, pub = B.read_bundle(kit["v3"]), tmp_path / "bad.tar", kit["pub"]
    files = dict(good.files)
    if how == "tampered":
        data = files["hexiao/protocol/frame.mpy"]
        files["hexiao/protocol/frame.mpy"] = data[:-1] + bytes([data[-1] ^ 1])
    if how == "other-key":
        pub = kit["other"]
    B.write_container(path, good.manifest, None if how == "unsigned" else good.signature, files)
    res = cli(path, "--pubkey", pub, "--sim-dir", dev, "--yes")
    assert res.exit_code == code
    kind = {"unsigned": "unsigned", "tampered": "tampered-file", "other-key": "bad-signature"}
    assert res.stderr.startswith(f"Error: {kind[how]}: ")
    assert text in res.stderr
    assert tree(dev) == before and runs(dev) == "1.0.0"


def test_wrong_board(kit, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    F.DirTarget.create(dev, board="rp2040")
    res = cli(kit["v2"], "--pubkey", kit["pub"], "--sim-dir", dev, "--yes")
    assert res.exit_code == 16
    assert f"Error: wrong-board: {kit['v2']} is built for board 'sim', not 'rp2040'" \
        in res.stderr
    sim = tmp_path / "sim"
    F.DirTarget.create(sim)
    res = cli(kit["v2"], "--pubkey", kit["pub"], "--sim-dir", sim, "--board", "rp2040", "--yes")
    assert res.exit_code == 16
    assert "Error: wrong-board: the device reports board 'sim', not 'rp2040': is this the " \
        "right port?" in res.stderr
    assert sorted(os.listdir(dev)) == sorted(os.listdir(sim)) == ["board.json"]


def test_downgrade_refused_against_the_installed_counter(kit, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    installed(kit, dev, "v2")
    res = cli(kit["v1"], "--pubkey", kit["pub"], "--sim-dir", dev, "--json", "--yes")
    assert res.exit_code == 17
    out = json.loads(res.stdout)
    assert (out["ok"], out["kind"], out["exit_code"]) == (False, "downgrade", 17)
    assert out["message"].endswith("bundle 0.9.0 has security counter 1, below the minimum 2 "
                                   "(a downgrade)")
    assert runs(dev) == "1.0.0"


def test_interrupted_copy_resumes_where_it_stopped(kit, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    installed(kit, dev, "v2")
    flaky = Wrap(F.DirTarget(dev), fail=("write_file", None, 6))
    with pytest.raises(F.InstallError) as e:
        F.flash(kit["v3"], kit["public"], flaky)
    assert (e.value.kind, e.value.exit_code) == ("connection-lost", 21)
    assert e.value.message == ("lost the device (unplugged during write_file); the previous "
                               "firmware is still active or the staged copy is kept: run the "
                               "same command again to resume")
    assert runs(dev) == "1.0.0" and len(list((dev / "hexiao.new").rglob("*.mpy"))) == 6
    counting = Wrap(F.DirTarget(dev))
    r = F.flash(kit["v3"], kit["public"], counting)
    assert (r.written, r.skipped) == (NFILES - 6, 6)
    assert len(counting.writes) == NFILES - 6 + 2  # the rest, then manifest.sig and .json
    assert runs(dev) == "1.1.0" and not (dev / "hexiao.new").exists()


@pytest.mark.parametrize("fail,repaired,left", [
    (("rename", F.CUR, 0), None, {"hexiao", "hexiao.new"}),
    (("rename", F.NEW, 0), "finished an interrupted install (the new firmware was complete)",
     {"hexiao.old", "hexiao.new"}),
    (("remove", F.OLD, 0), "removed the previous firmware an interrupted install left behind",
     {"hexiao", "hexiao.old"}),
    (("reset", None, 0), None, {"hexiao"}),
])
def test_interrupted_commit_is_repaired_by_the_next_run(kit, tmp_path: Path, fail, repaired,
                                                        left) -> None:
    dev = tmp_path / "dev"
    installed(kit, dev, "v2")
    with pytest.raises(F.InstallError) as e:
        F.flash(kit["v3"], kit["public"], Wrap(F.DirTarget(dev), fail=fail))
    assert e.value.kind == "connection-lost"
    assert {p.name for p in dev.iterdir()} - {"board.json"} == left
    target = F.DirTarget(dev)
    r = F.flash(kit["v3"], kit["public"], target)
    assert r.repaired == repaired
    assert r.action == ("up-to-date" if fail[0] in ("remove", "reset") or repaired else
                        "installed")
    assert r.written == 0  # everything was staged already
    assert {p.name for p in dev.iterdir()} == {"board.json", "hexiao"}
    assert runs(dev) == "1.1.0"


@pytest.mark.parametrize("spoil", ["incomplete", "other-key"])
def test_interrupted_commit_with_an_unusable_staged_copy_rolls_back(kit, tmp_path: Path,
                                                                   spoil) -> None:
    dev = tmp_path / "dev"
    installed(kit, dev, "v2")
    with pytest.raises(F.InstallError):
        F.flash(kit["v3"], kit["public"], Wrap(F.DirTarget(dev), fail=("rename", F.NEW, 0)))
    pub = kit["public"]
    if spoil == "incomplete":
        (dev / "hexiao.new" / "protocol" / "link.mpy").write_bytes(b"half")
    else:
        pub = keys.load_public_key(kit["other"])
    assert F.recover(F.DirTarget(dev), pub) == ("rolled back an interrupted install: the "
                                                "previous firmware is restored")
    assert runs(dev) == "1.0.0"


def test_full_filesystem_refused_before_writing(kit, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    installed(kit, dev, "v2")
    before = tree(dev)
    with pytest.raises(F.InstallError) as e:
        F.flash(kit["v3"], kit["public"], Wrap(F.DirTarget(dev), free=30000))
    assert (e.value.kind, e.value.exit_code) == ("no-space", 22)
    manifest = B.verify_bundle(B.read_bundle(kit["v3"]), kit["public"])
    sizes = [f.size for f in manifest.files.values()]
    need = sum(-(-s // 4096) * 4096 for s in sizes) + 2 * 4096  # whole blocks, + the manifest
    assert e.value.message == ("the device has 30000 bytes free, sim 1.1.0 (counter 3) needs "
                               f"{need}: nothing was written, the previous firmware is still "
                               "active")
    assert tree(dev) == before and runs(dev) == "1.0.0"


def test_write_error_midway_leaves_the_old_firmware(kit, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    installed(kit, dev, "v2")
    with pytest.raises(F.InstallError) as e:
        F.flash(kit["v3"], kit["public"], Wrap(F.DirTarget(dev), enospc_after=5))
    assert (e.value.kind, e.value.exit_code) == ("write-error", 23)
    assert e.value.message == ("the device filesystem is full; the partial copy was removed and "
                               "the previous firmware is still active (1.0.0)")
    assert not (dev / "hexiao.new").exists() and runs(dev) == "1.0.0"


def test_read_back_mismatch_is_refused(kit, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    installed(kit, dev, "v2")
    with pytest.raises(F.InstallError) as e:
        F.flash(kit["v3"], kit["public"], Wrap(F.DirTarget(dev), corrupt="protocol/cbor.mpy"))
    assert (e.value.kind, e.value.exit_code) == ("verify-failed", 24)
    assert e.value.message.startswith("/hexiao.new/protocol/cbor.mpy reads back with a different "
                                      "SHA-256 on the device after two writes")
    assert runs(dev) == "1.0.0"


def test_unreadable_installed_manifest(kit, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    installed(kit, dev, "v2")
    (dev / "hexiao" / "manifest.json").write_bytes(b"{broken")
    res = cli(kit["v3"], "--pubkey", kit["pub"], "--sim-dir", dev, "--yes")
    assert res.exit_code == 25
    assert "Error: device-manifest: the installed /hexiao/manifest.json is unreadable" \
        in res.stderr


def test_declined_and_usage(kit, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    installed(kit, dev, "v2")
    res = cli(kit["v3"], "--pubkey", kit["pub"], "--sim-dir", dev, input="n\n")
    assert res.exit_code == 26
    assert "Install sim 1.1.0 (counter 3) over 1.0.0 (counter 2)? [y/N]" in res.stderr
    assert "Error: declined: not confirmed: nothing was written" in res.stderr
    assert not (dev / "hexiao.new").exists() and runs(dev) == "1.0.0"
    res = cli(kit["v3"], "--pubkey", kit["pub"])
    assert res.exit_code == 2 and "give exactly one of --port PORT or --sim-dir DIR" in res.output
    res = cli(kit["v3"], "--pubkey", kit["pub"], "--sim-dir", tmp_path / "nope", "--yes")
    assert res.exit_code == 20 and "Error: unreachable: sim board directory" in res.stderr
    res = cli(kit["v3"], "--pubkey", kit["pub"], "--port", tmp_path / "ttyNONE", "--yes")
    assert res.exit_code == 20 and f"cannot open {tmp_path / 'ttyNONE'}" in res.stderr


def test_a_key_folder_and_a_missing_bundle_are_one_line_each(kit, tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    installed(kit, dev, "v2")
    res = cli(kit["v3"], "--pubkey", kit["dir"], "--sim-dir", dev, "--yes")
    assert (res.exit_code, res.stderr.strip()) == (18, f"Error: key: key file {kit['dir']} is "
                                                       "a directory: give the key file itself "
                                                       "(make one with: hexiao keys generate "
                                                       "--out PATH)")
    res = cli(tmp_path / "absent.tar", "--pubkey", kit["pub"], "--sim-dir", dev, "--yes")
    assert res.exit_code == 19 and res.stderr.startswith("Error: not-found: no bundle ")
    assert runs(dev) == "1.0.0"  # nothing touched


def test_mpremote_transport_against_the_unix_port_raw_repl_on_a_pty(kit, tmp_path: Path) -> None:
    """End to end through mpremote's SerialTransport: the unix port's REPL on a pty speaks the
    raw REPL (and raw-paste) like a board; it has no soft reset (Ctrl-D exits), so soft_reset
    is off, and its `reset` (machine.soft_reset) ends the process, as a board reboots."""
    dev = tmp_path / "dev"
    dev.mkdir()  # no board.json: the board comes from sys.platform ("linux" -> sim)
    master, slave = pty.openpty()
    tty.setraw(master)
    tty.setraw(slave)
    proc = subprocess.Popen([micropython.executable("micropython")], stdin=master,
                            stdout=master, stderr=master, cwd=dev, close_fds=True)
    os.close(master)
    try:
        target = F.MpremoteTarget(os.ttyname(slave), root=str(dev), soft_reset=False)
        assert target.board() == "sim" and target.free_bytes() > 100_000
        r = F.flash(kit["v2"], kit["public"], target)
        assert (r.action, r.written, r.version) == ("installed", NFILES, "1.0.0")
        assert proc.wait(timeout=30) == 0  # reset reached the device
    finally:
        proc.kill()
        os.close(slave)
    assert runs(dev) == "1.0.0"
    assert (dev / "hexiao" / "manifest.json").read_bytes() == B.read_bundle(kit["v2"]).manifest
