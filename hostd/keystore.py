"""The host's device keys: one 32-byte key per device id (kid), in a private file.

File format: JSON lines, `{"id": "<kid hex>", "key": "<key hex>"}` per device, in insertion
order. Rules this module keeps:
- The file is created 0600 with O_CREAT|O_EXCL and every change is written atomically: a 0600
  temp file in the same folder, fsync, rename over the old file, fsync of the folder. A crash
  leaves the old file or the new one, never half of one, and no key is ever world-readable.
- A keystore that the group or others can read, or that another user owns, is refused with the
  fix in the message; we do not chmod it ourselves (someone else may already have read it).
- Key bytes never appear in repr/str or in exception text (line numbers and lengths only).
- Writers re-read the file before changing it, so provisioning from another process is kept;
  two writers at the very same moment can still lose one change (no cross-process lock).
"""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

KEY_LEN = 32
KID_MAX = 16


class KeystoreError(Exception):
    """The keystore file is unsafe, unreadable or malformed."""


def check_private(path: Path, st: os.stat_result | None = None, holds: str = "keys") -> None:
    """Raise KeystoreError unless `path` is owned by us and not readable by group or others
    (the rule for every file holding secrets or coupon codes: hostd/config/private.py)."""
    st = st or os.stat(path)
    if os.name != "posix":  # Windows: ACLs, not mode bits; nothing meaningful to check here
        return
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        what = "a key file must be private" if holds == "keys" else f"it holds {holds}"
        redo = "replace the keys" if holds == "keys" else "treat them as seen"
        raise KeystoreError(
            f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets other users read it; "
            f"{what}: chmod 600 {path} (and {redo} if others may have read them)")
    if st.st_uid != os.geteuid():
        raise KeystoreError(
            f"{path}: owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}); "
            f"run as the owner, or chown it to this user and chmod 600 {path}")


def _check_kid(kid: bytes) -> bytes:
    kid = bytes(kid)
    if not 1 <= len(kid) <= KID_MAX:
        raise ValueError(f"a device id is 1..{KID_MAX} bytes, got {len(kid)}")
    return kid


class Keystore:
    """kid -> 32-byte device key. `ks.get` (or `ks` itself) is a host Link keystore callable."""

    def __init__(self, path: str | Path, *, create: bool = False) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._keys: dict[bytes, bytes] = {}
        if create and not self.path.exists():
            self._create()
        self.reload()

    def __repr__(self) -> str:
        return f"Keystore({str(self.path)!r}, {len(self._keys)} keys)"

    __str__ = __repr__

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, kid: object) -> bool:
        return isinstance(kid, bytes | bytearray) and bytes(kid) in self._keys

    def __call__(self, kid: bytes) -> bytes | None:
        return self.get(kid)

    def get(self, kid: bytes) -> bytes | None:
        return self._keys.get(bytes(kid))

    def ids(self) -> list[bytes]:
        return list(self._keys)

    def add(self, kid: bytes, key: bytes, *, replace: bool = False) -> None:
        """Store a device key; ValueError if the id has one already, unless replace=True."""
        kid = _check_kid(kid)
        if len(key) != KEY_LEN:
            raise ValueError(f"a device key is {KEY_LEN} bytes, got {len(key)}")
        with self._lock:
            self.reload()
            if kid in self._keys and not replace:
                raise ValueError(f"device {kid.hex()} already has a key (replace=True to rotate)")
            self._keys[kid] = bytes(key)
            self._write()

    def remove(self, kid: bytes) -> bool:
        """Forget a device's key; False if it had none."""
        with self._lock:
            self.reload()
            if self._keys.pop(bytes(kid), None) is None:
                return False
            self._write()
            return True

    def reload(self) -> None:
        """Re-read the file (checking its owner and mode first)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            raise KeystoreError(f"{self.path}: no such keystore (provision a device first, "
                                f"or create it)") from None
        except OSError as e:
            raise KeystoreError(f"{self.path}: cannot open: {e.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            check_private(self.path, os.fstat(f.fileno()))  # the file we read, not a swap
            raw = f.read()
        self._keys = self._parse(raw)

    def _parse(self, raw: bytes) -> dict[bytes, bytes]:
        keys: dict[bytes, bytes] = {}
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                kid, key = bytes.fromhex(rec["id"]), bytes.fromhex(rec["key"])
            except (ValueError, KeyError, TypeError):
                # no `from`: the cause would carry the line, key included
                raise KeystoreError(f"{self.path} line {n}: expected "
                                    f'{{"id": HEX, "key": HEX}}') from None
            if not 1 <= len(kid) <= KID_MAX or len(key) != KEY_LEN:
                raise KeystoreError(f"{self.path} line {n}: id must be 1..{KID_MAX} bytes and "
                                    f"key {KEY_LEN} bytes (key has {len(key)})")
            if kid in keys:
                raise KeystoreError(f"{self.path} line {n}: device {kid.hex()} listed twice")
            keys[kid] = key
        return keys

    def _create(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return  # another process created it first: use theirs
        try:
            _fchmod600(fd)  # a umask like 0277 would leave it unwritable
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(self.path.parent)

    def _write(self) -> None:
        body = "".join(json.dumps({"id": k.hex(), "key": v.hex()}) + "\n"
                       for k, v in self._keys.items()).encode("ascii")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        try:
            write_private(tmp, body)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)


def write_private(path: Path, data: bytes) -> None:
    """Create `path` (it must not exist) 0600 from its first byte, whatever the umask, write
    `data` and fsync it: a key is never readable by others, not even briefly."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                 0o600)
    try:
        _fchmod600(fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _fchmod600(fd: int) -> None:
    if hasattr(os, "fchmod"):
        os.fchmod(fd, 0o600)


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
