"""`hexiao flash`: install a signed firmware bundle on a board (USB, via mpremote) or on the sim
board's filesystem directory, through one pipeline.

Pipeline: verify the bundle's signature and files (before touching the device) -> repair an
interrupted earlier commit -> check the board and the installed security counter
(/hexiao/manifest.json) -> check free space -> copy into /hexiao.new, verifying each file by a
SHA-256 the device computes itself (a re-run skips staged files that already match) -> write
manifest.sig then manifest.json last (the "staging complete" mark) -> commit: /hexiao ->
/hexiao.old, /hexiao.new -> /hexiao, then a board's boot stub /main.py.new -> /main.py (a
bundle's root member, staged with the rest), remove /hexiao.old -> reset. A run interrupted anywhere
leaves the previous firmware in /hexiao or /hexiao.old; the next run finishes the commit if the
staged copy is complete and signed by the key given, else rolls back.

Exit codes (InstallError.kind / EXIT_CODES): 0 ok, 2 usage, 10-19 bundle refusals as in `hexiao
bundle verify` (16 wrong-board also when --board differs from the device, 17 downgrade against
the device's installed counter, 19 not-found: no such bundle file), 20 unreachable (no such
port or sim dir), 21 connection-lost (re-run to resume), 22 no-space (nothing written), 23
write-error (staging removed, previous firmware active), 24 verify-failed (device-side hash
differs after rewriting), 25 device-manifest (installed manifest unreadable: the counter cannot
be checked), 26 declined, 27 production (a device provisioned with --production: its files
change only through signed updates, `hexiao device update`; nothing written).
A refusal prints one line on stderr, `Error: KIND: MESSAGE` (--json: the result object).

This module is the pipeline and the CLI; the targets it writes through (Target, DirTarget,
MpremoteTarget) and its errors live in flash_targets and are re-exported here.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hexiao.tools.install import bundle as B
from hexiao.tools.install import keys
from hexiao.tools.install.flash_targets import (
    EXIT_CODES,
    PLATFORM_BOARDS,
    DirTarget,
    InstallError,
    MpremoteTarget,
    Target,
    TargetGone,
    refused,
)

CUR, NEW, OLD = "/hexiao", "/hexiao.new", "/hexiao.old"
BLOCK = 4096  # littlefs/FAT block on the boards: every file costs at least one
_KEEP = "the previous firmware is still active"
PRODUCTION = "production"  # the state file `hexiao provision --production` writes


def state_path(target: Target, name: str) -> str:
    """A firmware state file's device path (fw_key, production, ...): a board keeps them at
    its root (board_main's state prefix ""), the sim board in /state (`hexiao sim board`)."""
    return ("/state/" if target.board() == "sim" else "/") + name


@dataclass
class FlashResult:
    action: str  # "installed" | "up-to-date"
    board: str
    version: str
    counter: int
    previous: dict[str, Any] | None  # {"version", "counter"} of the firmware replaced
    written: int  # files copied this run
    skipped: int  # staged files already matching (resumed)
    bytes_written: int
    repaired: str | None  # what an interrupted earlier run left, and what was done


def _installed(target: Target, base: str = CUR) -> tuple[bytes, dict[str, Any]] | None:
    raw = target.read_file(f"{base}/manifest.json")
    if raw is None:
        return None
    try:
        m = json.loads(raw)
        if not (isinstance(m, dict) and type(m.get("counter")) is int
                and isinstance(m.get("files"), dict)):
            raise ValueError
    except ValueError:
        raise refused("device-manifest", f"the installed {base}/manifest.json is unreadable, "
                         "so its security counter cannot be checked; refusing to flash") from None
    return raw, m


def _rel(name: str) -> str:
    """A bundle member's path inside the firmware folder ("hexiao/protocol/x.mpy" is
    /hexiao/protocol/x.mpy once installed, /hexiao.new/protocol/x.mpy while staged)."""
    top, _, rest = name.partition("/")
    if top != "hexiao" or not rest:
        raise refused("corrupt", f"bundle file {name!r} is not under hexiao/")
    return rest


def _path(name: str, base: str) -> str:
    """Where a member is on the device, installed (base CUR) or staged (base NEW). A root file
    (B.ROOT_FILES: the board's boot main.py) is staged next to its place as /<name>.new and
    moved there right after the folder commit (_commit_root)."""
    if name in B.ROOT_FILES:
        return f"/{name}.new" if base == NEW else f"/{name}"
    return f"{base}/{_rel(name)}"


def _commit_root(target: Target, files: dict[str, Any]) -> None:
    for name in sorted(set(files) & set(B.ROOT_FILES)):
        if f"{name}.new" in target.listdir("/"):
            target.rename(_path(name, NEW), _path(name, CUR))


def _matches(target: Target, base: str, files: dict[str, Any]) -> bool:
    def sha(e: Any) -> str:
        return e["sha256"] if isinstance(e, dict) else e.sha256
    return all(target.sha256(_path(n, base)) == sha(e) for n, e in files.items())


def _staged_ok(target: Target, pubkey: Ed25519PublicKey) -> bool:
    """A complete staged copy: manifest signed by this key and every file matching on device."""
    raw, sig = target.read_file(f"{NEW}/manifest.json"), target.read_file(f"{NEW}/manifest.sig")
    if raw is None or sig is None:
        return False
    try:
        pubkey.verify(sig, raw)
        _, m = _installed(target, NEW) or (b"", {})
    except (InvalidSignature, InstallError):
        return False
    with contextlib.suppress(InstallError):
        return bool(m) and _matches(target, NEW, m["files"])
    return False


def recover(target: Target, pubkey: Ed25519PublicKey) -> str | None:
    """Repair what an interrupted commit left, so /hexiao holds a working firmware."""
    top = set(target.listdir("/"))
    cur, new, old = "hexiao/" in top, "hexiao.new/" in top, "hexiao.old/" in top
    if old and not cur:
        if new and _staged_ok(target, pubkey):
            target.rename(NEW, CUR)
            _commit_root(target, (_installed(target) or (b"", {"files": {}}))[1]["files"])
            target.remove(OLD)
            return "finished an interrupted install (the new firmware was complete)"
        target.rename(OLD, CUR)
        return "rolled back an interrupted install: the previous firmware is restored"
    if old:
        target.remove(OLD)
        return "removed the previous firmware an interrupted install left behind"
    return None


def _walk(target: Target, base: str) -> Iterator[str]:
    """Relative names of the files under base (none if it does not exist)."""
    try:
        names = target.listdir(base)
    except FileNotFoundError:
        return
    for n in names:
        if n.endswith("/"):
            yield from (f"{n}{sub}" for sub in _walk(target, f"{base}/{n[:-1]}"))
        else:
            yield n


def flash(bundle_path: Path | str, pubkey: Ed25519PublicKey, target: Target,
          board: str | None = None, confirm: Callable[[str], bool] | None = None,
          progress: Callable[[int], contextlib.AbstractContextManager[Any]] | None = None,
          ) -> FlashResult:
    """Install a bundle on target; InstallError says why not (nothing half-active)."""
    bundle = B.read_bundle(bundle_path)
    for name in B.verify_bundle(bundle, pubkey).files:  # before anything touches the device
        _path(name, CUR)
    try:
        return _flash(bundle, pubkey, target, board, confirm, progress)
    except TargetGone as e:
        raise refused("connection-lost", f"lost the device ({e}); {_KEEP} or the staged "
                         "copy is kept: run the same command again to resume") from None


def _flash(bundle: B.Bundle, pubkey: Ed25519PublicKey, target: Target, board: str | None,
           confirm: Callable[[str], bool] | None,
           progress: Callable[[int], contextlib.AbstractContextManager[Any]] | None,
           ) -> FlashResult:
    device_board = target.board()
    if board is not None and board != device_board:
        raise refused("wrong-board", f"the device reports board {device_board!r}, "
                            f"not {board!r}: is this the right port?")
    if target.read_file(state_path(target, PRODUCTION)) is not None:
        raise refused("production", "the device is in production mode: its files change only "
                      "through signed updates: `hexiao device update DEVICE BUNDLE` (hostd)")
    repaired = recover(target, pubkey)
    inst = _installed(target)
    prev = {"version": inst[1].get("version"), "counter": inst[1]["counter"]} if inst else None
    m = B.verify_bundle(bundle, pubkey, board=device_board,
                        min_counter=prev["counter"] if prev else None)

    def result(action: str, written: int = 0, skipped: int = 0, nbytes: int = 0) -> FlashResult:
        return FlashResult(action, m.board, m.version, m.counter, prev, written, skipped,
                           nbytes, repaired)

    if inst and inst[0] == bundle.manifest and _matches(target, CUR, m.files):
        return result("up-to-date")
    what = f"{m.board} {m.version} (counter {m.counter})"
    if confirm and not confirm(f"Install {what}" + (
            f" over {prev['version']} (counter {prev['counter']})" if prev else "") + "?"):
        raise refused("declined", "not confirmed: nothing was written")
    # staging complete is marked by manifest.json: drop a stale one before anything else
    target.remove(f"{NEW}/manifest.json")
    staged = set(_walk(target, NEW))  # hash only what is there: a round trip per file
    todo = [n for n, e in sorted(m.files.items())
            if (n not in B.ROOT_FILES and _rel(n) not in staged)
            or target.sha256(_path(n, NEW)) != e.sha256]
    need = sum(-(-m.files[n].size // BLOCK) * BLOCK for n in todo) + 2 * BLOCK
    free = target.free_bytes()
    if need > free:
        raise refused("no-space", f"the device has {free} bytes free, {what} needs {need}: "
                         f"nothing was written, {_KEEP}")
    ours = {_rel(n) for n in m.files if n not in B.ROOT_FILES}
    for stale in staged - ours - {"manifest.sig", "manifest.json"}:
        target.remove(f"{NEW}/{stale}")
    nbytes = 0
    try:
        with progress(sum(m.files[n].size for n in todo)) if progress else \
                contextlib.nullcontext() as bar:
            for n in todo:
                _copy(target, _path(n, NEW), bundle.files[n], m.files[n].sha256)
                nbytes += m.files[n].size
                if bar is not None:
                    bar.update(m.files[n].size)
        _copy(target, f"{NEW}/manifest.sig", bundle.signature or b"",
              hashlib.sha256(bundle.signature or b"").hexdigest())
        _copy(target, f"{NEW}/manifest.json", bundle.manifest,
              hashlib.sha256(bundle.manifest).hexdigest())
    except OSError as e:
        with contextlib.suppress(OSError, TargetGone):
            target.remove(NEW)  # give the space back; the installed firmware was not touched
        why = "the device filesystem is full" if e.errno == errno.ENOSPC else f"write failed: {e}"
        raise refused("write-error", f"{why}; the partial copy was removed and {_KEEP}"
                         + (f" ({prev['version']})" if prev else "")) from None
    if inst:
        target.rename(CUR, OLD)
    target.rename(NEW, CUR)
    _commit_root(target, m.files)  # cut off before this: the next run sees it not up to date
    target.remove(OLD)
    target.reset()
    return result("installed", len(todo), len(m.files) - len(todo), nbytes)


def _copy(target: Target, path: str, data: bytes, sha: str) -> None:
    for _ in range(2):  # one rewrite for a flaky write, then give up
        target.write_file(path, data)
        if target.sha256(path) == sha:
            return
    raise refused("verify-failed", f"{path} reads back with a different SHA-256 on the device "
                     f"after two writes; {_KEEP}: check the cable and the board's flash")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.option("--pubkey", required=True, type=click.Path(path_type=Path),
              help="Public key the bundle must be signed with (KEY.pub).")
@click.option("--port", help="Serial port of the board (e.g. /dev/hexiao/<serial>).")
@click.option("--sim-dir", type=click.Path(path_type=Path), help="The sim board's directory.")
@click.option("--board", type=click.Choice(B.BOARDS),
              help="Refuse unless the device is this board.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result object, no progress.")
@click.option("--yes", is_flag=True, help="Do not ask before replacing the firmware.")
def main(bundle_path: Path, pubkey: Path, port: str | None, sim_dir: Path | None,
         board: str | None, as_json: bool, yes: bool) -> None:
    """Install a signed firmware bundle on a board; exit code says why it was refused."""
    if (port is None) == (sim_dir is None):
        raise click.UsageError("give exactly one of --port PORT or --sim-dir DIR")
    out: dict[str, Any] = {"bundle": str(bundle_path), "target": port or str(sim_dir), "ok": False}

    def bar(total: int) -> contextlib.AbstractContextManager[Any]:
        return click.progressbar(length=total, label="copying", file=sys.stderr,
                                 show_pos=True, width=30)

    def ask(question: str) -> bool:
        return yes or click.confirm(question, err=True)

    try:
        try:
            public = keys.load_public_key(pubkey)
        except keys.KeyFileError as e:
            raise refused("key", str(e)) from None
        target: Target = MpremoteTarget(port) if port else DirTarget(sim_dir or ".")
        r = flash(bundle_path, public, target, board, ask, None if as_json else bar)
    except InstallError as e:
        code = e.exit_code
        out.update(kind=e.kind, message=e.message, exit_code=code)
        click.echo(B.canonical(out).decode() if as_json else f"Error: {e.kind}: {e.message}",
                   err=not as_json)
        raise SystemExit(code) from None
    out.update(ok=True, **asdict(r))
    if as_json:
        click.echo(B.canonical(out).decode())
        return
    if r.repaired:
        click.echo(f"repaired: {r.repaired}", err=True)
    if r.action == "up-to-date":
        click.echo(f"up to date: {r.board} {r.version} (counter {r.counter}) is installed")
        return
    click.echo(f"installed {r.board} {r.version} (counter {r.counter}): {r.written} files "
               f"written ({r.bytes_written} bytes), {r.skipped} already staged; device reset")


__all__ = ["BLOCK", "CUR", "EXIT_CODES", "NEW", "OLD", "PLATFORM_BOARDS", "PRODUCTION",
           "DirTarget", "FlashResult", "InstallError", "MpremoteTarget", "Target", "TargetGone",
           "flash", "main", "recover", "state_path"]


if __name__ == "__main__":
    main()
