"""`hexiao tap replay | render | verify | bench`: the offline receipt-tap tools, end to end."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import zxingcpp
from click.testing import CliRunner
from hexiao.hostd.tap.inject import remove_blocks, verify_token
from hexiao.tools.tap import main
from PIL import Image

CORPUS = Path(__file__).resolve().parent / "receipts"
KEY_HEX = "5a" * 32
NOW = "2024-05-01T12:30:05+08:00"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "tap.key"
    path.write_text(KEY_HEX + "\n")
    path.chmod(0o600)
    return path


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def replay_json(capture: Path, out: Path, key_file: Path, *extra: str) -> tuple[int, list[dict]]:
    code, stdout, _ = invoke("replay", capture, "--out", out, "--key-file", key_file,
                             "--content", "https://hexiao.example/r/{token}", "--time", NOW,
                             "--lane", "lane-3", "--json", *extra)
    return code, [json.loads(line) for line in stdout.splitlines()]


def test_replay_writes_the_injected_stream(tmp_path: Path, key_file: Path) -> None:
    capture, out = CORPUS / "multi_receipt.bin", tmp_path / "out.bin"
    code, lines = replay_json(capture, out, key_file, "--chunk", "3")
    assert code == 0
    receipts, summary = lines[:-1], lines[-1]["summary"]
    assert [r["total"] for r in receipts] == ["30.00", "30.00", None]
    assert summary["injected"] == 3 and summary["bytes_in"] == capture.stat().st_size
    data = out.read_bytes()
    assert remove_blocks(data, [tuple(x) for x in summary["injections"]]) == capture.read_bytes()
    token = receipts[0]["content"].rsplit("/", 1)[1]
    info = verify_token([bytes.fromhex(KEY_HEX)], token)
    assert (info.lane, info.time, str(info.total)) == ("lane-3", 1714537805, "30.00")


def test_replay_human_output_and_collect_url_without_key(tmp_path: Path) -> None:
    code, stdout, _ = invoke("replay", CORPUS / "cn_supermarket.bin", "--out",
                             tmp_path / "o.bin", "--content", "https://mp.example/card?l={lane}",
                             "--profile", "raster-58", "--caption", "扫码领会员卡")
    assert code == 0
    assert "total 128.50" in stdout and "QR: https://mp.example/card?l=lane-1" in stdout
    assert "扫码领会员卡".encode("gb18030") in (tmp_path / "o.bin").read_bytes()


def test_replay_usage_errors(tmp_path: Path) -> None:
    capture, out = CORPUS / "cn_supermarket.bin", tmp_path / "o.bin"
    code, _, err = invoke("replay", capture, "--out", out)  # {token} without a key
    assert code == 2 and "--key-file" in err
    code, _, err = invoke("replay", capture, "--out", out, "--profile", "laser-9000",
                          "--content", "x")
    assert code == 2 and "generic-80" in err
    code, _, err = invoke("replay", capture, "--out", out, "--content", "{secret}")
    assert code == 2 and "{token}" in err
    code, _, err = invoke("replay", capture, "--out", out, "--content", "x", "--time", "noon")
    assert code == 2 and "ISO 8601" in err
    short = tmp_path / "short.key"
    short.write_text("abcd")
    short.chmod(0o600)
    code, _, err = invoke("replay", capture, "--out", out, "--key-file", short)
    assert code == 2 and "16 bytes" in err
    short.write_text("not a key at all, but long enough to pass for one\n")
    code, _, err = invoke("replay", capture, "--out", out, "--key-file", short)
    assert code == 2 and "not a tap key" in err and "long enough" not in err
    short.chmod(0o640)
    code, _, err = invoke("replay", capture, "--out", out, "--key-file", short)
    assert code == 2 and f"chmod 600 {short}" in err
    assert not out.exists()


def test_replay_exit_1_when_a_receipt_failed_open(tmp_path: Path) -> None:
    capture, out = CORPUS / "cn_supermarket.bin", tmp_path / "o.bin"
    code, _, err = invoke("replay", capture, "--out", out, "--qr", "raster",
                          "--width", "48", "--content", "x" * 300)
    assert code == 1 and "does not fit" in err
    assert out.read_bytes() == capture.read_bytes()  # the receipt prints exactly as sent


def test_replay_custom_total_patterns(tmp_path: Path) -> None:
    capture = tmp_path / "in.bin"
    capture.write_bytes("应付金额: 45.50\n合计: 50.00\n".encode("gb18030") + b"\x1dV\x00")
    code, stdout, _ = invoke("replay", capture, "--out", tmp_path / "o.bin", "--content", "x",
                             "--total-pattern", "应付=应付", "--json")
    assert code == 0 and json.loads(stdout.splitlines()[0])["total"] == "45.50"
    code, _, err = invoke("replay", capture, "--out", tmp_path / "o.bin", "--content", "x",
                          "--total-pattern", "no-equals-sign")
    assert code == 2 and "NAME=REGEX" in err


@pytest.mark.parametrize("profile", ["generic-80", "escstar-58"])
def test_render_draws_a_decodable_qr(tmp_path: Path, key_file: Path, profile: str) -> None:
    out, png = tmp_path / "out.bin", tmp_path / "r.png"
    code, lines = replay_json(CORPUS / "logo_gs_v0.bin", out, key_file, "--profile", profile)
    assert code == 0
    code, stdout, _ = invoke("render", out, "--png", png, "--profile", profile)
    assert code == 0 and "picture written" in stdout and "total 51.00" in stdout
    found = [r.text for r in zxingcpp.read_barcodes(Image.open(png))]
    assert lines[0]["content"] in found


def test_verify_token_url_and_receipt(tmp_path: Path, key_file: Path) -> None:
    capture, out = CORPUS / "multi_receipt.bin", tmp_path / "out.bin"
    _, lines = replay_json(capture, out, key_file)
    url = lines[1]["content"]
    code, stdout, _ = invoke("verify", url, "--key-file", key_file, "--receipt", capture,
                             "--json")
    result = json.loads(stdout)
    assert code == 0 and result["valid"] and result["receipt"] == 1
    assert result["lane"] == "lane-3" and result["total"] == "30.00"
    assert result["time_utc"] == "2024-05-01T04:30:05Z"
    code, stdout, _ = invoke("verify", url, "--key-file", key_file)
    assert code == 0 and stdout.startswith("valid: lane lane-3")
    # the same token against another capture: valid, but no receipt there matches
    code, stdout, _ = invoke("verify", url, "--key-file", key_file, "--receipt",
                             CORPUS / "cn_supermarket.bin")
    assert code == 1 and "no receipt" in stdout


def test_verify_rejects_tampered_tokens_and_wrong_keys(tmp_path: Path, key_file: Path) -> None:
    _, lines = replay_json(CORPUS / "cn_supermarket.bin", tmp_path / "o.bin", key_file)
    token = lines[0]["content"].rsplit("/", 1)[1]
    tampered = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    code, stdout, _ = invoke("verify", tampered, "--key-file", key_file)
    assert code == 1 and stdout.startswith("INVALID")
    other = tmp_path / "other.key"
    other.write_text("77" * 32)
    other.chmod(0o644)  # a key others can read is refused, as hostd refuses such secrets
    code, stdout, err = invoke("verify", token, "--key-file", other, "--json")
    assert code == 2 and stdout == "" and f"chmod 600 {other}" in err
    other.chmod(0o600)
    code, stdout, err = invoke("verify", token, "--key-file", other, "--json")
    assert code == 1 and json.loads(stdout)["valid"] is False
    code, _, _ = invoke("verify", token, "--key-file", other, "--key-file", key_file)
    assert code == 0  # rotation: the old key still verifies old receipts


def test_bench_reports_throughput() -> None:
    code, stdout, _ = invoke("bench", "--mb", "0.3", "--rounds", "1", "--json")
    result = json.loads(stdout)
    assert code == 0 and result["stream_bytes"] >= 300_000
    assert result["parser_mbps"] > 0 and result["injector_mbps"] > 0


def test_hexiao_tap_is_registered() -> None:
    exe = Path(sys.executable).with_name("hexiao")
    result = subprocess.run([str(exe), "tap", "--help"], capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "120"})
    assert result.returncode == 0
    for sub in ("replay", "render", "verify", "bench"):
        assert sub in result.stdout


def test_corpus_files_are_what_the_generator_builds() -> None:
    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    assert spec and spec.loader
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    jobs = gen.build()
    manifest = json.loads((CORPUS / "corpus.json").read_text(encoding="utf-8"))
    assert set(jobs) == set(manifest)
    for name, (data, expect) in jobs.items():
        assert (CORPUS / name).read_bytes() == data, f"{name}: run tests/receipts/make_corpus.py"
        assert manifest[name] == expect


def test_hexiao_receipt_verify_is_the_same_check(tmp_path: Path, key_file: Path) -> None:
    from click.testing import CliRunner
    from hexiao.tools.cli import main

    _, lines = replay_json(CORPUS / "cn_supermarket.bin", tmp_path / "o.bin", key_file)
    url = lines[0]["content"]
    good = CliRunner().invoke(main, ["receipt", "verify", url, "--key-file", str(key_file)])
    i = len(url) - 20  # a character well inside the token: all of its bits count
    tampered = url[:i] + ("A" if url[i] != "A" else "B") + url[i + 1:]
    bad = CliRunner().invoke(main, ["receipt", "verify", tampered, "--key-file",
                                    str(key_file)])
    assert good.exit_code == 0 and good.output.startswith("valid: lane ")
    assert bad.exit_code == 1 and bad.output.startswith("INVALID: ")


def test_keygen_makes_a_private_key_the_tap_reads_and_never_overwrites(tmp_path: Path) -> None:
    out = tmp_path / "tap.key"
    r = CliRunner().invoke(main, ["keygen", "--out", str(out)])
    assert r.exit_code == 0 and "0600" in r.output
    assert out.stat().st_mode & 0o777 == 0o600
    text = out.read_text()
    assert len(text.strip()) == 64 and int(text, 16) >= 0
    before = out.read_bytes()
    again = CliRunner().invoke(main, ["keygen", "--out", str(out)])
    assert again.exit_code == 1 and "never overwritten" in again.output
    assert out.read_bytes() == before
    # the key it made is one the tap accepts: a replay signs tokens with it
    capture = tmp_path / "in.bin"
    capture.write_bytes("合计: ¥1.00\n".encode("gb18030") + b"\x1dV\x00")
    replay = CliRunner().invoke(main, ["replay", str(capture), "--out", str(tmp_path / "o"),
                                       "--key-file", str(out)])
    assert replay.exit_code == 0, replay.output
    missing_dir = CliRunner().invoke(main, ["keygen", "--out", str(tmp_path / "no" / "k")])
    assert missing_dir.exit_code == 1 and "cannot create" in missing_dir.output
    assert "Traceback" not in missing_dir.output
