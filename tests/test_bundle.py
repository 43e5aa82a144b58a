"""Signed firmware bundles and signing keys: real mpy-cross builds, real MicroPython runs, and
one test per refusal with its exit code and message."""

from __future__ import annotations

import base64
import binascii
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from hexiao.tools import micropython
from hexiao.tools.install import bundle as B
from hexiao.tools.install import keys

VERSION, COUNTER = "1.4.2", 7
DEVICE_FILES = {
    "hexiao/protocol/__init__.mpy", "hexiao/protocol/cbor.mpy", "hexiao/protocol/cobs.mpy",
    "hexiao/protocol/cose.mpy", "hexiao/protocol/crypto.mpy",
    "hexiao/protocol/errors.mpy", "hexiao/protocol/frame.mpy", "hexiao/protocol/link.mpy",
    "hexiao/protocol/link_device.mpy", "hexiao/protocol/messages.mpy",
    "hexiao/protocol/replay.mpy", "hexiao/firmware/__init__.mpy",
    "hexiao/firmware/cdc_link.mpy", "hexiao/firmware/linkpeer.mpy",
    "hexiao/firmware/app.mpy", "hexiao/firmware/main.mpy", "hexiao/firmware/hal_sim.mpy",
    "hexiao/firmware/install_check.mpy", "hexiao/firmware/safe.mpy",
    "hexiao/firmware/boot.mpy",
    # updates over the link (SPEC 6.8): the device's verifier, its boot side, a stable run's end
    "hexiao/firmware/ed25519.mpy", "hexiao/firmware/fw_update.mpy",
    "hexiao/firmware/stable.mpy", "hexiao/firmware/stable_end.mpy",
    "hexiao/firmware/fw_trial.mpy", "hexiao/firmware/repl_off.mpy",
    "hexiao/protocol/messages_fw.mpy",
} | {  # the application, in however many modules it is split (app.py, app_*.py)
    f"hexiao/firmware/{p.stem}.mpy"
    for p in (Path(__file__).resolve().parents[1] / "firmware").glob("app*.py")
}  # the sim board: its own HAL and entry point only (no hal_rp2040, hal_usb, board_main)


