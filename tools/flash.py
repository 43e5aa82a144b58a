"""`hexiao flash`: install a signed firmware bundle on a board (USB, via mpremote) or on the sim
board's filesystem directory, through one pipeline.

Pipeline: verify the bundle's signature and files (before touching the device) -> repair an
interrupted earlier commit -> check the board and the installed security counter
(/hexiao/manifest.json) -> check free space -> copy into /hexiao.new, verifying each file by a
SHA-256 the device computes itself (a re-run skips staged files that already match) -> write
manifest.sig then manifest.json last (the "staging complete" mark) -> commit: /hexiao ->
/hexiao.old, /hexiao.new -> /hexiao, remove /hexiao.old -> reset. A run interrupted anywhere
leaves the previous firmware in /hexiao or /hexiao.old; the next run finishes the commit if the
staged copy is complete and signed by the key given, else rolls back.

Exit codes (FlashError.kind / EXIT_CODES): 0 ok, 2 usage, 10-18 bundle refusals as in
`hexiao bundle verify` (16 wrong-board also when --board differs from the device, 17 downgrade
against the device's installed counter), 20 unreachable (no such port or sim dir),
21 connection-lost (re-run to resume), 22 no-space (nothing written), 23 write-error (staging
removed, previous firmware active), 24 verify-failed (device-side hash differs after rewriting),
25 device-manifest (installed manifest unreadable: the counter cannot be checked), 26 declined.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import click
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hexiao.tools import bundle as B
from hexiao.tools import keys, micropython

CUR, NEW, OLD = "/hexiao", "/hexiao.new", "/hexiao.old"
BLOCK = 4096  # littlefs/FAT block on the boards: every file costs at least one
EXIT_CODES = {**B.EXIT_CODES, "unreachable": 20, "connection-lost": 21, "no-space": 22,
              "write-error": 23, "verify-failed": 24, "device-manifest": 25, "declined": 26}
PLATFORM_BOARDS = {"linux": "sim", "rp2": "rp2040", "esp32": "esp32s3"}
_KEEP = "the previous firmware is still active"


class TargetGone(Exception):
    """The device stopped answering (unplugged, reset): a re-run resumes."""


class FlashError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind, self.message = kind, message

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.kind]


class Target(Protocol):
    """A device filesystem seen through its own runtime; paths are absolute device paths."""

    def read_file(self, path: str) -> bytes | None: ...
    def write_file(self, path: str, data: bytes) -> None: ...  # creates parent folders
    def rename(self, src: str, dst: str) -> None: ...
    def remove(self, path: str) -> None: ...  # a file or a whole tree; missing is fine
    def listdir(self, path: str) -> list[str]: ...  # folders end with "/"; FileNotFoundError
    def sha256(self, path: str) -> str | None: ...  # hex, computed on the device
    def free_bytes(self) -> int: ...
    def board(self) -> str: ...
    def reset(self) -> None: ...


_HASH = """import hashlib,binascii
h=hashlib.sha256();b=bytearray(512);m=memoryview(b)
try:
 f=open(%r,'rb')
except OSError:
 print('-');raise SystemExit
while 1:
 n=f.readinto(b)
 if not n:break
 h.update(m[:n])
