"""Link captures (hostd/lanes/capture.py): recorded from real link traffic, decoded, checked.

A device Link and a host Link talk in-process with simulated time; every byte that crosses the
"wire" (after the noise we inject) goes through record_pair's taps into a CaptureWriter, exactly
as hostd's capture will. The decoder's verdicts are checked against what the two Links
themselves counted and delivered, which is an independent account of the same bytes.

Then the writer's size cap, and captures through the real hostd on a pty (no device process:
the test is the device end): a killed `hexiao capture` ends its capture, line noise stops at
the cap.
"""

from __future__ import annotations

import json
import os
import random
import stat
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from click.testing import CliRunner
from hexiao.hostd.keystore import Keystore
from hexiao.hostd.lanes import capture
from hexiao.hostd.lanes.capture import (
    D2H,
    H2D,
    CaptureError,
    CaptureWriter,
    read_capture,
    record_pair,
)
from hexiao.protocol import cose, crypto, frame, messages
from hexiao.protocol.link import DEVICE, EV_MESSAGE, HOST, Link
from hexiao.tools.sim.relay import corrupt_copy
from hexiao.tools.support import decode
from hexiao.tools.support.decode import NOISE, decode_capture

KID = b"lane-01"
DKEY = bytes(range(100, 132))
OTHER_KEY = bytes(range(200, 232))
HELLO = {"firmware": "1.2.3", "board": "sim"}


def scan(i: int) -> dict[str, Any]:
    return {"type": "scan", "scan_id": i, "symbology": "]E0", "data": b"690%010d" % i,
            "time_ms": 1000 + i}


def wire_frames(data: bytes) -> list[bytes]:
    return [p + b"\x00" for p in data.split(b"\x00") if p]


class Lane:
    """A device and a host joined by a recorded wire; `mangle` holds one-shot changes for the
    next chunks of a direction (noise, a lost ack), applied before the capture sees them."""

    def __init__(self, writer: CaptureWriter) -> None:
        self.dev = Link(DEVICE, random.Random(1).randbytes, device_id=KID, device_key=DKEY,
                        hello=HELLO)
        self.host = Link(HOST, random.Random(2).randbytes, keystore={KID: DKEY}.get)
        self.now = 0
        d2h, h2d = record_pair(writer, lambda: self.now * 1000)
        self.tap = {D2H: d2h, H2D: h2d}
        self.mangle: dict[str, list[Callable[[bytes], bytes]]] = {D2H: [], H2D: []}
        self.clean: dict[str, list[bytes]] = {D2H: [], H2D: []}  # frames as their sender wrote
        self.delivered: dict[str, list[dict]] = {D2H: [], H2D: []}

    def _to(self, d: str) -> Link:
        return self.host if d == D2H else self.dev

    def carry(self, d: str, data: bytes) -> None:
        self.clean[d] += wire_frames(data)
        if self.mangle[d]:
            data = self.mangle[d].pop(0)(data)
        if data:
            self.deliver(d, self.tap[d](data))

    def deliver(self, d: str, data: bytes) -> None:
        for ev in self._to(d).receive(data, self.now):
            if ev[0] == EV_MESSAGE:
                self.delivered[d].append(ev[1])

    def pump(self) -> None:
        for _ in range(1000):
            a, b = self.dev.data_to_send(), self.host.data_to_send()
            if not a and not b:
                return
            if a:
                self.carry(D2H, a)
            if b:
                self.carry(H2D, b)
        raise AssertionError("the links never fall quiet")

    def at(self, ms: int) -> None:
        self.now = ms
        self.dev.poll(ms)
        self.host.poll(ms)
        self.pump()

    def tick(self) -> None:
        self.at(min(t for t in (self.dev.next_timeout(), self.host.next_timeout()) if t))

    def inject(self, d: str, data: bytes) -> None:
        """Bytes put on the wire by someone else (noise source, attacker)."""
        self.deliver(d, self.tap[d](data))
        self.pump()


