"""Signed firmware bundles: `hexiao bundle build|verify`, and the library `hexiao flash` uses.

Container: one uncompressed POSIX tar file (`hexiao-fw-<board>-<version>-c<counter>.tar`), so
an installer copies a single file and `tar tf` can inspect it. Members, in order:
  manifest.json  canonical JSON (sorted keys, no spaces, UTF-8): {"format": 1, "board",
                 "version" ("X.Y.Z"), "counter" (monotonic security counter, int >= 0),
                 "built" (UTC ISO 8601; SOURCE_DATE_EPOCH is honoured), "mpy_cross",
                 "files": {"hexiao/<part>/<name>.mpy": {"sha256": hex, "size": int}}}
                 (rp2040/esp32s3 also list "main.py": the boot stub at the device's root)
  manifest.sig   64-byte raw Ed25519 signature over the exact bytes of manifest.json
  hexiao/...     the compiled modules, laid out as on the device's filesystem
  main.py        rp2040/esp32s3 only: the stub the board runs at boot (ROOT_MAIN)
Only regular files with plain relative names are accepted; the manifest is parsed only after
its signature verifies. Equal counters are accepted (reinstall); lower ones are a downgrade.

`verify` exit codes (one per refusal: InstallError.kind, a key of EXIT_CODES):
  0 ok   2 usage   10 corrupt (unreadable container or malformed manifest)   11 unsigned
  12 bad-signature (includes any tampered manifest field)   13 tampered-file   14 missing-file
  15 extra-file   16 wrong-board   17 downgrade   18 key (key file unusable or unsafe)
  19 not-found (no such bundle file)
Refusals print one line on stderr, `Error: KIND: MESSAGE` (--json: the result object).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import re
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import click
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hexiao.tools import micropython
from hexiao.tools.install import keys
from hexiao.tools.install.errors import InstallError

FORMAT = 1
BOARDS = ("sim", "rp2040", "esp32s3")
PARTS = ("protocol", "firmware")
# host-only modules that never go to a device
HOST_ONLY = {
    "protocol": {"codec_fast.py", "codecs.py", "cose_fast.py", "messages_fast.py", "link_host.py",
                 "check.py", "fw_image.py"},
    "firmware": {"bench_device.py"},
}
# the board HALs and entry point each board gets (firmware files listed for other boards only
# stay out of its bundle); the sim board also carries linkpeer, the scripted peer its
# self-tests run, and its entry point is main (run as -m hexiao.firmware.main)
BOARD_FILES = {
    "sim": {"hal_sim.py", "linkpeer.py", "main.py"},
    "rp2040": {"hal_rp2040.py", "hal_usb.py", "board_main.py"},
    # hal_esp32s3 is hal_rp2040's Board with other pins: it needs hal_rp2040 too
    "esp32s3": {"hal_esp32s3.py", "hal_rp2040.py", "hal_usb.py", "board_main.py"},
}
# What a board runs at boot: MicroPython runs /main.py (source: it never loads a .mpy there),
# so the bundle carries this stub at its root (member "main.py", signed like every file) and
# `hexiao flash` installs it at /main.py; the code itself is hexiao/firmware/board_main.mpy.
# Its first lines finish what a firmware update's switch (firmware/fw_update.py) may have cut
# between its two renames: no /hexiao to import, so the previous firmware (or, with none, the
# staged one if completely unpacked) is put back; fw_update then rolls back and says why.
ROOT_MAIN = (
    "# hexiao firmware %s: the board runs this at boot; see hexiao/firmware/board_main\n"
    "import os\n\n"
    "if \"hexiao\" not in os.listdir():  # an update's switch cut between its renames\n"
    "    if \"hexiao.old\" in os.listdir():\n"
    "        os.rename(\"hexiao.old\", \"hexiao\")\n"
    "    elif \"hexiao.new\" in os.listdir() and \"manifest.json\" in os.listdir(\"hexiao.new\"):\n"
    "        os.rename(\"hexiao.new\", \"hexiao\")\n"
    "from hexiao.firmware.board_main import main\n\nmain(%r)\n")
ROOT_FILES = ("main.py",)  # bundle members installed at the device's root, not under hexiao/
_PER_BOARD = set().union(*BOARD_FILES.values())
MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
MAX_BUNDLE = 8 * 1024 * 1024  # boards have 2-16 MB of flash; a bigger bundle is not ours
EXIT_CODES = {
    "corrupt": 10, "unsigned": 11, "bad-signature": 12, "tampered-file": 13, "missing-file": 14,
    "extra-file": 15, "wrong-board": 16, "downgrade": 17, "key": 18, "not-found": 19,
}
_VERSION = re.compile(r"^(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})\.(0|[1-9][0-9]{0,8})$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def refused(kind: str, message: str) -> InstallError:
    """A bundle refusal: kind is a key of EXIT_CODES."""
    return InstallError(message, EXIT_CODES[kind], kind)


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int


@dataclass(frozen=True)
class Manifest:
    format: int
    board: str
    version: str
    counter: int
    built: str
    mpy_cross: str
    files: dict[str, FileEntry]


@dataclass(frozen=True)
class Bundle:
    """A container as read, nothing checked yet beyond its structure."""

    path: Path
    manifest: bytes
    signature: bytes | None
    files: dict[str, bytes]


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def device_sources(source: Path | None = None,
                   board: str = "sim") -> list[tuple[str, Path]]:
    """(device path of the .mpy, source .py) for every module `board` runs; `source` is a tree
    with protocol/ and firmware/ folders (a checkout), else the installed hexiao packages."""
    out = []
    for part in PARTS:
        src = source / part if source else micropython._source_dir(part)
        if not src.is_dir():
            raise click.UsageError(f"no {part}/ folder in {source}")
        for py in sorted(src.glob("*.py")):
            other_board = (part == "firmware" and py.name in _PER_BOARD
                           and py.name not in BOARD_FILES[board])
            if py.name not in HOST_ONLY[part] and not other_board:
                out.append((f"hexiao/{part}/{py.stem}.mpy", py))
    return out


def root_files(board: str) -> dict[str, bytes]:
    """The members a board's bundle has outside hexiao/: the sim board has none (it is run as
    -m hexiao.firmware.main), a real board its root main.py."""
    return {} if board == "sim" else {"main.py": (ROOT_MAIN % (board, board)).encode()}


def _compile(files: list[tuple[str, Path]], work: Path) -> tuple[dict[str, bytes], str]:
    mpy_cross = micropython.executable("mpy-cross")
    tool = subprocess.run([mpy_cross, "--version"], capture_output=True, text=True, check=True)
    compiled = {}
    for name, py in files:
        target = work / name.replace("/", "_")
        part = PurePosixPath(name).parent.name
        try:  # the same build the tests run (terse: tools/terse.py)
            micropython.compile_device(py, f"hexiao/{part}/{py.name}", target)
        except (RuntimeError, SyntaxError) as exc:
            raise click.ClickException(str(exc)) from exc
        compiled[name] = target.read_bytes()
    return compiled, tool.stdout.strip()


def _built_time() -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    when = dt.datetime.fromtimestamp(int(epoch), dt.UTC) if epoch else dt.datetime.now(dt.UTC)
    return when.replace(microsecond=0).isoformat().replace("+00:00", "Z")


def write_container(path: Path, manifest: bytes, signature: bytes | None,
                    files: dict[str, bytes], mtime: int = 0) -> None:
    """Write the tar atomically (temp file + rename). Public so tests can forge bundles."""
    members = [(MANIFEST, manifest)]
    if signature is not None:
        members.append((SIGNATURE, signature))
    members += sorted(files.items())
    fd, tmp = tempfile.mkstemp(prefix=".bundle-", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # a bundle is public (mkstemp makes 0600)
        with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w",
                                                      format=tarfile.USTAR_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, mtime
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def build_bundle(board: str, version: str, counter: int, key: Ed25519PrivateKey, out: Path,
                 source: Path | None = None) -> Path:
    """Compile, hash, sign and write a bundle; `out` is a directory or the .tar path."""
    if board not in BOARDS:
        raise click.BadParameter(f"unknown board {board!r} (one of {', '.join(BOARDS)})")
    if not _VERSION.match(version):
        raise click.BadParameter(f"version {version!r} is not X.Y.Z")
    if not 0 <= counter < 2**32:
        raise click.BadParameter(f"counter {counter} is not in 0..2**32-1")
    with tempfile.TemporaryDirectory(prefix="hexiao-bundle-") as work:
        files, tool = _compile(device_sources(source, board), Path(work))
    files.update(root_files(board))
    built = _built_time()
    manifest = canonical({
        "format": FORMAT, "board": board, "version": version, "counter": counter,
        "built": built, "mpy_cross": tool,
        "files": {n: {"sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
                  for n, d in files.items()},
    })
    out = Path(out)
    if out.is_dir():
        out = out / f"hexiao-fw-{board}-{version}-c{counter}.tar"
    if not out.parent.is_dir():
        raise click.BadParameter(f"no directory {out.parent} for the bundle")
    mtime = int(dt.datetime.fromisoformat(built).timestamp())
    write_container(out, manifest, key.sign(manifest), files, mtime)
    verify_bundle(read_bundle(out), key.public_key(), board=board)  # never ship a bad one
    return out


def _safe_name(name: str) -> bool:
    p = PurePosixPath(name)
    return (bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name
            and str(p) == name and all(c.isprintable() for c in name))


def read_bundle(path: Path | str) -> Bundle:
    """Read a container into memory; refused("corrupt") if it is not a well-formed one."""
    path = Path(path)
    if not path.exists():
        raise refused("not-found", f"no bundle {path}: give the .tar that `hexiao bundle "
                                   "build` wrote")
    if not path.is_file():
        raise refused("not-found", f"{path} is not a file: give the bundle's .tar itself")
    try:
        if path.stat().st_size > MAX_BUNDLE:
            raise refused("corrupt", f"{path} is larger than any firmware bundle")
        members: dict[str, bytes] = {}
        with path.open("rb") as raw:  # a copy cut at a block boundary still reads as a tar
            if raw.read(512)[257:262] != b"ustar":  # every bundle is a POSIX (ustar) tar
                raise refused("corrupt", f"{path} is not a hexiao firmware bundle (not a tar "
                                         "archive): give the .tar that `hexiao bundle build` "
                                         "wrote")
            size = raw.seek(0, 2)
            raw.seek(max(0, size - 1024))
            if size % 512 or raw.read(1024) != bytes(1024):
                raise refused("corrupt", f"{path} is truncated (no end-of-archive "
                                             "marker): copy the bundle again")
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isreg() or not _safe_name(info.name):
                    raise refused("corrupt", f"{path}: unexpected member {info.name!r}")
                if info.name in members:
                    raise refused("corrupt", f"{path}: member {info.name!r} appears twice")
                f = tar.extractfile(info)
                data = f.read() if f else b""
                if len(data) != info.size:
                    raise refused("corrupt", f"{path}: member {info.name!r} is truncated")
                members[info.name] = data
    except (OSError, tarfile.TarError, EOFError) as e:
        raise refused("corrupt", f"cannot read bundle {path}: {e}") from None
    if MANIFEST not in members:
        raise refused("corrupt", f"{path} has no {MANIFEST}: not a hexiao firmware bundle")
    manifest, signature = members.pop(MANIFEST), members.pop(SIGNATURE, None)
    return Bundle(path, manifest, signature, members)


def _parse(raw: bytes) -> Manifest:
    bad = refused("corrupt", "manifest is signed but malformed (built by another tool?)")
    try:
        m = json.loads(raw)
    except ValueError:
        raise bad from None
    if not isinstance(m, dict) or not isinstance(m.get("format"), int):
        raise bad
    if m["format"] != FORMAT:
        raise refused("corrupt", f"manifest format {m['format']} is not supported "
                                     f"(this hexiao reads format {FORMAT}): upgrade hexiao")
    files = m.get("files")
    ok = (isinstance(m.get("board"), str) and isinstance(m.get("version"), str)
          and type(m.get("counter")) is int and isinstance(m.get("built"), str)
          and isinstance(m.get("mpy_cross"), str) and isinstance(files, dict))
    entries = {}
    for name, e in (files or {}).items():
        if not (_safe_name(name) and isinstance(e, dict) and isinstance(e.get("sha256"), str)
                and _HEX64.match(e["sha256"]) and type(e.get("size")) is int):
            raise bad
        entries[name] = FileEntry(e["sha256"], e["size"])
    if not ok:
        raise bad
    return Manifest(FORMAT, m["board"], m["version"], m["counter"], m["built"], m["mpy_cross"],
                    entries)


def verify_bundle(bundle: Bundle, pubkey: Ed25519PublicKey, board: str | None = None,
                  min_counter: int | None = None) -> Manifest:
    """The verified manifest, or InstallError naming the first refusal: signature, then
    files (missing, extra, tampered), then board, then counter."""
    if bundle.signature is None:
        raise refused("unsigned", f"{bundle.path} is not signed (no {SIGNATURE}); "
                                      "refusing to install an unsigned bundle")
    try:
        pubkey.verify(bundle.signature, bundle.manifest)
    except InvalidSignature:
        raise refused("bad-signature", f"{bundle.path}: the manifest signature does not "
                          f"verify with key {keys.fingerprint(pubkey)} (tampered manifest, "
                          "or signed by another key)") from None
    m = _parse(bundle.manifest)
    missing = sorted(set(m.files) - set(bundle.files))
    if missing:
        raise refused("missing-file", f"{bundle.path}: file {missing[0]} listed in the "
                          f"manifest is missing ({len(missing)} missing)")
    extra = sorted(set(bundle.files) - set(m.files))
    if extra:
        raise refused("extra-file", f"{bundle.path}: file {extra[0]} is not in the signed "
                          f"manifest ({len(extra)} extra)")
    for name, entry in sorted(m.files.items()):
        data = bundle.files[name]
        if len(data) != entry.size:
            raise refused("tampered-file", f"{bundle.path}: {name} is {len(data)} bytes, "
                              f"the signed manifest says {entry.size}")
        if hashlib.sha256(data).hexdigest() != entry.sha256:
            raise refused("tampered-file", f"{bundle.path}: {name} does not match its "
                              "SHA-256 in the signed manifest")
    if board is not None and m.board != board:
        raise refused("wrong-board", f"{bundle.path} is built for board {m.board!r}, "
                          f"not {board!r}")
    if min_counter is not None and m.counter < min_counter:
        raise refused("downgrade", f"{bundle.path}: bundle {m.version} has security counter "
                          f"{m.counter}, below the minimum {min_counter} (a downgrade)")
    return m


def offer_of(path: Path, pubkey: Path | None = None) -> tuple[dict[str, Any], bytes]:
    """(fw_offer, image) of a signed bundle file, as hostd sends it to a device
    (protocol/fw_image.py); checked against `pubkey` first when given. InstallError otherwise:
    the device would refuse it anyway, so say so before anything is sent."""
    from hexiao.protocol import fw_image

    b = read_bundle(path)
    try:
        if pubkey is not None:
            verify_bundle(b, keys.load_public_key(pubkey))
    except keys.KeyFileError as e:
        raise refused("key", f"--pubkey: {e}") from None
    if b.signature is None:
        raise refused("unsigned", f"{path} is not signed: no device takes it")
    try:
        return fw_image.offer(b.manifest, b.signature, b.files)
    except (ValueError, KeyError, TypeError) as e:
        raise refused("corrupt", f"{path} is not a firmware bundle ({e})") from None


def extract(bundle: Bundle, manifest: Manifest, dest: Path) -> list[Path]:
    """Write a verified bundle's files under dest (as on the device); returns their paths."""
    del manifest  # required so only a verified bundle is extracted
    out = []
    for name, data in sorted(bundle.files.items()):
        target = Path(dest, *PurePosixPath(name).parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        out.append(target)
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Build and verify signed firmware bundles."""


@main.command("build")
@click.option("--board", required=True, type=click.Choice(BOARDS))
@click.option("--version", "version", required=True, help="Firmware version X.Y.Z.")
@click.option("--counter", required=True, type=click.IntRange(0, 2**32 - 1),
              help="Security counter: raise it to stop devices accepting older bundles.")
@click.option("--key", "key_path", required=True, type=click.Path(path_type=Path),
              help="Signing key (from hexiao keys generate).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Directory for the bundle, or the bundle file path.")
@click.option("--source", type=click.Path(file_okay=False, exists=True, path_type=Path),
              help="Tree with protocol/ and firmware/ (default: the installed hexiao).")
def build_cmd(board: str, version: str, counter: int, key_path: Path, out: Path,
              source: Path | None) -> None:
    """Compile the device firmware with mpy-cross and write a signed bundle."""
    try:
        key = keys.load_private_key(key_path)
    except keys.KeyFileError as e:
        click.echo(f"Error: key: {e}", err=True)
        raise SystemExit(EXIT_CODES["key"]) from None
    path = build_bundle(board, version, counter, key, out, source)
    m = verify_bundle(read_bundle(path), key.public_key())
    click.echo(f"built {path}: {board} {version} counter {m.counter}, {len(m.files)} files, "
               f"signed by {keys.fingerprint(key.public_key())}")


@main.command("verify")
@click.argument("bundle_path", metavar="BUNDLE", type=click.Path(path_type=Path))
@click.option("--pubkey", required=True, type=click.Path(path_type=Path),
              help="Public key the bundle must be signed with (KEY.pub).")
@click.option("--board", type=click.Choice(BOARDS), help="Refuse a bundle for another board.")
@click.option("--min-counter", type=click.IntRange(0), help="Refuse a lower security counter.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON result object.")
def verify_cmd(bundle_path: Path, pubkey: Path, board: str | None, min_counter: int | None,
               as_json: bool) -> None:
    """Check a bundle's signature, files, board and counter; exit code says why it failed."""
    result: dict[str, object] = {"bundle": str(bundle_path), "ok": False}
    try:
        try:
            public = keys.load_public_key(pubkey)
        except keys.KeyFileError as e:
            raise refused("key", str(e)) from None
        m = verify_bundle(read_bundle(bundle_path), public, board, min_counter)
    except InstallError as e:
        result.update(kind=e.kind, message=e.message, exit_code=e.exit_code)
        click.echo(canonical(result).decode() if as_json else f"Error: {e.kind}: {e.message}",
                   err=not as_json)
        raise SystemExit(e.exit_code) from None
    result.update(ok=True, board=m.board, version=m.version, counter=m.counter, built=m.built,
                  files=len(m.files), key=keys.fingerprint(public))
    click.echo(canonical(result).decode() if as_json else
               f"ok: {bundle_path} {m.board} {m.version} counter {m.counter}, "
               f"{len(m.files)} files, signed by {keys.fingerprint(public)}")


if __name__ == "__main__":
    main()
