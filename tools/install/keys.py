"""Firmware signing keys: `hexiao keys generate|show`.

Format: the signing key is an unencrypted PKCS#8 PEM file ("BEGIN PRIVATE KEY", Ed25519),
created with mode 0600 by os.open(O_CREAT|O_EXCL) so it is never readable by others, not even
for a moment; PATH.pub is the SubjectPublicKeyInfo PEM ("BEGIN PUBLIC KEY"), mode 0644 (less if
the umask says so). A fingerprint is "SHA256:" + unpadded base64 of SHA-256 over the 32 raw
public key bytes (the style of ssh-keygen -l). Nothing here ever prints private key material.
Loading a private key refuses a file that any group or other user may access.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hexiao.hostd.keyfiles import (  # noqa: F401 (the installer's names for them)
    MAX_KEY_FILE,
    KeyFileError,
    _raw,
    _read,
    fingerprint,
    load_private_key,
    load_public_key,
)


def _create(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never write into a file that exists (its mode or owner could be anything)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def generate(out: Path | str, force: bool = False) -> Ed25519PublicKey:
    """Write a new signing key to `out` (0600) and its public key to `out`.pub."""
    out = Path(out)
    pub = out.with_name(out.name + ".pub")
    for p in (out, pub):
        if os.path.lexists(p) and not force:
            raise KeyFileError(f"{p} already exists; refusing to overwrite (use --force)")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        for p, data, mode in ((out, pem, 0o600), (pub, pub_pem, 0o644)):
            if force and os.path.lexists(p):
                os.unlink(p)  # a fresh inode with our mode, not the old file's
            _create(p, data, mode)
    except OSError as e:
        raise KeyFileError(f"cannot write {e.filename}: {e.strerror}") from None
    return key.public_key()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Firmware signing keys (Ed25519)."""


@main.command("generate")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Signing key file to create (mode 0600); the public key goes to OUT.pub.")
@click.option("--force", is_flag=True, help="Replace existing key files (the old key is lost).")
def generate_cmd(out: Path, force: bool) -> None:
    """Create a new firmware signing key pair."""
    try:
        public = generate(out, force=force)
    except KeyFileError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"signing key: {out} (mode 0600; keep it offline, never commit it)")
    click.echo(f"public key:  {out}.pub  {fingerprint(public)}")
    click.echo(f"next: hexiao bundle build --key {out} ...; devices verify with {out}.pub")


@main.command("show")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def show_cmd(path: Path, as_json: bool) -> None:
    """Print the public key fingerprint of a signing key or a .pub file."""
    try:
        head = _read(path, private=False)
        private = b"PRIVATE KEY" in head
        public = load_private_key(path).public_key() if private else load_public_key(path)
    except KeyFileError as e:
        raise click.ClickException(str(e)) from None
    fp = fingerprint(public)
    if as_json:
        raw = _raw(public).hex()
        click.echo(json.dumps({"path": str(path), "private": private, "algorithm": "ed25519",
                               "fingerprint": fp, "public_key": raw}, sort_keys=True))
    else:
        kind = "signing key" if private else "public key"
        click.echo(f"{fp}  ed25519 {kind} {path}")


if __name__ == "__main__":
    main()