f.close();print(binascii.hexlify(h.digest()).decode())"""


class DirTarget:
    """The sim board: its filesystem is `root` (the unix port's cwd); `root/board.json` holds
    {"board": NAME} (absent: "sim"). Hashes are computed by the real MicroPython."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FlashError("unreachable", f"sim board directory {self.root} does not exist")
        self.resets = 0

    @staticmethod
    def create(root: Path | str, board: str = "sim") -> DirTarget:
        Path(root).mkdir(parents=True, exist_ok=True)
        Path(root, "board.json").write_text(json.dumps({"board": board}) + "\n")
        return DirTarget(root)

    def _p(self, path: str) -> Path:
        parts = PurePosixPath(path).parts[1:]
        if not PurePosixPath(path).is_absolute() or ".." in parts:
            raise ValueError(f"not an absolute device path: {path!r}")
        return self.root.joinpath(*parts)

    def read_file(self, path: str) -> bytes | None:
        with contextlib.suppress(FileNotFoundError):
            return self._p(path).read_bytes()
        return None

    def write_file(self, path: str, data: bytes) -> None:
        p = self._p(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    def rename(self, src: str, dst: str) -> None:
        os.rename(self._p(src), self._p(dst))

    def remove(self, path: str) -> None:
        p = self._p(path)
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)

    def listdir(self, path: str) -> list[str]:
        return sorted(c.name + "/" * c.is_dir() for c in self._p(path).iterdir())

    def sha256(self, path: str) -> str | None:
        rel = str(PurePosixPath(path).relative_to("/"))
        r = subprocess.run([micropython.executable("micropython"), "-c", _HASH % rel],
                           cwd=self.root, capture_output=True, text=True, timeout=60,
                           env={"PATH": "/usr/bin:/bin", "MICROPYPATH": ".frozen"})
        if r.returncode != 0:
            raise OSError(errno.EIO, f"hashing {path} on the sim board failed: {r.stderr}")
        out = r.stdout.strip()
        return None if out == "-" else out

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def board(self) -> str:
        raw = self.read_file("/board.json")
        return str(json.loads(raw)["board"]) if raw else "sim"

    def reset(self) -> None:
        self.resets += 1  # the sim restarts by running the unix port again


_RM = """import os
def _rm(p):
 try:
  m=os.stat(p)[0]
 except OSError:
  return
 if m&0x4000:
  for n in os.listdir(p):_rm(p+'/'+n)
  os.rmdir(p)
 else:
  os.remove(p)
_rm(%r)"""
_MKDIRS = """import os
p=''
for s in %r.split('/')[1:-1]:
 p+='/'+s
 try:
  os.mkdir(p)
 except OSError:
  pass"""


class MpremoteTarget:
    """A board over USB through mpremote's raw-REPL transport. `root` prefixes every path (a
    board's root is ""; the unix port on a pty is given its sim dir). `transport` is injectable
    (tests); else mpremote.transport_serial.SerialTransport(port)."""

    def __init__(self, port: str, root: str = "", transport: Any = None,
                 soft_reset: bool = True) -> None:
        from mpremote.transport import TransportError, TransportExecError
        from serial import SerialException

        self._errs = (TransportExecError, TransportError, SerialException)
        self.port, self.root = port, root.rstrip("/")
        if transport is None:
            from mpremote.transport_serial import SerialTransport
            try:
                transport = SerialTransport(port, baudrate=115200)
            except (TransportError, SerialException, OSError) as e:
                raise FlashError("unreachable", f"cannot open {port}: {e}") from None
        self.t = transport
        self._call(self.t.enter_raw_repl, soft_reset=soft_reset)

    def _call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        exec_err, transport_err, serial_err = self._errs
        try:
            return fn(*args, **kw)
        except serial_err as e:  # a SerialException is an OSError: test it first
            raise TargetGone(f"{self.port}: {e}") from None
        except exec_err as e:
            from mpremote.transport import _convert_filesystem_error
            conv = _convert_filesystem_error(e, str(args[0]) if args else "")
            raise (conv if isinstance(conv, OSError) else OSError(errno.EIO, str(e))) from None
        except transport_err as e:
            raise TargetGone(f"{self.port}: {e}") from None

    def _p(self, path: str) -> str:
        return (self.root + path) or "/"

    def read_file(self, path: str) -> bytes | None:
        try:
            return bytes(self._call(self.t.fs_readfile, self._p(path)))
        except FileNotFoundError:
            return None

    def write_file(self, path: str, data: bytes) -> None:
        self._call(self.t.exec, _MKDIRS % self._p(path))
        self._call(self.t.fs_writefile, self._p(path), data)

    def rename(self, src: str, dst: str) -> None:
        self._call(self.t.exec, f"import os\nos.rename({self._p(src)!r},{self._p(dst)!r})")

    def remove(self, path: str) -> None:
        self._call(self.t.exec, _RM % self._p(path))

    def listdir(self, path: str) -> list[str]:
        ents = self._call(self.t.fs_listdir, self._p(path))
        return sorted(e.name + "/" * bool(e.st_mode & 0x4000) for e in ents)

    def sha256(self, path: str) -> str | None:
        try:
            return bytes(self._call(self.t.fs_hashfile, self._p(path), "sha256")).hex()
        except FileNotFoundError:
            return None

    def free_bytes(self) -> int:
        st = self._call(self.t.eval, f"__import__('os').statvfs({self._p('/')!r})")
        return int(st[4]) * int(st[1])

    def board(self) -> str:
        raw = self.read_file("/board.json")
        if raw:
            return str(json.loads(raw)["board"])
        plat = self._call(self.t.eval, "__import__('sys').platform")
        return PLATFORM_BOARDS.get(plat, plat)

    def reset(self) -> None:
        code = ("import machine\ntry:\n machine.reset()\nexcept AttributeError:\n"
                " machine.soft_reset()")
        with contextlib.suppress(*self._errs, OSError):  # the board goes away while resetting
            self.t.exec_raw_no_follow(code)
        with contextlib.suppress(*self._errs, OSError):
            self.t.close()


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
        raise FlashError("device-manifest", f"the installed {base}/manifest.json is unreadable, "
                         "so its security counter cannot be checked; refusing to flash") from None
    return raw, m


def _rel(name: str) -> str:
    """A bundle member's path inside the firmware folder ("hexiao/protocol/x.mpy" is
    /hexiao/protocol/x.mpy once installed, /hexiao.new/protocol/x.mpy while staged)."""
    top, _, rest = name.partition("/")
    if top != "hexiao" or not rest:
        raise B.BundleError("corrupt", f"bundle file {name!r} is not under hexiao/")
    return rest


def _matches(target: Target, base: str, files: dict[str, Any]) -> bool:
    def sha(e: Any) -> str:
        return e["sha256"] if isinstance(e, dict) else e.sha256
    return all(target.sha256(f"{base}/{_rel(n)}") == sha(e) for n, e in files.items())


def _staged_ok(target: Target, pubkey: Ed25519PublicKey) -> bool:
    """A complete staged copy: manifest signed by this key and every file matching on device."""
    raw, sig = target.read_file(f"{NEW}/manifest.json"), target.read_file(f"{NEW}/manifest.sig")
    if raw is None or sig is None:
        return False
    try:
        pubkey.verify(sig, raw)
        _, m = _installed(target, NEW) or (b"", {})
    except (InvalidSignature, FlashError):
        return False
    with contextlib.suppress(B.BundleError):
        return bool(m) and _matches(target, NEW, m["files"])
    return False


def recover(target: Target, pubkey: Ed25519PublicKey) -> str | None:
    """Repair what an interrupted commit left, so /hexiao holds a working firmware."""
    top = set(target.listdir("/"))
    cur, new, old = "hexiao/" in top, "hexiao.new/" in top, "hexiao.old/" in top
    if old and not cur:
        if new and _staged_ok(target, pubkey):
            target.rename(NEW, CUR)
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
    """Install a bundle on target; FlashError / BundleError say why not (nothing half-active)."""
    bundle = B.read_bundle(bundle_path)
    for name in B.verify_bundle(bundle, pubkey).files:  # before anything touches the device
        _rel(name)
    try:
        return _flash(bundle, pubkey, target, board, confirm, progress)
    except TargetGone as e:
        raise FlashError("connection-lost", f"lost the device ({e}); {_KEEP} or the staged "
                         "copy is kept: run the same command again to resume") from None


def _flash(bundle: B.Bundle, pubkey: Ed25519PublicKey, target: Target, board: str | None,
           confirm: Callable[[str], bool] | None,
           progress: Callable[[int], contextlib.AbstractContextManager[Any]] | None,
           ) -> FlashResult:
    device_board = target.board()
    if board is not None and board != device_board:
        raise B.BundleError("wrong-board", f"the device reports board {device_board!r}, "
                            f"not {board!r}: is this the right port?")
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
        raise FlashError("declined", "not confirmed: nothing was written")
    # staging complete is marked by manifest.json: drop a stale one before anything else
    target.remove(f"{NEW}/manifest.json")
    staged = set(_walk(target, NEW))  # hash only what is there: a round trip per file
    todo = [n for n, e in sorted(m.files.items()) if _rel(n) not in staged
            or target.sha256(f"{NEW}/{_rel(n)}") != e.sha256]
    need = sum(-(-m.files[n].size // BLOCK) * BLOCK for n in todo) + 2 * BLOCK
    free = target.free_bytes()
    if need > free:
        raise FlashError("no-space", f"the device has {free} bytes free, {what} needs {need}: "
                         f"nothing was written, {_KEEP}")
    for stale in staged - {_rel(n) for n in m.files} - {"manifest.sig", "manifest.json"}:
        target.remove(f"{NEW}/{stale}")
    nbytes = 0
    try:
        with progress(sum(m.files[n].size for n in todo)) if progress else \
                contextlib.nullcontext() as bar:
            for n in todo:
                _copy(target, f"{NEW}/{_rel(n)}", bundle.files[n], m.files[n].sha256)
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
        raise FlashError("write-error", f"{why}; the partial copy was removed and {_KEEP}"
                         + (f" ({prev['version']})" if prev else "")) from None
    if inst:
        target.rename(CUR, OLD)
    target.rename(NEW, CUR)
    target.remove(OLD)
    target.reset()
    return result("installed", len(todo), len(m.files) - len(todo), nbytes)


def _copy(target: Target, path: str, data: bytes, sha: str) -> None:
    for _ in range(2):  # one rewrite for a flaky write, then give up
        target.write_file(path, data)
        if target.sha256(path) == sha:
            return
    raise FlashError("verify-failed", f"{path} reads back with a different SHA-256 on the device "
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
            raise B.BundleError("key", str(e)) from None
        target: Target = MpremoteTarget(port) if port else DirTarget(sim_dir or ".")
        r = flash(bundle_path, public, target, board, ask, None if as_json else bar)
    except (B.BundleError, FlashError) as e:
        code = e.exit_code
        out.update(kind=e.kind, message=e.message, exit_code=code)
        click.echo(B.canonical(out).decode() if as_json else f"refused ({e.kind}): {e.message}",
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


if __name__ == "__main__":
    main()
