"""The receipt tap's key file: the HMAC key that signs per-receipt tokens (inject.make_token).

Rules this module keeps:
- A key file is private exactly as hostd's other secrets are (keystore.check_private): owned by
  this user and not readable by group or others, checked on the descriptor that is read, so a
  file swapped in between check and read is never used. Anything else is refused, never warned
  about: a key others can read signs tokens anyone can forge.
- What a key file holds: hex text (32..128 hex digits, whitespace around it ignored; `openssl
  rand -hex 32`) or 16..64 raw bytes that are not text. Everything else (a PEM file, a config,
  a short or odd-length hex string, a folder, a device) is refused with what to put there
  instead: a wrong path must not silently become a key.
- Errors name the file and what to do; they never contain the file's content.
"""

from __future__ import annotations

import os
import stat
import string
from pathlib import Path

from hexiao.hostd.keystore import KeystoreError, check_private, write_private

MIN_KEY, MAX_KEY = 16, 64  # bytes
_HEX = frozenset(string.hexdigits.encode())
_TEXT = frozenset(string.printable.encode())
WHAT = (f"a tap key needs at least {MIN_KEY} bytes ({2 * MIN_KEY} hex digits): put 64 hex "
        "digits in it, e.g. `openssl rand -hex 32 > KEY && chmod 600 KEY`")


class KeyFileError(ValueError):
    """The tap key file cannot be used; the message says why and what to do."""


def parse_key(raw: bytes, where: str = "the key file") -> bytes:
    """The key in a key file's bytes (see the module rules); KeyFileError otherwise."""
    text = raw.strip()
    if text and all(b in _HEX for b in text):
        if len(text) < 2 * MIN_KEY:
            raise KeyFileError(f"{where}: {len(text)} hex digits; {WHAT}")
        if len(text) % 2 or len(text) > 2 * MAX_KEY:
            raise KeyFileError(f"{where}: {len(text)} hex digits is not a key of "
                               f"{MIN_KEY}..{MAX_KEY} bytes; {WHAT}")
        return bytes.fromhex(text.decode("ascii"))
    if not raw or all(b in _TEXT for b in raw):
        raise KeyFileError(f"{where}: not a tap key (text that is not hex digits); {WHAT}")
    if not MIN_KEY <= len(raw) <= MAX_KEY:
        raise KeyFileError(f"{where}: {len(raw)} bytes of binary data is not a key of "
                           f"{MIN_KEY}..{MAX_KEY} bytes; {WHAT}")
    return raw


def new_key_file(path: str | Path) -> None:
    """Create a tap key file: 32 random bytes as 64 hex digits, 0600 from its first byte. An
    existing file is never overwritten (FileExistsError): tokens signed with it would stop
    verifying."""
    write_private(Path(path), os.urandom(32).hex().encode() + b"\n")


def read_key(path: str | Path) -> bytes:
    """The tap key in `path`; KeyFileError if it is unreadable, not private or not a key."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError as e:
        raise KeyFileError(f"tap key file {path}: cannot read: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"tap key file {path}: not a regular file; {WHAT}")
        try:
            check_private(path, st)
        except KeystoreError as e:
            raise KeyFileError(f"tap key file {e}") from None
        raw = os.read(fd, 4 * MAX_KEY + 64)  # more than any key file holds: enough to refuse
    finally:
        os.close(fd)
    if len(raw) > 2 * MAX_KEY + 32:
        raise KeyFileError(f"tap key file {path}: too long to be a key ({st.st_size} bytes); "
                           f"is this the right file? {WHAT}")
    return parse_key(raw, f"tap key file {path}")
