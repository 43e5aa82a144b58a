"""The golden vectors (protocol/vectors/*.json) against the implementation on CPython, against
independent implementations (pycose, cbor2 + hmac, the `cobs` package + zlib, cryptography's
HKDF), and on MicroPython. The files are never regenerated here: they are checked to be up to date.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import subprocess
import zlib
from pathlib import Path
from typing import Any

import cbor2
import pycddl
import pytest
from cobs import cobs as cobs_c
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hexiao.protocol import cose, crypto, errors, frame, link, messages
from hexiao.protocol.errors import ProtocolError
from hexiao.tools import gen_vectors, micropython
from pycose.headers import KID, Algorithm, PartialIV
from pycose.keys import SymmetricKey
from pycose.messages import Mac0Message

RUNNER = Path(__file__).resolve().parent / "mpy" / "vectors_runner.py"
TAG_LEN = {5: 32, 4: 8}
FRAME_KEYS = {"name", "description", "kind", "key", "alg", "external_aad", "cose", "wire",
              "message", "valid"}
KDF_KEYS = {"name", "description", "kind", "device_key", "host_nonce", "device_nonce", "d2h_key",
            "h2d_key"}


def _load() -> dict[str, list[dict[str, Any]]]:
    return {p.name: json.loads(p.read_text(encoding="utf-8"))["vectors"]
            for p in sorted(gen_vectors.VECTORS_DIR.glob("*.json"))}


FILES = _load()
ALL = [v for vs in FILES.values() for v in vs]
FRAMES = [v for v in ALL if v["kind"] == "frame"]
VALID = [v for v in FRAMES if v["valid"]]
INVALID = [v for v in FRAMES if not v["valid"]]
KDFS = [v for v in ALL if v["kind"] == "kdf"]
SESSION = next(v for v in KDFS if v["name"] == "kdf_session")
h = bytes.fromhex


def ids(vs: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vs]


def to_json(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, list):
        return [to_json(x) for x in v]
    if isinstance(v, dict):
        return {str(k): to_json(x) for k, x in v.items()}
    return v


def frame_problem(v: dict[str, Any]) -> str | None:
    """What is wrong with a frame vector against the implementation (None: nothing). The
    MicroPython runner makes the same checks."""
    key, alg, aad, c, wire = h(v["key"]), v["alg"], h(v["external_aad"]), h(v["cose"]), h(v["wire"])
    try:
        m, msg = link.verify_frame(wire, key, alg, aad, v.get("context", {}).get("seen", ()))
    except ProtocolError as e:
        if v["valid"]:
            return f"rejected with {e.code}: {e.detail}"
        if e.code != v["error"]:
            return f"error {e.code} ({e.detail}), the vector says {v['error']}"
        if v["message"] is not None:
            got = to_json(messages.decode(cose.parse(c).payload))
            if got != v["message"]:
                return f"payload decodes to {got}, the vector says {v['message']}"
        return None
    if not v["valid"]:
        return f"accepted, the vector says {v['error']}"
    if to_json(msg) != v["message"]:
        return f"message {to_json(msg)}, the vector says {v['message']}"
    if frame.decode(wire[:-1]) != c:
        return "the wire does not frame the vector's cose"
    again = cose.mac0(key, alg, m.kid, m.counter, messages.encode(msg), aad)
    if again != c:
        return "re-encoding the message does not give the vector's cose"
    if frame.encode(again) != wire:
        return "re-framing the cose does not give the vector's wire"
    return None


def kdf_problem(v: dict[str, Any]) -> str | None:
    got = crypto.session_keys(h(v["device_key"]), h(v["host_nonce"]), h(v["device_nonce"]))
    want = (h(v["d2h_key"]), h(v["h2d_key"]))
    return None if got == want else f"session keys {got[0].hex()}, {got[1].hex()}"


# -- the files ------------------------------------------------------------------------------

def test_files_are_up_to_date() -> None:
    assert gen_vectors.check() == [], "run: python -m hexiao.tools.gen_vectors"


def test_check_notices_a_changed_file(tmp_path: Path) -> None:
    gen_vectors.write(tmp_path)
    assert gen_vectors.check(tmp_path) == []
    p = tmp_path / "kdf.json"
    p.write_text(p.read_text(encoding="utf-8").replace('"kdf_all_ff"', '"kdf_all_fF"'),
                 encoding="utf-8")
    (tmp_path / "extra.json").write_text('{"vectors": []}\n', encoding="utf-8")
    (tmp_path / "errors.json").unlink()
    assert gen_vectors.check(tmp_path) == ["errors.json", "extra.json", "kdf.json"]
    assert gen_vectors.main(["--check", "--dir", str(tmp_path)]) == 1
    assert gen_vectors.main(["--dir", str(tmp_path)]) == 0
    assert gen_vectors.main(["--check", "--dir", str(tmp_path)]) == 0
    assert not (tmp_path / "extra.json").exists()


def test_one_vector_per_line_and_small_lines() -> None:
    # the MicroPython runner streams a file line by line: the layout is part of the format
    for name, vectors in FILES.items():
        lines = (gen_vectors.VECTORS_DIR / name).read_text(encoding="utf-8").splitlines()
        assert lines[0] == '{"vectors": [' and lines[-1] == "]}"
        assert len(lines) == len(vectors) + 2
        for line, v in zip(lines[1:-1], vectors, strict=True):
            assert json.loads(line.removesuffix(",")) == v
            assert len(line.encode()) < 8192, f"{v['name']}: too long for a device-sized reader"


def test_vector_fields() -> None:
    names = [v["name"] for v in ALL]
    assert len(names) == len(set(names))
    codes = {n for n, _ in errors.CODES}
    for v in FRAMES:
        extra = set(v) - FRAME_KEYS
        assert extra <= {"error", "context"}, v["name"]
        assert set(v) >= FRAME_KEYS, v["name"]
        assert v["alg"] in (4, 5) and isinstance(v["valid"], bool)
        assert ("error" in v) == (not v["valid"]), v["name"]
        if not v["valid"]:
            assert v["error"] in codes
            # a message only where the payload was decoded before the frame was refused
            assert (v["message"] is not None) == (v["error"] in gen_vectors.AFTER_DECODE)
        for k in ("key", "external_aad", "cose", "wire"):
            assert h(v[k]).hex() == v[k], (v["name"], k)  # lower-case hex, whole bytes
        if "context" in v:
            assert set(v["context"]) == {"seen"}
    for v in KDFS:
        assert set(v) == KDF_KEYS
        sizes = {"device_key": 32, "host_nonce": 16, "device_nonce": 16, "d2h_key": 32,
                 "h2d_key": 32}
        assert {k: len(h(v[k])) for k in sizes} == sizes, v["name"]


# -- against the implementation ---------------------------------------------------------------

@pytest.mark.parametrize("v", FRAMES, ids=ids(FRAMES))
def test_frame_vector(v: dict[str, Any]) -> None:
    assert frame_problem(v) is None


@pytest.mark.parametrize("v", INVALID, ids=ids(INVALID))
def test_invalid_wire_frames_its_cose(v: dict[str, Any]) -> None:
    # whenever an invalid vector's wire deframes at all, it deframes to the vector's cose
    wire = h(v["wire"])
    if not wire.endswith(b"\x00") or wire.count(0) != 1:
        assert v["error"] in ("truncated", "cobs")
        return
    try:
        c = frame.decode(wire[:-1])
    except ProtocolError as e:
        assert e.code == v["error"]
        return
    assert c == h(v["cose"])


@pytest.mark.parametrize("v", KDFS, ids=ids(KDFS))
def test_kdf_vector(v: dict[str, Any]) -> None:
    assert kdf_problem(v) is None


def _mutations() -> list[tuple[str, dict[str, Any]]]:
    # vectors made wrong on purpose: each checker must notice every one
    by = {v["name"]: v for v in ALL}
    out = []
    v = copy.deepcopy(by["scan_qr_gb18030"])
    v["message"]["scan_id"] += 1
    out.append(("message changed", v))
    v = copy.deepcopy(by["bad_crc"])
    v["error"] = "cobs"
    out.append(("error changed", v))
    v = copy.deepcopy(by["mac_tampered_tag"])
    v["valid"], v["message"] = True, None
    del v["error"]
    out.append(("invalid called valid", v))
    v = copy.deepcopy(by["keys"])
    v["valid"], v["error"] = False, "mac"
    out.append(("valid called invalid", v))
    v = copy.deepcopy(by["ping_h2d"])
    v["cose"] = v["cose"][:-2] + "00"
    out.append(("cose not the wire's", v))
    v = copy.deepcopy(by["version_hello_2"])
    v["message"]["board"] = "esp32s3"
    out.append(("decoded message of an invalid vector changed", v))
    v = copy.deepcopy(by["replay_duplicate"])
    v["context"]["seen"] = [4]
    out.append(("context changed", v))
    v = copy.deepcopy(by["kdf_all_ff"])
    v["h2d_key"] = v["h2d_key"][:-2] + "00"
    out.append(("kdf key changed", v))
    return out


@pytest.mark.parametrize("why,v", _mutations(), ids=[m[0] for m in _mutations()])
def test_checkers_notice_wrong_vectors(why: str, v: dict[str, Any]) -> None:
    assert (kdf_problem(v) if v["kind"] == "kdf" else frame_problem(v)) is not None


# -- against independent implementations ------------------------------------------------------

def _pycose(v: dict[str, Any]) -> Mac0Message:
    # pycose 1.1's CoseMessage.decode() fails under cbor2 6, which decodes a tag's content as an
    # immutable tuple (and frozendict): strip tag 17 here and let pycose take the array from there
    c = h(v["cose"])
    assert c[0] == 0xD1  # tag 17
    msg = Mac0Message.from_cose_obj(cbor2.loads(c[1:]), True)
    msg.key = SymmetricKey(k=h(v["key"]))
    msg.external_aad = h(v["external_aad"])
    return msg


@pytest.mark.parametrize("v", VALID, ids=ids(VALID))
def test_pycose_verifies_valid_frames(v: dict[str, Any]) -> None:
    # pycose supports both algs: 5 (HMAC 256/256) and 4 (HMAC 256/64)
    msg = _pycose(v)
    assert msg.verify_tag()
    assert msg.get_attr(Algorithm).identifier == v["alg"]
    m = cose.parse(h(v["cose"]))
    assert msg.get_attr(KID) == m.kid
    assert int.from_bytes(msg.get_attr(PartialIV), "big") == m.counter
    assert msg.payload == m.payload and msg.uhdr == {}


MAC_FAILURES = [v for v in INVALID if v["error"] == "mac"]


@pytest.mark.parametrize("v", MAC_FAILURES, ids=ids(MAC_FAILURES))
def test_pycose_rejects_forged_frames(v: dict[str, Any]) -> None:
    assert not _pycose(v).verify_tag()


def _independent_tag(v: dict[str, Any]) -> tuple[bytes, bytes]:
    # (tag in the frame, tag computed here): cbor2 + hmac, nothing from hexiao
    item = cbor2.loads(h(v["cose"]))
    assert isinstance(item, cbor2.CBORTag) and item.tag == 17
    prot, unprot, payload, tag = item.value
    assert unprot == {} and len(tag) == TAG_LEN[cbor2.loads(prot)[1]]
    structure = cbor2.dumps(["MAC0", prot, h(v["external_aad"]), payload])
    return tag, hmac.new(h(v["key"]), structure, hashlib.sha256).digest()[: len(tag)]


@pytest.mark.parametrize("v", VALID + MAC_FAILURES, ids=ids(VALID + MAC_FAILURES))
def test_independent_mac(v: dict[str, Any]) -> None:
    tag, want = _independent_tag(v)
    assert hmac.compare_digest(tag, want) == v["valid"]


@pytest.mark.parametrize("v", VALID, ids=ids(VALID))
def test_independent_framing_and_cbor(v: dict[str, Any]) -> None:
    c = h(v["cose"])
    assert h(v["wire"]) == cobs_c.encode(c + zlib.crc32(c).to_bytes(4, "little")) + b"\x00"
    assert len(c) + 4 <= frame.MAX_FRAME
    item = cbor2.loads(c)
    assert cbor2.dumps(item, canonical=True) == c  # deterministic encoding, checked by cbor2
    payload = item.value[2]
    wire_map = cbor2.loads(payload)
    assert cbor2.dumps(wire_map, canonical=True) == payload
    assert wire_map[0] == messages.NUMBER[v["message"]["type"]]


CDDL = Path(gen_vectors.VECTORS_DIR).parent / "hexiao-v1.cddl"
# what pycddl 0.6.4 does not check (see the negative test below)
CDDL_BLIND = {"schema_not_a_map": "pycddl accepts an array against a choice of map rules"}


def _cddl(root: str) -> pycddl.Schema:
    return pycddl.Schema(f"root = {root}\n" + CDDL.read_text(encoding="utf-8"))


@pytest.mark.parametrize("v", VALID, ids=ids(VALID))
def test_valid_payloads_match_the_cddl(v: dict[str, Any]) -> None:
    _cddl("message").validate_cbor(cose.parse(h(v["cose"])).payload)


SCHEMA_FAILURES = [v for v in INVALID if v["error"] in ("schema", "unknown_type")
                   and v["name"] not in CDDL_BLIND]


@pytest.mark.parametrize("v", SCHEMA_FAILURES, ids=ids(SCHEMA_FAILURES))
def test_cddl_rejects_schema_failures(v: dict[str, Any]) -> None:
    payload = cose.parse(h(v["cose"])).payload
    num = cbor2.loads(payload).get(0)
    # against the type's own rule: pycddl 0.6.4 lets a map pass a choice (`message`) with a key
    # that only another alternative defines
    rule = messages.TYPES[num][0] if v["error"] == "schema" else "message"
    with pytest.raises(pycddl.ValidationError):
        _cddl(rule).validate_cbor(payload)


@pytest.mark.parametrize("v", KDFS, ids=ids(KDFS))
def test_kdf_vector_independent(v: dict[str, Any]) -> None:
    salt = h(v["host_nonce"]) + h(v["device_nonce"])
    for info, k in ((b"hexiao/1 d2h", "d2h_key"), (b"hexiao/1 h2d", "h2d_key")):
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info)
        assert hkdf.derive(h(v["device_key"])) == h(v[k])


# -- coverage of the protocol -----------------------------------------------------------------

def _direction(v: dict[str, Any]) -> str:
    return {SESSION["d2h_key"]: "d2h", SESSION["h2d_key"]: "h2d",
            SESSION["device_key"]: "handshake"}[v["key"]]


def test_valid_vectors_cover_every_message_type_and_direction() -> None:
    seen = set()
    for v in VALID:
        t = v["message"]["type"]
        _, direction, epoch, _ = messages.info(t)
        counter = cose.parse(h(v["cose"])).counter
        d = _direction(v)
        assert (counter == 0) == (d == "handshake"), v["name"]
        if d != "handshake":
            assert direction in (d, messages.BOTH), f"{v['name']}: {t} under the {d} key"
            assert epoch != messages.HANDSHAKE
        seen.add((t, d))
    for num, (name, direction, epoch, _, _) in messages.TYPES.items():
        dirs = {d for t, d in seen if t == name}
        assert dirs, f"no valid vector of type {num} {name}"
        if direction == messages.BOTH:
            assert {"d2h", "h2d"} <= dirs, f"{name} not in both directions"
        if epoch == messages.HANDSHAKE:
            assert dirs == {"handshake"}


def test_valid_vectors_cover_the_profile() -> None:
    assert {v["alg"] for v in VALID} == {4, 5}
    assert any(v["external_aad"] for v in VALID)
    assert any(v.get("context") for v in VALID)
    counters = {len(cose.piv_bytes(cose.parse(h(v["cose"])).counter)) for v in VALID}
    assert counters == {1, 2, 3, 4}
    # every valid v1 message fits a frame: the largest (rules at its limits) still fills most
    assert max(len(h(v["cose"])) for v in VALID) + 4 > frame.MAX_FRAME * 3 // 4
    scans = [h(v["message"]["data"]) for v in VALID if v["message"]["type"] == "scan"]
    gb = [d for d in scans if not _is_utf8(d) and "核销" in d.decode("gb18030", "replace")]
    assert gb, "no scan with a GB18030 payload"
    texts = [v["message"]["text"] for v in VALID if v["message"]["type"] == "verdict"]
    assert any("\u4e00" <= ch <= "\u9fff" for t in texts for ch in t), "no Chinese verdict"


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def test_invalid_vectors_cover_every_error_class() -> None:
    # kid and rejected need a receiver's state or application: verify_frame never raises them
    want = {n for n, _ in errors.CODES} - {"kid", "rejected"}
    assert {v["error"] for v in INVALID} == want


def test_empty_protected_header_is_a_header_error() -> None:
    # RFC 9052 §3: a zero-length protected bstr is how COSE writes "no protected parameters". The
    # frame is complete and its CRC good: missing alg, kid and partial IV make it `header`, not
    # `truncated` (a line-noise class in the counters). Add the vector when this passes.
    payload = messages.encode(gen_vectors.BASE_SCAN)
    c = gen_vectors._raw_cose(gen_vectors.D2H_KEY, b"", payload)
    with pytest.raises(ProtocolError) as e:
        link.verify_frame(gen_vectors.framed(c), gen_vectors.D2H_KEY, 5)
    assert e.value.code == "header", e.value.detail


# -- MicroPython ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runner(mpy_stage: Path) -> str:
    """The runner compiled with mpy-cross into the staged tree: no compiling in the device heap."""
    subprocess.run(
        [micropython.executable("mpy-cross"), "-O3", "-o", str(mpy_stage / "vectors_runner.mpy"),
         str(RUNNER)], check=True, capture_output=True,
    )
    return "vectors_runner"


def test_micropython_passes_every_vector(run_mpy: Any, runner: str) -> None:
    r = run_mpy(runner, gen_vectors.VECTORS_DIR)
    out = r.stdout.decode().splitlines()
    failed = [line for line in out if not line.startswith("ok ")][:-1]
    assert not failed and not r.stderr, (failed, r.stderr.decode()[-2000:])
    assert out[-1] == f"{len(ALL)} passed, 0 failed"
    assert sorted(line[3:] for line in out[:-1]) == sorted(ids(ALL))
    assert r.returncode == 0


def test_micropython_runner_notices_wrong_vectors(
    run_mpy: Any, runner: str, tmp_path: Path
) -> None:
    muts = _mutations()
    renamed = []
    for i, (_, v) in enumerate(muts):
        renamed.append({**v, "name": f"wrong_{i}"})
    (tmp_path / "wrong.json").write_text(gen_vectors._dump(renamed), encoding="utf-8")
    # the point here is the checks, not the heap: a MemoryError must not pass for a detection
    r = run_mpy(runner, tmp_path, heap="128k")
    out = r.stdout.decode().splitlines()
    assert out[-1] == f"0 passed, {len(muts)} failed", (out, r.stderr.decode()[-2000:])
    assert not [line for line in out if "Error" in line], out
    want = [f"FAIL wrong_{i}" for i in range(len(muts))]
    assert [line.split(":")[0] for line in out[:-1]] == want
    assert r.returncode == 1
