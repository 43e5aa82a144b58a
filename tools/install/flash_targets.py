"""Where `hexiao flash` writes: a device filesystem seen through the device's own runtime.

Target is the protocol the pipeline (flash.py) uses; DirTarget is the sim board (a folder, hashed
by the real MicroPython unix port), MpremoteTarget a board over USB (mpremote's raw REPL).

Rules this module keeps:
- Paths are absolute device paths; a target never interprets what it stores (no manifests here).
- SHA-256 is computed on the device itself, so a hash proves what the device will read.
- A device that stops answering raises TargetGone (the pipeline turns it into "re-run to
  resume"); a refusal before anything is written raises InstallError with an EXIT_CODES kind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from hexiao.tools import micropython
from hexiao.tools.install import bundle as B
from hexiao.tools.install.errors import InstallError

EXIT_CODES = {**B.EXIT_CODES, "unreachable": 20, "connection-lost": 21, "no-space": 22,
              "write-error": 23, "verify-failed": 24, "device-manifest": 25, "declined": 26,
              "production": 27}
PLATFORM_BOARDS = {"linux": "sim", "rp2": "rp2040", "esp32": "esp32s3"}


class TargetGone(Exception):
    """The device stopped answering (unplugged, reset): a re-run resumes."""


def refused(kind: str, message: str) -> InstallError:
    """A flash refusal: kind is a key of EXIT_CODES (the bundle's refusals included)."""
    return InstallError(message, EXIT_CODES[kind], kind)


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
            raise refused("unreachable", f"sim board directory {self.root} does not exist")
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
                raise refused("unreachable", f"cannot open {port}: {e}") from None
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