def run(cmd, *args: str):
    return CliRunner().invoke(cmd, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("bundle")
    outputs = [run(keys.main, "generate", "--out", d / "sign.key"),
               run(keys.main, "generate", "--out", d / "other.key")]
    res = run(B.main, "build", "--board", "sim", "--version", VERSION, "--counter", COUNTER,
              "--key", d / "sign.key", "--out", d)
    assert res.exit_code == 0, res.output
    outputs.append(res)
    path = d / f"hexiao-fw-sim-{VERSION}-c{COUNTER}.tar"
    want = f"built {path}: sim {VERSION} counter {COUNTER}, {len(DEVICE_FILES)} files"
    assert res.output.startswith(want)
    return {"dir": d, "path": path, "key": d / "sign.key", "pub": d / "sign.key.pub",
            "other_pub": d / "other.key.pub", "outputs": outputs}


def verify(built: dict, path: Path, *extra: str):
    return run(B.main, "verify", path, "--pubkey", built["pub"], *extra)


def forge(built: dict, tmp_path: Path, manifest: bytes | None = None, sig: bytes | None = b"",
          files: dict[str, bytes] | None = None) -> Path:
    """A copy of the good bundle with parts replaced (sig=None drops the signature)."""
    good = B.read_bundle(built["path"])
    out = tmp_path / "forged.tar"
    B.write_container(out, good.manifest if manifest is None else manifest,
                      good.signature if sig == b"" else sig,
                      dict(good.files) if files is None else files)
    return out


def test_build_lays_out_the_device_modules_and_a_canonical_signed_manifest(built) -> None:
    b = B.read_bundle(built["path"])
    assert set(b.files) == DEVICE_FILES  # host-only modules (codec_fast, bench_device...) left out
    m = json.loads(b.manifest)
    assert b.manifest == json.dumps(m, sort_keys=True, separators=(",", ":")).encode()
    assert (m["format"], m["board"], m["version"], m["counter"]) == (1, "sim", VERSION, COUNTER)
    assert m["built"].endswith("Z") and "mpy v6" in m["mpy_cross"]
    assert all(b.files[n][:1] == b"M" for n in DEVICE_FILES)  # the .mpy magic
    assert len(b.signature) == 64
    with tarfile.open(built["path"]) as tar:
        assert tar.getnames()[:2] == ["manifest.json", "manifest.sig"]


def test_verify_passes_with_json_result(built) -> None:
    res = verify(built, built["path"], "--board", "sim", "--min-counter", COUNTER, "--json")
    assert res.exit_code == 0
    out = json.loads(res.output)
    fp = keys.fingerprint(keys.load_public_key(built["pub"]))
    assert out == {"ok": True, "bundle": str(built["path"]), "board": "sim", "version": VERSION,
                   "counter": COUNTER, "built": out["built"], "files": len(DEVICE_FILES),
                   "key": fp}


def test_built_mpy_files_import_and_run_under_micropython(built, tmp_path: Path) -> None:
    b = B.read_bundle(built["path"])
    m = B.verify_bundle(b, keys.load_public_key(built["pub"]))
    B.extract(b, m, tmp_path)
    assert not list(tmp_path.rglob("*.py"))  # only the bundle's compiled modules are there
    code = ("import hexiao.protocol.frame as f; import hexiao.protocol.link; "
            "print(f.crc32_le(b'abc'))")
    r = subprocess.run(
        [micropython.executable("micropython"), "-X", f"heapsize={micropython.HEAP}", "-c", code],
        env={"MICROPYPATH": f"{tmp_path}:.frozen", "PATH": "/usr/bin:/bin"}, cwd=tmp_path,
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == repr((binascii.crc32(b"abc")).to_bytes(4, "little"))


def test_unsigned(built, tmp_path: Path) -> None:
    res = verify(built, forge(built, tmp_path, sig=None))
    assert res.exit_code == 11
    assert "Error: unsigned: " in res.output and "is not signed (no manifest.sig)" in res.output


def test_signed_by_another_key(built, tmp_path: Path) -> None:
    res = run(B.main, "verify", built["path"], "--pubkey", built["other_pub"], "--json")
    assert res.exit_code == 12
    out = json.loads(res.output)
    fp = keys.fingerprint(keys.load_public_key(built["other_pub"]))
    assert out["ok"] is False and out["kind"] == "bad-signature" and out["exit_code"] == 12
    assert out["message"] == (f"{built['path']}: the manifest signature does not verify with key "
                              f"{fp} (tampered manifest, or signed by another key)")


def _edit(m: dict, field: str) -> None:
    name = "hexiao/protocol/frame.mpy"
    if field == "board":
        m["board"] = "rp2040"
    elif field == "version":
        m["version"] = "9.9.9"
    elif field == "counter":
        m["counter"] = COUNTER + 1
    elif field == "sha256":
        m["files"][name]["sha256"] = "0" * 64
    else:
        m["files"][name]["size"] += 1


@pytest.mark.parametrize("field", ["board", "version", "counter", "sha256", "size"])
def test_tampered_manifest_field(built, tmp_path: Path, field: str) -> None:
    m = json.loads(B.read_bundle(built["path"]).manifest)
    _edit(m, field)
    res = verify(built, forge(built, tmp_path, manifest=B.canonical(m)))
    assert res.exit_code == 12
    assert "Error: bad-signature: " in res.output
    assert "the manifest signature does not verify" in res.output


def test_tampered_file_byte(built, tmp_path: Path) -> None:
    files = dict(B.read_bundle(built["path"]).files)
    data = bytearray(files["hexiao/protocol/link.mpy"])
    data[len(data) // 2] ^= 0x01
    files["hexiao/protocol/link.mpy"] = bytes(data)
    res = verify(built, forge(built, tmp_path, files=files))
    assert res.exit_code == 13
    assert res.output.strip() == (f"Error: tampered-file: {tmp_path / 'forged.tar'}: "
                                  "hexiao/protocol/link.mpy does not match its SHA-256 in the "
                                  "signed manifest")


def test_file_of_another_size(built, tmp_path: Path) -> None:
    files = dict(B.read_bundle(built["path"]).files)
    size = len(files["hexiao/protocol/cbor.mpy"])
    files["hexiao/protocol/cbor.mpy"] += b"\x00"
    res = verify(built, forge(built, tmp_path, files=files))
    assert res.exit_code == 13
    assert (f"hexiao/protocol/cbor.mpy is {size + 1} bytes, the signed manifest says {size}"
            in res.output)


def test_missing_file(built, tmp_path: Path) -> None:
    files = dict(B.read_bundle(built["path"]).files)
    del files["hexiao/firmware/linkpeer.mpy"]
    res = verify(built, forge(built, tmp_path, files=files))
    assert res.exit_code == 14
    assert ("Error: missing-file: " in res.output and "file hexiao/firmware/linkpeer.mpy "
            "listed in the manifest is missing (1 missing)" in res.output)


def test_extra_file(built, tmp_path: Path) -> None:
    files = dict(B.read_bundle(built["path"]).files)
    files["boot.py"] = b"import evil\n"
    res = verify(built, forge(built, tmp_path, files=files))
    assert res.exit_code == 15
    assert "Error: extra-file: " in res.output
    assert "file boot.py is not in the signed manifest (1 extra)" in res.output


def test_wrong_board(built, tmp_path: Path) -> None:
    res = run(B.main, "build", "--board", "rp2040", "--version", VERSION, "--counter", COUNTER,
              "--key", built["key"], "--out", tmp_path / "rp.tar")
    assert res.exit_code == 0, res.output
    res = verify(built, tmp_path / "rp.tar", "--board", "sim")
    assert res.exit_code == 16
    assert res.output.strip() == (f"Error: wrong-board: {tmp_path / 'rp.tar'} is built for "
                                  "board 'rp2040', not 'sim'")
    assert verify(built, tmp_path / "rp.tar", "--board", "rp2040").exit_code == 0


def test_downgrade(built) -> None:
    res = verify(built, built["path"], "--min-counter", COUNTER + 1)
    assert res.exit_code == 17
    assert res.output.strip() == (f"Error: downgrade: {built['path']}: bundle {VERSION} has "
                                  f"security counter {COUNTER}, below the minimum {COUNTER + 1} "
                                  "(a downgrade)")


def test_truncated_and_corrupt_containers(built, tmp_path: Path) -> None:
    raw = built["path"].read_bytes()
    cases = {"truncated.tar": raw[: len(raw) // 2], "garbage.tar": os.urandom(4096),
             "empty.tar": b""}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        res = verify(built, tmp_path / name)
        assert res.exit_code == 10, (name, res.output)
        assert "Error: corrupt: " in res.output, name
    # a missing bundle, a folder, and a file that is no tar at all: each says what it is
    res = verify(built, tmp_path / "absent.tar")
    assert (res.exit_code, res.output.strip()) == (19, f"Error: not-found: no bundle "
                                                       f"{tmp_path / 'absent.tar'}: give the .tar "
                                                       "that `hexiao bundle build` wrote")
    res = verify(built, tmp_path)
    assert res.exit_code == 19 and "is not a file: give the bundle's .tar itself" in res.output
    (tmp_path / "hostd.toml").write_text("[hostd]\n" * 200)
    res = verify(built, tmp_path / "hostd.toml")
    assert res.exit_code == 10 and "is not a hexiao firmware bundle (not a tar archive)" \
        in res.output and "no end-of-archive" not in res.output
    # a well-formed tar that is not a bundle, and one with a path escaping the install dir
    files = dict(B.read_bundle(built["path"]).files)
    with tarfile.open(tmp_path / "plain.tar", "w") as tar:
        tar.add(built["pub"], arcname="hexiao/x.mpy")
    assert "has no manifest.json: not a hexiao firmware bundle" in verify(
        built, tmp_path / "plain.tar").output
    files["../boot.py"] = b"x"
    res = verify(built, forge(built, tmp_path, files=files))
    assert res.exit_code == 10 and "unexpected member '../boot.py'" in res.output


def test_signed_but_malformed_manifest_is_corrupt(built, tmp_path: Path) -> None:
    key = keys.load_private_key(built["key"])
    for manifest in (b"not json", B.canonical({"format": 1, "board": "sim"})):
        res = verify(built, forge(built, tmp_path, manifest=manifest, sig=key.sign(manifest)))
        assert res.exit_code == 10
        assert "manifest is signed but malformed" in res.output
    future = B.canonical({"format": 2})
    res = verify(built, forge(built, tmp_path, manifest=future, sig=key.sign(future)))
    assert "manifest format 2 is not supported (this hexiao reads format 1)" in res.output


def test_key_files_are_created_0600_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        res = run(keys.main, "generate", "--out", tmp_path / "k")
    finally:
        os.umask(old)
    assert res.exit_code == 0, res.output
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "k.pub").st_mode) == 0o644
    first = (tmp_path / "k").read_bytes()
    res = run(keys.main, "generate", "--out", tmp_path / "k")
    assert res.exit_code == 1
    assert f"{tmp_path / 'k'} already exists; refusing to overwrite (use --force)" in res.output
    assert (tmp_path / "k").read_bytes() == first
    # --force makes a new file (new inode, mode 0600) even where the old one was readable
    os.chmod(tmp_path / "k", 0o644)
    assert run(keys.main, "generate", "--out", tmp_path / "k", "--force").exit_code == 0
    assert stat.S_IMODE(os.stat(tmp_path / "k").st_mode) == 0o600
    assert (tmp_path / "k").read_bytes() != first


def test_readable_private_key_is_refused(built, tmp_path: Path) -> None:
    k = tmp_path / "k"
    run(keys.main, "generate", "--out", k)
    os.chmod(k, 0o644)
    msg = (f"signing key {k} is accessible by other users (mode 0644); refusing to use it. "
           f"Run: chmod 600 {k}")
    res = run(keys.main, "show", k)
    assert res.exit_code == 1 and msg in res.output
    res = run(B.main, "build", "--board", "sim", "--version", "1.0.0", "--counter", 1,
              "--key", k, "--out", tmp_path)
    assert res.exit_code == 18 and msg in res.output
    assert not list(tmp_path.glob("*.tar"))


def test_show_prints_the_fingerprint_and_no_private_key(built) -> None:
    key = keys.load_private_key(built["key"])
    fp = keys.fingerprint(key.public_key())
    res = run(keys.main, "show", built["key"])
    assert res.exit_code == 0 and res.output == f"{fp}  ed25519 signing key {built['key']}\n"
    assert json.loads(run(keys.main, "show", built["pub"], "--json").output)["fingerprint"] == fp
    public_pem = built["pub"].read_bytes().decode()
    assert public_pem.startswith("-----BEGIN PUBLIC KEY-----")


def test_no_private_key_material_in_any_output(built, tmp_path: Path) -> None:
    outputs = [*built["outputs"],
               run(keys.main, "show", built["key"]),
               run(keys.main, "show", built["key"], "--json"),
               verify(built, built["path"], "--json"),
               run(B.main, "verify", built["path"], "--pubkey", built["key"])]
    assert "holds a private key; pass the public key" in outputs[-1].output
    for name in ("sign.key", "other.key"):
        key = keys.load_private_key(built["dir"] / name)
        seed = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
        pem_lines = (built["dir"] / name).read_text().splitlines()[1:-1]
        secrets = [seed.hex(), seed.hex().upper(), base64.b64encode(seed).decode(), *pem_lines]
        for res in outputs:
            text = res.output + (res.stderr if res.stderr_bytes is not None else "")
            assert "PRIVATE KEY" not in text
            for s in secrets:
                assert s not in text


def test_key_file_is_never_written_into_an_existing_file(tmp_path: Path) -> None:
    # the O_EXCL guard for a file that appears between the existence check and the write
    (tmp_path / "k").write_bytes(b"")
    os.chmod(tmp_path / "k", 0o644)
    with pytest.raises(FileExistsError):
        keys._create(tmp_path / "k", b"secret", 0o600)
    assert (tmp_path / "k").read_bytes() == b""


def test_each_board_gets_its_own_hal_only() -> None:
    names = {b: {n.rsplit("/", 1)[1] for n, _ in B.device_sources(board=b)} for b in B.BOARDS}
    assert {"hal_rp2040.mpy", "hal_usb.mpy"} <= names["rp2040"]
    assert {"hal_esp32s3.mpy", "hal_rp2040.mpy", "hal_usb.mpy"} <= names["esp32s3"]
    for board in ("rp2040", "esp32s3"):  # the board's entry point, not the sim's
        assert "board_main.mpy" in names[board] and "main.mpy" not in names[board]
        root = B.root_files(board)
        assert list(root) == ["main.py"]
        assert root["main.py"].startswith(f"# hexiao firmware {board}: the board runs this at "
                                          f"boot; see hexiao/firmware/board_main\n".encode())
        assert root["main.py"].endswith(f"from hexiao.firmware.board_main import main\n\n"
                                        f"main({board!r})\n".encode())
    assert "board_main.mpy" not in names["sim"] and B.root_files("sim") == {}
    assert "hal_sim.mpy" in names["sim"] and "linkpeer.mpy" in names["sim"]
    assert not names["sim"] & {"hal_rp2040.mpy", "hal_esp32s3.mpy", "hal_usb.mpy"}
    assert not names["rp2040"] & {"hal_sim.mpy", "hal_esp32s3.mpy", "linkpeer.mpy"}
    assert all("app.mpy" in n and "link.mpy" in n for n in names.values())


def test_a_directory_given_as_a_key_is_one_line_not_a_traceback(built, tmp_path: Path) -> None:
    folder = tmp_path / "keys"
    folder.mkdir(mode=0o700)
    build = run(B.main, "build", "--board", "sim", "--version", "1.0.0", "--counter", "1",
                "--key", folder, "--out", tmp_path)
    check = run(B.main, "verify", built["path"], "--pubkey", folder)
    for res in (build, check):
        assert res.exit_code == 18, res.output
        assert res.output.strip() == (f"Error: key: key file {folder} is a directory: give the "
                                      "key file itself (make one with: hexiao keys generate "
                                      "--out PATH)")
        assert "Traceback" not in res.output