@pytest.fixture(scope="module")
def lane(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    path = tmp_path_factory.mktemp("cap") / "lane.hxcap"
    rng = random.Random(7)
    with CaptureWriter(path, KID) as w:
        ln = Lane(w)
        ln.dev.connect(0)
        ln.pump()
        assert ln.dev.is_open() and ln.host.is_open()
        keys1 = (ln.host.rx_key, ln.host.tx_key)
        ln.at(100)
        ln.dev.send(scan(1), ln.now)
        ln.pump()
        scan1_wire = next(f for f in ln.clean[D2H] if _msg(f, keys1[0])["type"] == "scan")
        ln.at(200)  # a bit flipped on the line, CRC kept: exactly `crc`
        ln.mangle[D2H].append(lambda data: corrupt_copy(data, rng))
        ln.dev.send(scan(2), ln.now)
        ln.pump()
        ln.at(400)  # three bytes lost in the middle of a frame
        ln.mangle[D2H].append(lambda data: data[:9] + data[12:])
        ln.dev.send(scan(3), ln.now)
        ln.pump()
        ln.at(500)  # garbage between frames: each of a known verdict
        ln.inject(D2H, b"\x05\x01\x02\x00")  # a COBS block longer than the frame: cobs
        ln.inject(D2H, b"\x03\x01\x02\x00")  # two bytes: truncated
        ln.inject(D2H, b"\x01" * 1100)  # no delimiter within MAX_WIRE: one oversize,
        ln.inject(D2H, b"\x01" * 9 + b"\x00")  # and the rest up to the delimiter is skipped
        ln.inject(D2H, frame.encode(b"not a cose"))  # a good CRC over junk: cose
        ln.at(600)  # a forgery: MAC'd under a key the attacker has
        ln.inject(D2H, frame.encode(cose.mac0(OTHER_KEY, 5, KID, 50, messages.encode(scan(9)))))
        ln.at(700)  # a replay of the first scan
        ln.inject(D2H, scan1_wire)
        ln.at(1000)  # the host's ack is lost: the device retransmits scan 4 with its counter
        ln.mangle[H2D].append(lambda data: b"")
        ln.dev.send(scan(4), ln.now)
        ln.pump()
        ln.tick()
        ln.at(1300)
        ln.host.send({"type": "verdict", "scan_id": 4, "outcome": 0, "beep": 1, "led": 1,
                      "text": "ok 4"}, ln.now)
        ln.pump()
        ln.at(5000)  # after a 3.7 s silence, a frame split across two reads
        ln.dev.send(scan(5), ln.now)
        data = ln.dev.data_to_send()
        ln.clean[D2H] += wire_frames(data)
        ln.deliver(D2H, ln.tap[D2H](data[:7]))
        ln.now = 5002
        ln.deliver(D2H, ln.tap[D2H](data[7:]))
        ln.pump()
        ln.at(6000)  # the device reboots: a second session
        ln.dev.connect(ln.now)
        ln.pump()
        ln.at(6100)
        ln.dev.send(scan(6), ln.now)
        ln.pump()
        ln.inject(D2H, b"\x05\x01")  # cut off: an unfinished frame at the end
    return SimpleNamespace(path=path, dev=ln.dev, host=ln.host, keys1=keys1,
                           keys2=(ln.host.rx_key, ln.host.tx_key), delivered=ln.delivered,
                           scan5=len(data) - 1)


def _msg(wire: bytes, key: bytes) -> dict:
    m = cose.parse(frame.decode(wire[:-1]))
    if m.counter == 0:
        return {"type": "handshake"}
    m.verify(key)
    return messages.decode(m.payload)


def of(rep: decode.Report, d: str, **match: Any) -> list[dict]:
    return [f for f in rep.frames if f["dir"] == d and all(f.get(k) == v for k, v in
                                                           match.items())]


def test_every_class_matches_what_the_links_counted(lane: SimpleNamespace) -> None:
    rep = decode_capture(lane.path, {KID: DKEY}.get)
    for d, rx in ((D2H, lane.host), (H2D, lane.dev)):
        st = rep.summary["directions"][d]["status"]
        for code in (*NOISE, "mac", "replay"):
            assert st[code] == rx.counters.get(code, 0), (d, code)
    d2h = rep.summary["directions"][D2H]["status"]
    # seeded: the flipped bit is `crc`; the lost bytes and the long COBS block are `cobs`
    assert (d2h["crc"], d2h["cobs"], d2h["truncated"], d2h["oversize"]) == (1, 2, 1, 1)
    assert d2h["cose"] == 1 and d2h["mac"] == 1 and d2h["replay"] == 1
    assert d2h["payload"] == d2h["unverified"] == 0
    assert sum(rep.summary["directions"][H2D]["status"].values()) == \
        rep.summary["directions"][H2D]["status"]["ok"]
    (cose_f,) = of(rep, D2H, status="cose")
    assert cose_f["error"] == "cose" and cose_f["detail"] == "not a tagged COSE_Mac0 (tag 17)"
    (forged,) = of(rep, D2H, status="mac")
    assert (forged["counter"], forged["kid"], forged["alg"]) == (50, "lane-01", 5)
    assert forged["detail"] == "MAC under the d2h session key failed: wrong key or tampered"
    (replayed,) = of(rep, D2H, status="replay")
    assert replayed["message"]["scan_id"] == 1 and replayed["t_us"] == 700_000
    assert replayed["detail"].startswith(f"counter {replayed['counter']} is below")


def test_messages_decode_as_the_links_delivered_them(lane: SimpleNamespace) -> None:
    rep = decode_capture(lane.path, {KID: DKEY}.get, show_codes=True)
    for d in (D2H, H2D):
        fresh = [f["message"] for f in of(rep, d, status="ok")
                 if not f.get("retransmit") and f["message"]["type"] not in
                 ("hello", "welcome", "ack", "nack")]
        want = [dict(m, data=m["data"].decode()) if m["type"] == "scan" else m
                for m in lane.delivered[d]]
        assert fresh == want
    assert [m["scan_id"] for m in lane.delivered[D2H]] == [1, 2, 3, 4, 5, 6]
    assert lane.delivered[H2D][0]["type"] == "verdict"


def test_session_keys_come_from_the_captured_handshake(lane: SimpleNamespace) -> None:
    rep = decode_capture(lane.path, {KID: DKEY}.get)
    assert rep.summary["sessions"] == 2 and len(rep.sessions) == 2
    for s, keys in zip(rep.sessions, (lane.keys1, lane.keys2), strict=True):
        assert (s.d2h_key, s.h2d_key) == keys
        assert (s.d2h_key, s.h2d_key) == crypto.session_keys(DKEY, s.host_nonce, s.device_nonce)
        assert s.kid == KID and "key" not in repr(s)
    assert keys_differ(lane)
    scans = of(rep, D2H, status="ok")
    assert {f["session"] for f in scans if f["message"]["type"] == "scan"} == {1, 2}
    assert rep.summary["directions"][D2H]["types"]["hello"] == 2
    assert rep.summary["directions"][H2D]["types"]["welcome"] == 2


def keys_differ(lane: SimpleNamespace) -> bool:
    return lane.keys1[0] != lane.keys2[0] and lane.keys1[1] != lane.keys2[1]


def test_retransmission_is_counted_not_called_a_replay(lane: SimpleNamespace) -> None:
    rep = decode_capture(lane.path, {KID: DKEY}.get)
    (again,) = [f for f in rep.frames if f.get("retransmit")]
    assert again["status"] == "ok" and again["message"]["scan_id"] == 4
    first = of(rep, D2H, counter=again["counter"], session=1)[0]
    assert first["t_us"] < again["t_us"] and not first.get("retransmit")
    assert rep.summary["directions"][D2H]["retransmissions"] == 1
    assert rep.summary["directions"][D2H]["retransmissions"] == lane.host.counters["duplicate"]
    assert rep.summary["directions"][H2D]["retransmissions"] == 0


def test_timing_sizes_gaps_and_unfinished_bytes(lane: SimpleNamespace) -> None:
    rep = decode_capture(lane.path, {KID: DKEY}.get)
    (s5,) = [f for f in of(rep, D2H, status="ok") if f["message"].get("scan_id") == 5
             and f["message"]["type"] == "scan"]
    assert (s5["t_us"], s5["size"]) == (5_002_000, lane.scan5)
    (oversize,) = of(rep, D2H, status="oversize")
    assert oversize["size"] == 1100 and oversize["t_us"] == 500_000 and oversize["detail"] == \
        "no delimiter within MAX_WIRE"
    s = rep.summary
    assert (s["first_us"], s["last_us"]) == (0, 6_100_000)
    assert [(g["at_us"], g["seconds"]) for g in s["gaps"]] == [(1_300_000, 3.7)]
    assert s["directions"][D2H]["unfinished_bytes"] == 2
    assert s["directions"][H2D]["unfinished_bytes"] == 0
    assert rep.truncated is None


def test_advice_tells_noise_from_mac_failures(lane: SimpleNamespace) -> None:
    s = decode_capture(lane.path, {KID: DKEY}.get).summary
    noise = sum(s["directions"][D2H]["status"][c] for c in NOISE)
    assert s["noise"] == noise and s["mac"] == 1 and s["replay"] == 1
    assert s["advice"] == [
        f"{noise} frames damaged on the line (CRC/COBS/truncated/oversize): line noise, not "
        "keys; check the USB cable, port and hub",
        "1 frames failed their MAC: the keystore's key is not the device's (re-provision it), "
        "or someone tampers with the line",
        "1 replayed frames: old frames sent again (tampering, or a misbehaving proxy on the "
        "line)",
        "1 frames passed their CRC but are malformed: a peer bug or crafted frames",
    ]


def test_no_key_structure_only(lane: SimpleNamespace) -> None:
    keyed = decode_capture(lane.path, {KID: DKEY}.get)
    rep = decode_capture(lane.path)
    assert not rep.mac_checked and rep.summary["mac_checked"] is False
    assert not any("message" in f for f in rep.frames)
    st = rep.summary["directions"][D2H]["status"]
    for code in (*NOISE, "cose"):
        assert st[code] == keyed.summary["directions"][D2H]["status"][code]
    assert st["ok"] == st["mac"] == st["replay"] == 0
    assert {f["detail"] for f in rep.frames if f["status"] == "unverified"} == \
        {"MAC not checked: no key given"}
    assert rep.summary["advice"][-1] == \
        "MAC not checked: no key given (use --keystore, or --key with --kid)"


def test_wrong_device_key_is_a_mac_failure_not_noise(lane: SimpleNamespace) -> None:
    rep = decode_capture(lane.path, {KID: OTHER_KEY}.get)
    hs = [f for f in rep.frames if f.get("counter") == 0]
    assert hs and {f["status"] for f in hs} == {"mac"}
    assert hs[0]["detail"] == "MAC under the device key failed: wrong key or tampered"
    later = [f for f in rep.frames if f.get("counter") and f["status"] != "mac"]
    assert {f["detail"] for f in later} == {"no verified handshake earlier in the capture"}
    # the forgery too is unverified: without the handshake no session key exists to try
    assert rep.sessions == [] and rep.summary["mac"] == len(hs) == 4
    assert rep.summary["advice"][1].startswith("4 frames failed their MAC: the keystore's key")


def test_capture_begun_after_the_handshake(lane: SimpleNamespace, tmp_path: Path) -> None:
    _, records, _ = read_capture(lane.path)
    part = tmp_path / "late.hxcap"
    with CaptureWriter(part, KID) as w:
        for d, t, data in records:
            if t >= 1_000_000:
                w.record(d, data, t)
    rep = decode_capture(part, {KID: DKEY}.get)
    before = [f for f in rep.frames if f.get("counter") and f["t_us"] < 6_000_000]
    assert before and {f["status"] for f in before} == {"unverified"}
    assert [s.number for s in rep.sessions] == [1]
    assert [f["message"]["scan_id"] for f in of(rep, D2H, status="ok")
            if f["message"]["type"] == "scan"] == [6]


def test_codes_are_masked_unless_asked(lane: SimpleNamespace) -> None:
    masked = decode_capture(lane.path, {KID: DKEY}.get)
    datas = {f["message"]["data"] for f in masked.frames
             if f.get("message", {}).get("type") == "scan"}
    assert "*********0001" in datas and all(d.startswith("*********") for d in datas)
    assert decode.mask_code(b"1234") == "****"
    assert decode.mask_code(b"\x1d12345", show=True) == "\\x1d12345"
    runner = CliRunner()
    out = runner.invoke(decode.main, [str(lane.path), "--key", DKEY.hex(), "--kid", "lane-01"])
    assert out.exit_code == 0, out.output
    assert "data=*********0001" in out.output and "6900000000001" not in out.output
    out = runner.invoke(decode.main, [str(lane.path), "--key", DKEY.hex(), "--kid",
                                       "hex:" + KID.hex(), "--show-codes"])
    assert out.exit_code == 0 and "data=6900000000001" in out.output


def test_writer_file_is_private_and_never_overwritten(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        path = tmp_path / "c.hxcap"
        CaptureWriter(path, "serial-1234").close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        CaptureWriter(path, KID)
    header, records, cut = read_capture(path)
    assert header["device_id"] == "serial-1234" and records == [] and cut is None
    assert isinstance(header["start_unix_us"], int) and header["writer"].startswith("hexiao")
    with CaptureWriter(tmp_path / "d.hxcap", b"\x00\x01") as w, \
            pytest.raises(ValueError, match="direction must be 'd2h' or 'h2d', not 'up'"):
        w.record("up", b"x")
    assert read_capture(tmp_path / "d.hxcap")[0]["device_id"] == "hex:0001"


def test_truncated_capture_decodes_what_precedes_the_cut(lane: SimpleNamespace,
                                                        tmp_path: Path) -> None:
    raw = lane.path.read_bytes()
    full = decode_capture(lane.path, {KID: DKEY}.get)
    cut = tmp_path / "cut.hxcap"
    cut.write_bytes(raw[:-1])
    rep = decode_capture(cut, {KID: DKEY}.get)
    _, records, _ = read_capture(lane.path)
    n = len(records)
    assert rep.truncated == f"truncated at byte {len(raw) - 1}, inside record {n} (1 of its " \
        "2 bytes)"
    assert rep.frames == full.frames[: len(rep.frames)] and len(rep.frames) > 20
    assert rep.summary["truncated"] == rep.truncated
    out = CliRunner().invoke(decode.main, [str(cut), "--key", DKEY.hex(), "--kid", "lane-01",
                                            "--summary"])
    assert out.exit_code == 3
    assert f"warning: {cut}: {rep.truncated}; decoded everything before it" in out.output
    head = tmp_path / "head.hxcap"
    head.write_bytes(raw[: len(raw) - len(records[-1][2]) - 5])  # 8 of the 13 head bytes
    assert read_capture(head)[2] == f"truncated at byte {head.stat().st_size}, inside the head " \
        f"of record {n}"
    zeros = tmp_path / "zeros.hxcap"
    zeros.write_bytes(raw + bytes(20))
    assert read_capture(zeros)[2] == f"corrupt at byte {len(raw)}: record {n + 1} has " \
        "direction code 0"


@pytest.mark.parametrize("content, message", [
    (b"PK\x03\x04 a zip file", "is not a hexiao capture (bad magic)"),
    (b"\x89HXCAP\n\x1a\n\x00\x01", "a capture damaged by a text-mode transfer (line ends "
     "converted); transfer it again as a binary file"),
    (capture.MAGIC + b"\x00\x02\x00\x00\x00\x00", "capture format version 2 is not supported "
     "(this hexiao reads version 1); upgrade hexiao to decode it"),
    (capture.MAGIC + b"\x00\x01\x00\x00", "truncated inside its header; nothing to decode"),
    (capture.MAGIC + b"\x00\x01\x00\x00\x00\x09{", "truncated inside its header; nothing to "
     "decode"),
    (capture.MAGIC + b"\x00\x01\x00\x00\x00\x01{", "the capture header is not valid JSON"),
])
def test_files_that_are_not_captures(tmp_path: Path, content: bytes, message: str) -> None:
    p = tmp_path / "x.hxcap"
    p.write_bytes(content)
    with pytest.raises(CaptureError) as e:
        decode_capture(p)
    assert str(e.value) in (f"{p}: {message}", f"{p} {message}")
    out = CliRunner().invoke(decode.main, [str(p)])
    assert out.exit_code == 1 and out.output.strip() == f"Error: {e.value}"


def test_unreadable_file(tmp_path: Path) -> None:
    p = tmp_path / "missing.hxcap"
    out = CliRunner().invoke(decode.main, [str(p)])
    assert out.exit_code == 1
    assert out.output.strip() == f"Error: cannot read {p}: No such file or directory"


def test_cli_human_output(lane: SimpleNamespace, tmp_path: Path) -> None:
    ks = Keystore(tmp_path / "keys", create=True)
    ks.add(KID, DKEY)
    out = CliRunner().invoke(decode.main, [str(lane.path), "--keystore", str(ks.path)])
    assert out.exit_code == 0, out.output
    rep = decode_capture(lane.path, {KID: DKEY}.get)
    lines = out.output.splitlines()
    assert len(lines) == len(rep.frames) + len(decode._summary_lines(rep.summary))
    assert lines[0].split()[:4] == ["0.000000", "d2h", f"{rep.frames[0]['size']}B", "ok"]
    assert "kid=lane-01 alg=5 ctr=0  hello versions=[1]" in lines[0]
    assert any(ln.endswith("[retransmission]") and "scan scan_id=4" in ln for ln in lines)
    assert any(ln.split()[3:] == ["crc", "CRC-32", "mismatch"] for ln in lines)
    assert any(ln.endswith("nack code=1 code_name=crc") for ln in lines)
    assert any(ln.endswith("ctr=50  MAC under the d2h session key failed: wrong key or tampered")
               for ln in lines)
    assert "sessions: 2; MAC checked" in out.output
    assert "gap of 3.700 s after 1.300000 s" in out.output
    assert "d2h: 2 bytes of an unfinished frame at the end" in out.output
    assert DKEY.hex() not in out.output
    summary = CliRunner().invoke(decode.main, [str(lane.path), "--keystore", str(ks.path),
                                                "--summary"])
    assert summary.output.splitlines() == lines[len(rep.frames):]


def test_cli_json(lane: SimpleNamespace) -> None:
    out = CliRunner().invoke(decode.main, [str(lane.path), "--json", "--key", DKEY.hex(),
                                            "--kid", "lane-01"])
    assert out.exit_code == 0, out.output
    objs = [json.loads(line) for line in out.output.splitlines()]
    rep = decode_capture(lane.path, {KID: DKEY}.get)
    assert objs[:-1] == rep.frames and objs[-1] == rep.summary
    assert objs[-1]["type"] == "summary" and objs[-1]["sessions"] == 2
    hello = objs[0]["message"]
    assert hello["type"] == "hello" and len(bytes.fromhex(hello["nonce"])) == 16
    nokey = CliRunner().invoke(decode.main, [str(lane.path), "--json", "--summary"])
    (summary,) = [json.loads(line) for line in nokey.output.splitlines()]
    assert summary["mac_checked"] is False


@pytest.mark.parametrize("args, code, message", [
    (["--key", "00" * 32], 2, "--key and --kid go together"),
    (["--key", "zz", "--kid", "lane-01"], 1, "Error: --key must be 64 hex digits and --kid a "
     'device id of 1..16 bytes (text, or "hex:" and hex digits)'),
    (["--keystore", "/nonexistent/keys"], 1, "Error: keystore: "),
])
def test_cli_key_option_errors(lane: SimpleNamespace, args: list[str], code: int,
                               message: str) -> None:
    out = CliRunner().invoke(decode.main, [str(lane.path), *args])
    assert out.exit_code == code and message in out.output


def test_unsafe_keystore_is_refused(lane: SimpleNamespace, tmp_path: Path) -> None:
    ks = Keystore(tmp_path / "keys", create=True)
    ks.add(KID, DKEY)
    ks.path.chmod(0o644)
    out = CliRunner().invoke(decode.main, [str(lane.path), "--keystore", str(ks.path)])
    assert out.exit_code == 1 and "lets other users read it" in out.output


def test_hand_made_frames_payload_header_and_ack_replay(tmp_path: Path) -> None:
    """Frames no correct link sends: each branch of the classification, with its exact code."""
    dn, hn = bytes(range(16)), bytes(range(16, 32))
    d2h_key, h2d_key = crypto.session_keys(DKEY, hn, dn)

    def wire(key: bytes, counter: int, msg: dict) -> bytes:
        return frame.encode(cose.mac0(key, 5, KID, counter, messages.encode(msg)))

    prot = cose.protected_header(5, KID, 1)
    assert len(prot) < 24  # so its bstr head is one byte
    bad_header = b"\xd1\x84" + bytes((0x40 + len(prot),)) + prot + b"\xa1\x01\x05\x40\x58\x20" \
        + bytes(32)
    path = tmp_path / "made.hxcap"
    with CaptureWriter(path, KID) as w:
        for t, (d, data) in enumerate([
            (D2H, wire(DKEY, 0, {"type": "hello", "versions": [1], "nonce": dn,
                                 "firmware": "1", "board": "sim"})),
            (H2D, wire(DKEY, 0, {"type": "welcome", "version": 1, "host_nonce": hn,
                                 "device_nonce": dn})),
            (D2H, wire(d2h_key, 1, {"type": "ack", "counter": 0})),
            (D2H, wire(d2h_key, 1, {"type": "ack", "counter": 0})),  # acks are never resent
            (D2H, wire(DKEY, 0, scan(1))),  # a session message in the handshake epoch
            (D2H, wire(DKEY, 0, {"type": "welcome", "version": 1, "host_nonce": hn,
                                 "device_nonce": dn})),  # the host's message, from the device
            (H2D, wire(h2d_key, 1, {"type": "ping"})),
            (D2H, frame.encode(bad_header)),
        ]):
            w.record(d, data, t * 1000)
    rep = decode_capture(path, {KID: DKEY}.get)
    got = [(f["status"], f.get("error"), f.get("detail")) for f in rep.frames]
    assert got == [
        ("ok", None, None), ("ok", None, None), ("ok", None, None),
        ("replay", "replay", "ack counter 1 seen before or older than the window"),
        ("payload", "no_session", "session message scan before the handshake"),
        ("payload", "unknown_type", "welcome is not sent d2h"),
        ("ok", None, None),
        ("cose", "header", "unprotected header must be empty"),
    ]
    assert (rep.frames[6]["message"], rep.frames[6]["session"]) == ({"type": "ping"}, 1)
    line = decode._line(rep.frames[7])
    assert line.endswith("cose        header: unprotected header must be empty")


# -- the writer's size cap, and captures through hostd (issue 17) ---------------------------------


def test_the_writer_stops_at_its_cap_and_says_so_in_the_header(tmp_path: Path) -> None:
    path = tmp_path / "capped.hxcap"
    w = CaptureWriter(path, KID, max_bytes=4096)
    for i in range(1000):  # far more than fits: 1000 x 113 bytes
        w.record(D2H, bytes([i % 255 + 1]) * 100, i)
    w.close("capture.stop")  # too late to change why: the cap came first
    header, records, cut = read_capture(path)
    assert path.stat().st_size <= 4096 and path.stat().st_size == w.size
    assert cut is None and len(records) > 20 and all(len(d) == 100 for _, _, d in records)
    assert w.size + 113 > 4096  # every record that fitted is there
    assert header["max_bytes"] == 4096
    assert header["stopped"].startswith("size cap reached: the next record would pass 4096")
    assert w.stopped == header["stopped"]
    w.record(H2D, b"late")  # after the end: dropped, no error (a tap on hostd's link thread)
    assert path.stat().st_size == w.size


def test_a_close_reason_is_kept_in_the_header_and_a_plain_close_adds_none(tmp_path: Path) -> None:
    with CaptureWriter(tmp_path / "a.hxcap", KID) as w:
        w.record(D2H, b"\x01\x00", 0)
    assert "stopped" not in read_capture(tmp_path / "a.hxcap")[0]
    w = CaptureWriter(tmp_path / "b.hxcap", KID)
    w.record(D2H, b"\x01\x00", 0)
    w.close("its client went away" * 20)  # longer than the header's room: cut to fit
    header, records, cut = read_capture(tmp_path / "b.hxcap")
    assert header["stopped"].startswith("its client went away") and cut is None
    assert records == [(D2H, 0, b"\x01\x00")]


HOSTD_KID = "lane-01"
LONG = 60.0  # a guard against hangs, never a performance claim


def wait_for(pred: Callable[[], Any], what: str) -> Any:
    end = time.monotonic() + LONG
    while not (got := pred()):
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.02)
    return got


@pytest.fixture
def hostd(tmp_path: Path) -> Any:
    """The real daemon with one device port (a pty cable) and its control socket; no device
    process: the test writes what the device end sends."""
    from hexiao.hostd.config import from_dict
    from hexiao.hostd.daemon import Daemon
    from hexiao.tools.sim.relay import Cable

    cable = Cable().start()
    sock = tmp_path / "run" / "hostd.sock"
    daemon = Daemon(from_dict({
        "hostd": {"state_dir": str(tmp_path / "state"), "control_socket": str(sock)},
        "backend": {"kind": "sim"},
        "device": [{"id": HOSTD_KID, "port": cable.host_port, "lane": "lane-1"}]}))
    try:
        daemon.start()
        yield SimpleNamespace(daemon=daemon, cable=cable, sock=sock)
    finally:
        daemon.stop()
        cable.close()


def start_or_busy(sock: Path, path: Path) -> bool:
    """capture.start to `path`: True if it started (then stopped again), False if busy."""
    from hexiao.hostd.control.client import ControlClient, ControlError

    with ControlClient(sock) as c:
        try:
            c.call("capture.start", device=HOSTD_KID, path=str(path))
        except ControlError as e:
            assert "is already being captured" in str(e), e
            return False
        c.call("capture.stop", device=HOSTD_KID)
    return True


def test_a_killed_capture_client_ends_its_capture(hostd: Any, tmp_path: Path) -> None:
    """Issue 17: `hexiao capture` killed by SIGHUP (an SSH session dropping) left hostd
    capturing; the capture now ends with its client's connection."""
    import signal
    import subprocess

    from hexiao.tools import micropython

    out = tmp_path / "held.hxcap"
    proc = subprocess.Popen([micropython.executable("hexiao"), "capture", HOSTD_KID, "--out",
                             str(out), "--socket", str(hostd.sock)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # its start answer: the capture is on
        assert line.startswith("device: lane-01"), line + proc.stderr.read()
        assert not start_or_busy(hostd.sock, tmp_path / "other.hxcap")  # it is, and held
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(LONG) == -signal.SIGHUP
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_for(lambda: start_or_busy(hostd.sock, tmp_path / "after.hxcap"), "the capture to end")
    header, _, cut = read_capture(out)
    assert header["stopped"] == "its client went away" and cut is None


def test_a_noisy_device_does_not_grow_the_capture_past_its_cap(hostd: Any,
                                                              tmp_path: Path) -> None:
    """Issue 17: 10 s of line noise grew a capture to 302 MB. Here 1 MiB of noise meets a
    64 KiB cap: the file stops there and says so, and the stop's answer does too."""
    from hexiao.hostd.control.client import ControlClient

    cap = 64 * 1024
    hostd.daemon.handlers.capture_max_bytes = cap
    out = tmp_path / "noisy.hxcap"
    rng = random.Random(17)
    with ControlClient(hostd.sock) as c:
        started = c.call("capture.start", device=HOSTD_KID, path=str(out))
        assert started["max_bytes"] == cap
        for _ in range(64):  # 64 x 16 KiB of noise, the device end of the cable
            os.write(hostd.cable.device_fd, rng.randbytes(16 * 1024))
            if "stopped" in read_capture(out)[0]:
                break
        header = wait_for(lambda: read_capture(out)[0].get("stopped") and read_capture(out)[0],
                          "the cap")
        size = out.stat().st_size
        assert not c.wait_closed(0)  # the connection still holds the (ended) capture
        stopped = c.call("capture.stop", device=HOSTD_KID)
    assert size <= cap and out.stat().st_size == size  # nothing more after the cap
    assert header["stopped"].startswith("size cap reached")
    assert stopped["stopped"] is True and stopped["bytes"] == size
    assert stopped["stopped_early"] == header["stopped"]
    _, records, cut = read_capture(out)
    assert cut is None and sum(len(d) for _, _, d in records) > cap // 2
