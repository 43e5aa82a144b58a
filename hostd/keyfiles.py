"""Ed25519 key files, read the one way every part reads them: the installer's firmware keys
(tools/install/keys.py), headquarters' key in fleetd and in the `hexiao fleet` commands, and the
stores' copy of its public half.

Rules this module keeps:
- A private key file that any group or other user may access is refused (the mode of the file
  actually opened, not of a path that may change), and so is anything but a regular file.
- Error messages never quote a file's content (it could be key material); each says what to do.
- A fingerprint is "SHA256:" + unpadded base64 of SHA-256 over the 32 raw public key bytes (the
  style of ssh-keygen -l).
"""

from __future__ import annotations

import base64
import hashlib
import os
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

MAX_KEY_FILE = 16 * 1024  # a PEM key is ~120 bytes; anything big is not a key


class KeyFileError(Exception):
    """A key file that is missing, unsafe, or not an Ed25519 key; the message says what to do."""


def _raw(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public: Ed25519PublicKey) -> str:
    digest = hashlib.sha256(_raw(public)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _read(path: Path, private: bool) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise KeyFileError(f"cannot read key file {path}: {e.strerror}") from None
    st = os.fstat(fd)  # the mode of the file we read, not of a path that may change
    if not stat.S_ISREG(st.st_mode):  # a directory opens, then fails every read
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        raise KeyFileError(f"key file {path} is {what}: give the key file itself (make one "
                           "with: hexiao keys generate --out PATH)")
    with os.fdopen(fd, "rb") as f:
        if private and st.st_mode & 0o077:
            raise KeyFileError(
                f"signing key {path} is accessible by other users (mode "
                f"{stat.S_IMODE(st.st_mode):04o}); refusing to use it. Run: chmod 600 {path} "
                "(and consider the key exposed: generate a new one if others could read it)"
            )
        return f.read(MAX_KEY_FILE + 1)


def load_private_key(path: Path | str) -> Ed25519PrivateKey:
    """The Ed25519 signing key in `path`; KeyFileError if unsafe (mode) or not such a key."""
    path = Path(path)
    data = _read(path, private=True)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # never include the exception text: it could quote the file
        raise KeyFileError(
            f"{path} is not an unencrypted PEM Ed25519 signing key (make one with: "
            "hexiao keys generate --out PATH)"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is a private key but not Ed25519")
    return key


def load_public_key(path: Path | str) -> Ed25519PublicKey:
    """The Ed25519 public key in `path` (a .pub PEM); KeyFileError if it is not one."""
    path = Path(path)
    data = _read(path, private=False)
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"{path} holds a private key; pass the public key ({path}.pub)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path} is not a PEM Ed25519 public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{path} is a public key but not Ed25519")
    return key
