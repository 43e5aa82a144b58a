"""Generate the golden vectors of the hexiao link: protocol/vectors/*.json (protocol/SPEC.md §12,
"Golden vectors").

Deterministic: fixed keys, nonces, counters and payloads; no randomness, no clock. Each vector is
checked against the implementation as it is built: a valid vector must verify and decode to the
message it was built from, and an invalid one must fail with exactly the error code it was written
to provoke. If the implementation disagrees, generation stops with VectorError: that is a bug in
either the vector's intent or the protocol code, and is never papered over.

    python -m hexiao.tools.gen_vectors            # (re)write the files
    python -m hexiao.tools.gen_vectors --check    # exit 1 if the files differ from a fresh run

Layout: each file is {"vectors": [...]} with one vector per line, so a device-sized reader (the
MicroPython runner in tests/mpy) can stream a file vector by vector instead of holding it whole.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import hexiao.protocol
from hexiao.protocol import cbor, cose, crypto, frame, link, messages
from hexiao.protocol import cobs as pure_cobs
from hexiao.protocol.errors import ProtocolError

VECTORS_DIR = Path(hexiao.protocol.__file__).resolve().parent / "vectors"

# errors raised only after the payload was decoded: their vectors carry the decoded message
AFTER_DECODE = ("no_session", "handshake", "version")


class VectorError(AssertionError):
    """The implementation disagrees with what a vector was written to show."""


def _fixed(label: str, n: int) -> bytes:
    # stable "random-looking" bytes for a label (the label is the documentation)
    return hashlib.sha256(b"hexiao vectors: " + label.encode()).digest()[:n]


# The session of the message vectors (also the first kdf vector).
DEVICE_KEY = bytes(range(32))
HOST_NONCE = bytes(range(0xA0, 0xB0))
DEVICE_NONCE = bytes(range(0xB0, 0xC0))
D2H_KEY, H2D_KEY = crypto.session_keys(DEVICE_KEY, HOST_NONCE, DEVICE_NONCE)
KID = bytes.fromhex("e6614103e7452d2f")  # device id: an RP2040 flash unique id
OTHER_KEY = _fixed("another device's key", 32)
AAD = b"hexiao lane 07"  # a deployment binding every frame to its lane
FIRMWARE = "hexiao-fw 0.1.0"

Json = Any


def to_json(v: Any) -> Json:
    """hexiao's named message form as JSON: bytes become hex strings, tuples lists, and
    integer map keys (health link counters) their decimal strings, as JSON requires."""
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).hex()
    if isinstance(v, (list, tuple)):
        return [to_json(x) for x in v]
    if isinstance(v, dict):
        return {str(k): to_json(x) for k, x in v.items()}
    return v


def to_list(v: Any) -> Any:
    # decoded messages hold lists where a sender may have written tuples
    if isinstance(v, (list, tuple)):
        return [to_list(x) for x in v]
    if isinstance(v, dict):
        return {k: to_list(x) for k, x in v.items()}
    return v


def _named(msg: dict[str, Any]) -> Json:
    # "type" first, then the fields in table order
    out = {"type": msg["type"]}
    out.update((k, v) for k, v in msg.items() if k != "type")
    return to_json(out)


def key_for(msg_type: str, counter: int, direction: str | None = None) -> bytes:
    """The receiver's key for a frame: the device key in the handshake epoch (counter 0), else
    the session key of the direction (`direction` chooses it for types sent both ways)."""
    _, d, _, _ = messages.info(msg_type)
    if counter == 0:
        return DEVICE_KEY
    d = direction or d
    if d not in (messages.D2H, messages.H2D):
        raise ValueError(f"{msg_type} goes both ways: say which")
    return D2H_KEY if d == messages.D2H else H2D_KEY


def wire_of(body: bytes) -> bytes:
    """COBS(body) || 0x00, without frame.encode's size guard (oversize vectors need that)."""
    return pure_cobs.encode(body) + b"\x00"


def framed(c: bytes) -> bytes:
    return wire_of(c + frame.crc32_le(c))


def frame_vector(
    name: str, description: str, *, key: bytes, alg: int, c: bytes, wire: bytes | None = None,
    aad: bytes = b"", seen: list[int] | None = None, error: str | None = None,
    expect: dict[str, Any] | None = None,
) -> Json:
    """One frame vector; verify_frame must give `error` (None: valid, decoding to `expect`)."""
    if wire is None:
        wire = framed(c)
    got_msg = None
    try:
        _, got_msg = link.verify_frame(wire, key, alg, aad, seen or ())
        got = None
    except ProtocolError as e:
        got = e.code
    if got != error:
        raise VectorError(
            f"{name}: verify_frame gives {got or 'valid'}, the vector intends {error or 'valid'}"
        )
    if expect is not None and got_msg != to_list(expect):
        raise VectorError(f"{name}: decodes to {got_msg!r}, built from {expect!r}")
    # the wire frames exactly `cose` whenever it deframes at all
    if wire.endswith(b"\x00") and wire.count(0) == 1:
        try:
            deframed = frame.decode(wire[:-1])
        except ProtocolError:
            deframed = None
        if deframed is not None and deframed != c:
            raise VectorError(f"{name}: the wire does not frame the vector's cose")
    if error is None:
        message = _named(got_msg)
    elif error in AFTER_DECODE:
        message = _named(messages.decode(cose.parse(c).payload))
    else:
        message = None
    v = {
        "name": name, "description": description, "kind": "frame", "key": key.hex(), "alg": alg,
        "external_aad": aad.hex(),
    }
    if seen is not None:
        v["context"] = {"seen": list(seen)}
    v.update(cose=c.hex(), wire=wire.hex(), message=message, valid=error is None)
    if error is not None:
        v["error"] = error
    return v


def mac0(msg: dict[str, Any], counter: int, *, key: bytes, alg: int = 5, aad: bytes = b"",
         kid: bytes = KID) -> bytes:
    return cose.mac0(key, alg, kid, counter, messages.encode(msg), aad)


def message_vector(
    name: str, description: str, msg: dict[str, Any], counter: int, *, alg: int = 5,
    aad: bytes = b"", direction: str | None = None, seen: list[int] | None = None,
    kid: bytes = KID,
) -> Json:
    key = key_for(msg["type"], counter, direction)
    try:
        c = mac0(msg, counter, key=key, alg=alg, aad=aad, kid=kid)
    except ValueError as e:
        raise VectorError(f"{name}: the implementation refuses to encode it: {e}") from None
    v = frame_vector(name, description, key=key, alg=alg, c=c, aad=aad, seen=seen, expect=msg)
    if frame.encode(c) != bytes.fromhex(v["wire"]):
        raise VectorError(f"{name}: frame.encode disagrees with the vector's wire")
    return v


# -- kdf --------------------------------------------------------------------------------------

def kdf_vector(name: str, description: str, device_key: bytes, host_nonce: bytes,
               device_nonce: bytes) -> Json:
    d2h, h2d = crypto.session_keys(device_key, host_nonce, device_nonce)
    return {
        "name": name, "description": description, "kind": "kdf", "device_key": device_key.hex(),
        "host_nonce": host_nonce.hex(), "device_nonce": device_nonce.hex(), "d2h_key": d2h.hex(),
        "h2d_key": h2d.hex(),
    }


def kdf_vectors() -> list[Json]:
    return [
        kdf_vector("kdf_session", "The session of the message vectors: their d2h and h2d keys.",
                   DEVICE_KEY, HOST_NONCE, DEVICE_NONCE),
        kdf_vector("kdf_all_zero", "All-zero device key and nonces.", bytes(32), bytes(16),
                   bytes(16)),
        kdf_vector("kdf_all_ff", "All-0xff device key and nonces.", b"\xff" * 32, b"\xff" * 16,
                   b"\xff" * 16),
        kdf_vector("kdf_nonces_swapped",
                   "kdf_session with the two nonces swapped: salt = host_nonce || device_nonce, "
                   "so the order matters and the keys differ.",
                   DEVICE_KEY, DEVICE_NONCE, HOST_NONCE),
        kdf_vector("kdf_other_device", "Another device key with unrelated nonces.", OTHER_KEY,
                   _fixed("host nonce 2", 16), _fixed("device nonce 2", 16)),
    ]


# -- valid messages -----------------------------------------------------------------------------

GB18030_QR = "核销 代金券 ¥20 券码 123456789012".encode("gb18030")
SLIP = b"\x1b@" + "核销成功 代金券 ¥20.00\n".encode("gb18030") + b"\x1dV\x01"


def _largest_rules() -> dict[str, Any]:
    # a rule set at its limits: 8 rules, every field at its limit
    rule = {"action": 1, "symbologies": ["]Q1", "]C0", "]E0", "]d2"],
            "min_len": 0xFFFF, "max_len": 0xFFFF, "prefix": b"\xff" * 16, "check": 1}
    return {"type": "rules", "version": 0xFFFF_FFFF, "default": 2, "rules": [rule] * 8}


def _largest_verdict() -> dict[str, Any]:
    # the largest valid message of v1 (every one fits a frame): a verdict with a full slip
    slip = (SLIP * 64)[:768]
    return {"type": "verdict", "scan_id": 0xFFFF_FFFF, "outcome": 15, "beep": 15, "led": 15,
            "text": "核销成功 代金券 满100减20 ¥20.00"[:16], "slip": slip}


def message_vectors() -> list[Json]:
    V = message_vector
    hello = {"type": "hello", "versions": [1], "nonce": DEVICE_NONCE, "firmware": FIRMWARE,
             "board": "rp2040"}
    scan = {"type": "scan", "scan_id": 1, "symbology": "]Q1", "data": GB18030_QR,
            "time_ms": 61_250}
    rule_coupon = {"action": 1, "symbologies": ["]Q1", "]C0"], "min_len": 12, "max_len": 12,
                   "check": 0}
    out = [
        # handshake epoch: counter 0, device key
        V("hello", "Device hello: protocol versions, its nonce, firmware and board.", hello, 0),
        V("hello_reset_cause", "Hello with the optional reset cause, from an ESP32-S3.",
          {**hello, "board": "esp32s3", "reset_cause": "watchdog"}, 0),
        V("hello_future_versions",
          "Hello offering versions 1 and 2: the common version is 1, so it is accepted.",
          {**hello, "versions": [1, 2]}, 0),
        V("hello_alg4", "Hello MAC'd with HMAC 256/64 (alg 4, 8-byte tag).", hello, 0, alg=4),
        V("welcome", "Host welcome: chosen version and both nonces (the kdf_session inputs).",
          {"type": "welcome", "version": 1, "host_nonce": HOST_NONCE,
           "device_nonce": DEVICE_NONCE}, 0),
        V("welcome_host_time", "Welcome with the optional host wall-clock time (ms since 1970).",
          {"type": "welcome", "version": 1, "host_nonce": HOST_NONCE,
           "device_nonce": DEVICE_NONCE, "host_time_ms": 1_732_521_600_000}, 0),
        V("nack_handshake_no_session",
          "Host to device in the handshake epoch (counter 0, device key): no session, say hello.",
          {"type": "nack", "code": 13}, 0),
        V("nack_handshake_version", "Handshake nack: no common protocol version, with a detail.",
          {"type": "nack", "code": 14, "detail": "no common version"}, 0),
        # session, device to host (d2h key)
        V("scan_qr_gb18030", "A WeChat coupon QR whose payload is GB18030 text (AIM ]Q1).",
          scan, 1),
        V("scan_code128", "A 12-digit WeChat card code as Code 128 (]C0).",
          {"type": "scan", "scan_id": 2, "symbology": "]C0", "data": b"123456789012",
           "time_ms": 64_020}, 2),
        V("scan_upc_alg4", "A UPC-A product barcode (]E0) under alg 4.",
          {"type": "scan", "scan_id": 3, "symbology": "]E0", "data": b"012345678905",
           "time_ms": 70_001}, 3, alg=4),
        V("scan_gs1_datamatrix_aad",
          "GS1 DataMatrix (]d2) with a GS separator, MAC'd with a non-empty external AAD.",
          {"type": "scan", "scan_id": 4, "symbology": "]d2",
           "data": b"0109501101530003\x1d17250101", "time_ms": 70_950}, 4, aad=AAD),
        V("scan_empty_data", "A scan with zero bytes of data (allowed: min length 0).",
          {"type": "scan", "scan_id": 5, "symbology": "]Q1", "data": b"", "time_ms": 71_000}, 5),
        V("health", "Device health: uptime, reset cause, firmware, heap, link and app counters.",
          {"type": "health", "uptime_ms": 86_400_123, "reset_cause": "power_on",
           "firmware": FIRMWARE, "heap_free": 20_480, "heap_peak": 45_056,
           "link": {1: 3, 11: 0, 64: 1_200, 65: 1_210, 66: 4, 68: 2},  # crc mac rx tx retr sess
           "app": {"scans": 310, "products": 290, "coupons": 20}}, 6),
        V("logs", "Two log entries [seq, uptime ms, level, event] and the next sequence number.",
          {"type": "logs", "entries": [[1, 1_000, 6, "boot"], [2, 1_500, 4, "uart overrun"]],
           "next": 3}, 7),
        V("logs_empty", "No log entries since the requested sequence number.",
          {"type": "logs", "entries": [], "next": 3}, 8),
        V("config", "Device config: bool, int (negative too), text and bytes values.",
          {"type": "config", "values": {"beep_volume": 3, "hid_layout": "us",
                                        "offline_verdict": True, "suffix": b"\r",
                                        "clock_skew_ms": -15}}, 9),
        V("ack_d2h", "Device acknowledges host frame 7.", {"type": "ack", "counter": 7}, 10,
          direction=messages.D2H),
        V("nack_d2h", "Device refuses host frame 8, with the error code number and a detail.",
          {"type": "nack", "counter": 8, "code": 16, "detail": "verdict: text"}, 11,
          direction=messages.D2H),
        V("ping_d2h", "Device ping with data.", {"type": "ping", "data": b"\x01\x02\x03\x04"},
          200, direction=messages.D2H),
        V("pong_d2h", "Device pong without data.", {"type": "pong"}, 300,
          direction=messages.D2H),
        V("fw_status_resume", "Device holds 1536 bytes of a transfer: resume there.",
          {"type": "fw_status", "state": 1, "offset": 1_536, "digest": bytes(range(32)),
           "version": "0.2.0"}, 301, direction=messages.D2H),
        V("fw_status_refused", "The last update was refused, and why (nothing held).",
          {"type": "fw_status", "state": 6, "offset": 0,
           "why": "bad signature: not signed by this device's key"}, 302,
          direction=messages.D2H),
        V("fw_result", "Verified: the device switches to the new firmware now.",
          {"type": "fw_result", "ok": True, "why": "verified: switching to 0.2.0"}, 303,
          direction=messages.D2H),
        # session, host to device (h2d key)
        V("verdict_accepted", "Coupon redeemed: ok beep, green LED, Chinese text.",
          {"type": "verdict", "scan_id": 1, "outcome": 0, "beep": 1, "led": 1,
           "text": "代金券 ¥20.00 已核销"}, 1),
        V("verdict_refused_slip",
          "Coupon refused, with an ESC/POS slip (GB18030) for the device's printer.",
          {"type": "verdict", "scan_id": 2, "outcome": 1, "beep": 2, "led": 2,
           "text": "券已使用 Already redeemed", "slip": SLIP}, 2),
        V("verdict_offline_alg4_aad", "Host offline verdict under alg 4 with external AAD.",
          {"type": "verdict", "scan_id": 3, "outcome": 2, "beep": 3, "led": 3,
           "text": "后台离线 Backend offline"}, 3, alg=4, aad=AAD),
        V("keys", "Type a discount: F9, the amount, Enter (HID usage and modifier pairs).",
          {"type": "keys", "macro_id": 3, "items": [[0x42, 0], "20", [0x28, 0]]}, 4),
        V("keys_delay", "Keys with the optional inter-key delay and a shifted key.",
          {"type": "keys", "macro_id": 4, "items": ["20%", [0x04, 0x02]], "delay_ms": 20}, 5),
        V("print", "The last ESC/POS chunk of a print job.",
          {"type": "print", "job_id": 9, "seq": 0, "last": True, "data": SLIP}, 6),
        V("print_more", "A middle chunk of a print job (last false).",
          {"type": "print", "job_id": 9, "seq": 1, "last": False, "data": b"\x1b@"}, 7),
        V("rules", "Classifier rules: 12-digit QR/Code 128 coupons, EAN/UPC products, a prefix.",
          {"type": "rules", "version": 2, "default": 0,
           "rules": [rule_coupon, {"action": 0, "symbologies": ["]E0"], "check": 1},
                     {"action": 1, "prefix": b"HX"}]}, 8),
        V("rules_empty", "No rules: everything takes the default action (ignore).",
          {"type": "rules", "version": 3, "default": 2, "rules": []}, 9),
        V("health_get", "Ask for health (no fields).", {"type": "health_get"}, 10),
        V("logs_get", "Ask for logs from the start.", {"type": "logs_get"}, 11),
        V("logs_get_since", "Ask for at most 8 logs since sequence 100.",
          {"type": "logs_get", "since": 100, "max": 8}, 255),
        V("config_get", "Ask for the whole config.", {"type": "config_get"}, 256),
        V("config_get_keys", "Ask for two config values.",
          {"type": "config_get", "keys": ["beep_volume", "hid_layout"]}, 65_535),
        V("config_set", "Set config values of each kind (bool, int, text, bytes).",
          {"type": "config_set", "values": {"beep_volume": 2, "suffix": b"\t",
                                            "offline_verdict": False, "hid_layout": "us",
                                            "clock_skew_ms": -480}}, 65_536),
        V("ack_h2d", "Host acknowledges device frame 1 (the counter 0x01000000 needs 4 bytes).",
          {"type": "ack", "counter": 1}, 0x0100_0000, direction=messages.H2D),
        V("nack_h2d_poke", "Host saw line noise: a nack without a counter (code crc).",
          {"type": "nack", "code": 1}, 0xFFFF_FFFE, direction=messages.H2D),
        V("ping_h2d", "Host ping without data, at the last counter of a session.",
          {"type": "ping"}, 0xFFFF_FFFF, direction=messages.H2D),
        V("pong_h2d", "Host pong echoing data.", {"type": "pong", "data": b"\xde\xad\xbe\xef"},
          12, direction=messages.H2D, alg=4),
        # firmware update (SPEC 6.8)
        V("fw_offer", "Offer a signed bundle: image digest and size, its manifest's size, the "
          "Ed25519 signature, board, version, counter.",
          {"type": "fw_offer", "digest": bytes(range(32)), "size": 61_440,
           "manifest_size": 3_912, "signature": bytes(range(64, 128)), "board": "sim",
           "version": "0.2.0", "counter": 7}, 30),
        V("fw_chunk", "The 768 bytes of the image at offset 1536 (the third chunk).",
          {"type": "fw_chunk", "seq": 2, "offset": 1_536, "data": bytes(range(256)) * 3}, 31),
        V("fw_query", "Ask what the device holds of an update.", {"type": "fw_query"}, 32),
        V("fw_commit", "Install the transfer with this digest.",
          {"type": "fw_commit", "digest": bytes(range(32))}, 33),
        V("rules_largest", "A rule set at its limits: 8 rules, every field at its limit.",
          _largest_rules(), 20),
        V("verdict_largest", "The largest valid message: a verdict with a 768-byte slip.",
          _largest_verdict(), 21),
        V("verdict_supplementary_char",
          "Verdict text with a CJK Extension B character (4 bytes in UTF-8): 𠮷野家.",
          {"type": "verdict", "scan_id": 6, "outcome": 4, "beep": 1, "led": 4,
           "text": "𠮷野家 会员卡 已领取"}, 21),
        V("verdict_text_48_bytes",
          "Text at its limit of 48 UTF-8 bytes: 12 characters of 4 bytes (CJK Extension B).",
          {"type": "verdict", "scan_id": 7, "outcome": 5, "beep": 0, "led": 0,
           "text": "".join(chr(0x20000 + i) for i in range(12))}, 23),
        V("health_extremes", "Health at the bounds: uptime 2**64 - 1, zero heap, no counters.",
          {"type": "health", "uptime_ms": 2**64 - 1, "reset_cause": "", "firmware": "x",
           "heap_free": 0, "heap_peak": 0xFFFF_FFFF, "link": {}, "app": {}}, 13),
        V("config_set_extremes", "Config ints at the bounds of a 64-bit signed int.",
          {"type": "config_set", "values": {"min": -(2**63), "max": 2**63 - 1}}, 22),
        V("ack_welcome", "The device's ack of the welcome (counter 0), its first session frame.",
          {"type": "ack", "counter": 0}, 1, direction=messages.D2H),
        V("scan_kid_16", "A scan from a device whose id has the maximal 16 bytes.",
          {**scan, "scan_id": 9}, 14, kid=b"HXE6614103E7452D"),
        V("scan_kid_1", "A scan from a device whose id has a single byte.",
          {**scan, "scan_id": 10}, 15, kid=b"\x07"),
        # stateful: the receiver has seen some counters of this session
        V("scan_late_in_window",
          "Counter 4 after 5 and 6: a late frame within the window, not seen yet.",
          {**scan, "scan_id": 40}, 4, seen=[5, 6]),
        V("scan_window_edge",
          "Counter 5 after 20: the oldest counter the 16-frame window still tracks.",
          {**scan, "scan_id": 41}, 5, seen=[20]),
    ]
    return out


# -- invalid frames ----------------------------------------------------------------------------

LONG_TEXT = "代金券已核销，欢迎再次光临本店谢谢"  # 17 characters, 51 bytes of UTF-8
BASE_SCAN = {"type": "scan", "scan_id": 7, "symbology": "]Q1", "data": b"123456789012",
             "time_ms": 5000}
E = cbor.dumps


def _map(pairs: list[tuple[bytes, bytes]], count: int | None = None) -> bytes:
    # a CBOR map from encoded (key, value) pairs, in the order given
    return cbor.head(5, len(pairs) if count is None else count) + b"".join(k + v for k, v in pairs)


def _scan_pairs(**replace: bytes) -> list[tuple[bytes, bytes]]:
    vals = {"type": E(3), "scan_id": E(7), "symbology": E("]Q1"), "data": E(b"123456789012"),
            "time_ms": E(5000)}
    vals.update(replace)
    return [(E(i), vals[n]) for i, n in enumerate(vals)]


def _raw_cose(key: bytes, prot: bytes, payload: bytes, *, aad: bytes = b"", tag_len: int = 32,
              unprot: bytes = b"\xa0", start: bytes = b"\xd1\x84") -> bytes:
    # a COSE_Mac0 assembled by hand, with a correct MAC over whatever protected bytes it has
    tag = crypto.hmac_sha256(key, cose.mac_structure(prot, payload, aad))[:tag_len]
    return (start + cbor.head(2, len(prot)) + prot + unprot + cbor.head(2, len(payload)) + payload
            + cbor.head(2, len(tag)) + tag)


def _prot(pairs: list[tuple[Any, Any]]) -> bytes:
    return _map([(E(k), E(v)) for k, v in pairs])


def _cobs_codes(raw: bytes) -> list[int]:
    pos, out = 0, []
    while pos < len(raw):
        out.append(pos)
        pos += raw[pos]
    return out


def _flip(data: bytes, i: int, mask: int = 0x01) -> bytes:
    b = bytearray(data)
    b[i] ^= mask
    return bytes(b)


def error_vectors() -> list[Json]:
    K = D2H_KEY
    base = mac0(BASE_SCAN, 5, key=K)
    base_wire = framed(base)
    raw = base_wire[:-1]
    codes = _cobs_codes(raw)
    payload = messages.encode(BASE_SCAN)
    prot = cose.protected_header(5, KID, 5)
    body = base + frame.crc32_le(base)

    def F(name: str, description: str, error: str, c: bytes, **kw: Any) -> Json:
        kw.setdefault("key", K)
        kw.setdefault("alg", 5)
        return frame_vector(name, description, error=error, c=c, **kw)

    def P(name: str, description: str, error: str, pay: bytes, counter: int = 5) -> Json:
        # a payload problem behind a correct MAC: only the payload is wrong
        return F(name, description, error, cose.mac0(K, 5, KID, counter, pay))

    def H(name: str, description: str, error: str, prot_bytes: bytes, **kw: Any) -> Json:
        # a header problem behind a MAC that is correct for those header bytes
        return F(name, description, error, _raw_cose(K, prot_bytes, payload, **kw))

    hello = {"type": "hello", "versions": [1], "nonce": DEVICE_NONCE, "firmware": FIRMWARE,
             "board": "rp2040"}
    welcome = {"type": "welcome", "version": 1, "host_nonce": HOST_NONCE,
               "device_nonce": DEVICE_NONCE}
    big = (b"\x1b@" + b"x" * 98) * 11  # zero-free: COBS adds a byte per 254
    zeroish = (b"\x00" + b"y" * 99) * 11  # a zero every 100 bytes: COBS adds a byte per zero
    oversize_decoded = _oversize_cose(zeroish, 1025)
    oversize_wire = _oversize_cose(big, None)

    out = [
        # line noise: framing
        F("bad_crc", "CRC-32 of a valid frame changed (re-COBS'd): line noise.", "crc", base,
          wire=wire_of(_flip(body, len(body) - 1, 0xFF))),
        F("bad_crc_bitflip", "One payload bit flipped in transit; the CRC no longer matches.",
          "crc", base, wire=wire_of(_flip(body, len(base) - 40))),
        F("cobs_zero_inside",
          "A COBS code byte replaced by 0x00 (a zero-length code): the zero splits the frame.",
          "cobs", base, wire=raw[: codes[1]] + b"\x00" + raw[codes[1] + 1 :] + b"\x00"),
        F("cobs_block_past_end", "The last COBS code points one byte past the delimiter.",
          "cobs", base, wire=raw[: codes[-1]] + bytes((len(raw) - codes[-1] + 1,))
          + raw[codes[-1] + 1 :] + b"\x00"),
        F("cobs_cut", "The last byte before the delimiter lost: the last block runs past the end.",
          "cobs", base, wire=raw[:-1] + b"\x00"),
        F("oversize_decoded",
          "1025 bytes of COSE + CRC (one over MAX_FRAME) whose COBS form still fits MAX_WIRE.",
          "oversize", oversize_decoded),
        F("oversize_wire", "A frame far longer than MAX_WIRE before its delimiter.", "oversize",
          oversize_wire),
        F("truncated_short_frame",
          "Four bytes between delimiters: the CRC of an empty COSE, and no COSE.", "truncated",
          b"", wire=wire_of(frame.crc32_le(b""))),
        F("truncated_no_delimiter", "A frame without its closing 0x00.", "truncated", base,
          wire=raw),
        F("truncated_empty", "Only a delimiter: no frame at all.", "truncated", b"",
          wire=b"\x00"),
        # truncated CBOR behind a valid CRC
        F("truncated_cose_tag", "COSE cut inside its tag; CRC recomputed over the cut bytes.",
          "truncated", base[:-10]),
        F("truncated_cose_payload", "COSE cut inside its payload; CRC recomputed.", "truncated",
          base[: len(base) - 32 - 2 - 4]),
        F("truncated_cose_head", "Only the tag and the array head remain.", "truncated",
          base[:2]),
        P("truncated_payload_cbor",
          "The payload map announces 5 pairs and holds 4 (payload MAC'd as is).", "truncated",
          _map(_scan_pairs()[:4], count=5)),
        # forgery / wrong key
        F("mac_tampered_tag", "One bit of the tag flipped (CRC recomputed).", "mac",
          _flip(base, len(base) - 1)),
        F("mac_tampered_payload", "The scan's data changed after MACing (CRC recomputed).", "mac",
          base.replace(b"123456789012", b"123456789013")),
        F("mac_tampered_protected",
          "The counter in the protected header changed from 5 to 6 (CRC recomputed).", "mac",
          base.replace(prot, cose.protected_header(5, KID, 6))),
        F("mac_tampered_tag_alg4", "Alg 4: one bit of the 8-byte tag flipped.", "mac",
          _flip(mac0(BASE_SCAN, 5, key=K, alg=4), -1), alg=4),
        F("wrong_key_direction",
          "A frame MAC'd with the h2d key, checked with the d2h key (reflected frame).", "mac",
          mac0(BASE_SCAN, 5, key=H2D_KEY)),
        F("wrong_key_device",
          "A hello MAC'd with another device's key under this device's kid (not paired).", "mac",
          mac0(hello, 0, key=OTHER_KEY), key=DEVICE_KEY),
        F("wrong_key_aad", "MAC'd with external AAD 'hexiao lane 07', checked with 'lane 08'.",
          "mac", mac0(BASE_SCAN, 5, key=K, aad=AAD), aad=b"hexiao lane 08"),
        F("wrong_key_missing_aad", "MAC'd with external AAD, checked without.", "mac",
          mac0(BASE_SCAN, 5, key=K, aad=AAD)),
        # CBOR of the payload: outside the profile, or not deterministic (MAC'd as is)
        P("non_canonical_int", "scan_id 7 encoded in two bytes (0x18 0x07).", "non_canonical",
          _map(_scan_pairs(scan_id=b"\x18\x07"))),
        P("non_canonical_length", "The data length in a non-shortest head (0x58 0x0c).",
          "non_canonical", _map(_scan_pairs(data=b"\x58\x0c123456789012"))),
        P("non_canonical_key_order", "Map keys 2 and 1 swapped.", "non_canonical",
          _map([_scan_pairs()[i] for i in (0, 2, 1, 3, 4)])),
        P("non_canonical_duplicate_key", "Key 4 (time_ms) twice.", "non_canonical",
          _map([*_scan_pairs(), (E(4), E(5000))])),
        P("non_canonical_indefinite_map", "The payload map in indefinite-length form.",
          "non_canonical", b"\xbf" + _map(_scan_pairs())[1:] + b"\xff"),
        P("non_canonical_indefinite_bytes", "data as an indefinite-length byte string.",
          "non_canonical", _map(_scan_pairs(data=b"\x5f\x46123456\x46789012\xff"))),
        F("non_canonical_tag17_long", "Tag 17 in its two-byte form (0xd8 0x11).",
          "non_canonical", b"\xd8\x11" + base[1:]),
        F("non_canonical_cose_length", "The payload bstr's length in a non-shortest head.",
          "non_canonical", base.replace(b"\xa0" + cbor.head(2, len(payload)),
                                        b"\xa0\x59" + len(payload).to_bytes(2, "big"), 1)),
        H("non_canonical_protected",
          "alg in the protected header as 0x18 0x05 (MAC over those bytes).", "non_canonical",
          b"\xa3\x01\x18\x05" + prot[3:]),
        H("non_canonical_protected_order", "Protected header keys in the order 4, 1, 6.",
          "non_canonical", _prot([(4, KID), (1, 5), (6, b"\x05")])),
        P("cbor_float", "time_ms as a float (0xfb ...).", "cbor",
          _map(_scan_pairs(time_ms=b"\xfb\x40\xb3\x88\x00\x00\x00\x00\x00"))),
        P("cbor_tag_in_payload", "data wrapped in tag 24 (encoded CBOR).", "cbor",
          _map(_scan_pairs(data=b"\xd8\x18" + E(b"123456789012")))),
        P("cbor_bad_utf8", "symbology is not valid UTF-8.", "cbor",
          _map(_scan_pairs(symbology=b"\x63]\xff1"))),
        P("cbor_overlong_utf8", "symbology holds an overlong UTF-8 form of '/' (C0 AF).", "cbor",
          _map(_scan_pairs(symbology=b"\x62\xc0\xaf"))),
        P("cbor_surrogate_utf8", "symbology holds an encoded surrogate (ED A0 80).", "cbor",
          _map(_scan_pairs(symbology=b"\x63\xed\xa0\x80"))),
        P("cbor_trailing_bytes", "A byte after the payload map.", "cbor",
          _map(_scan_pairs()) + b"\x00"),
        # COSE structure and headers
        F("cose_untagged", "An untagged COSE_Mac0 array.", "cose", base[1:]),
        F("cose_other_tag", "Tag 18 (COSE_Sign1) instead of 17.", "cose", b"\xd2" + base[1:]),
        F("cose_array_of_3", "Tag 17 over an array of 3 (no tag).", "cose",
          b"\xd1\x83" + base[2 : len(base) - 34]),
        F("cose_detached_payload", "The payload is nil (detached): not allowed.", "cose",
          _raw_cose(K, prot, b"").replace(b"\xa0\x40", b"\xa0\xf6", 1)),
        H("cose_tag_length", "Alg 5 with an 8-byte tag.", "cose", prot, tag_len=8),
        H("header_missing_kid", "Protected header without kid (4).", "header",
          _prot([(1, 5), (6, b"\x05")])),
        H("header_extra_parameter", "Protected header with content type (3) as well.", "header",
          _prot([(1, 5), (3, 0), (4, KID), (6, b"\x05")])),
        H("header_piv_non_shortest", "Partial IV 00 05: the counter not in its shortest form.",
          "header", _prot([(1, 5), (4, KID), (6, b"\x00\x05")])),
        H("header_piv_too_long", "A 5-byte partial IV (counters are 32-bit).", "header",
          _prot([(1, 5), (4, KID), (6, b"\x01\x00\x00\x00\x00")])),
        H("header_piv_int", "Partial IV as an integer instead of a byte string.", "header",
          _prot([(1, 5), (4, KID), (6, 5)])),
        H("header_kid_empty", "An empty kid.", "header", _prot([(1, 5), (4, b""), (6, b"\x05")])),
        H("header_kid_too_long", "A 17-byte kid.", "header",
          _prot([(1, 5), (4, b"k" * 17), (6, b"\x05")])),
        H("header_unprotected", "kid in the unprotected header, which must be empty.", "header",
          prot, unprot=_prot([(4, KID)])),
        H("header_not_a_map", "The protected header is an array.", "header",
          E([5, KID, b"\x05"])),
        # algorithms
        F("alg_mismatch_4", "A correct alg 4 frame where the session uses alg 5.", "alg",
          mac0(BASE_SCAN, 5, key=K, alg=4)),
        F("alg_mismatch_5", "A correct alg 5 frame where the session uses alg 4.", "alg",
          base, alg=4),
        H("alg_unsupported_hmac384", "alg 6 (HMAC 384/384, 48-byte tag): not in the profile.",
          "alg", _prot([(1, 6), (4, KID), (6, b"\x05")]), tag_len=48),
        H("alg_unsupported_es256", "alg -7 (ES256): not a MAC.", "alg",
          _prot([(1, -7), (4, KID), (6, b"\x05")])),
        # replay (the receiver has seen the counters in context.seen)
        F("replay_duplicate", "Counter 5 again after 5.", "replay", base, seen=[4, 5]),
        F("replay_too_old", "Counter 5 after 21: older than the 16-frame window.", "replay",
          base, seen=[21]),
        # message types and fields (payload MAC'd as is)
        P("unknown_type_99", "Type 99: not defined in version 1.", "unknown_type",
          _map([(E(0), E(99)), (E(1), E(7))])),
        P("unknown_type_0", "Type 0 is not a message type.", "unknown_type", _map([(E(0), E(0))])),
        P("unknown_type_missing", "A map without key 0 (no type).", "unknown_type",
          _map(_scan_pairs()[1:])),
        P("unknown_type_text", "The type as text, \"scan\".", "unknown_type",
          _map([(E(0), E("scan")), *_scan_pairs()[1:]])),
        P("schema_unknown_key", "A scan with an extra key 5.", "schema",
          _map([*_scan_pairs(), (E(5), E(1))])),
        P("schema_wrong_type", "scan_id as text \"7\".", "schema",
          _map(_scan_pairs(scan_id=E("7")))),
        P("schema_bool_for_int", "scan_id as true.", "schema",
          _map(_scan_pairs(scan_id=E(True)))),
        P("schema_negative", "scan_id -1.", "schema", _map(_scan_pairs(scan_id=E(-1)))),
        P("schema_missing_field", "A scan without data (3).", "schema",
          _map([p for i, p in enumerate(_scan_pairs()) if i != 3])),
        P("schema_too_long", "symbology of 5 characters (at most 4).", "schema",
          _map(_scan_pairs(symbology=E("]Q1Q1")))),
        P("schema_text_too_long",
          "Verdict text of 17 Chinese characters: 51 UTF-8 bytes, over the limit of 48 bytes.",
          "schema", _map([(E(0), E(4)), (E(1), E(8)), (E(2), E(0)), (E(3), E(1)), (E(4), E(1)),
                          (E(5), E(LONG_TEXT))])),
        P("schema_not_a_map", "The payload is an array.", "schema", E([3, 7])),
        # epochs and versions (verified and decoded, then refused)
        F("no_session_scan", "A scan at counter 0 under the device key: before any handshake.",
          "no_session", mac0(BASE_SCAN, 0, key=DEVICE_KEY), key=DEVICE_KEY),
        F("no_session_ack", "An ack at counter 0 under the device key.", "no_session",
          mac0({"type": "ack", "counter": 0}, 0, key=DEVICE_KEY), key=DEVICE_KEY),
        F("handshake_hello_in_session", "A hello at counter 3 under the d2h session key.",
          "handshake", mac0(hello, 3, key=K)),
        F("handshake_welcome_in_session", "A welcome at counter 1 under the h2d session key.",
          "handshake", mac0(welcome, 1, key=H2D_KEY), key=H2D_KEY),
        F("version_hello_2", "A hello offering only version 2.", "version",
          mac0({**hello, "versions": [2]}, 0, key=DEVICE_KEY), key=DEVICE_KEY),
        F("version_hello_none", "A hello offering no version at all.", "version",
          mac0({**hello, "versions": []}, 0, key=DEVICE_KEY), key=DEVICE_KEY),
        F("version_welcome_2", "A welcome choosing version 2.", "version",
          mac0({**welcome, "version": 2}, 0, key=DEVICE_KEY), key=DEVICE_KEY),
    ]
    return out


def _oversize_cose(data: bytes, total: int | None) -> bytes:
    # a correctly MAC'd print frame too big for the link (never decoded: size is checked first);
    # `total`: trim data so that COSE + CRC is exactly that many bytes
    def build(d: bytes) -> bytes:
        pay = _map([(E(0), E(6)), (E(1), E(1)), (E(2), E(0)), (E(3), E(True)), (E(4), E(d))])
        return cose.mac0(D2H_KEY, 5, KID, 9, pay)

    c = build(data)
    if total is not None:
        c = build(data[: len(data) - (len(c) + 4 - total)])
        if len(c) + 4 != total:
            raise VectorError("oversize vector has the wrong size")
    return c


# -- files ----------------------------------------------------------------------------------------

def build() -> dict[str, str]:
    """File name -> file text, for every vector file."""
    files = {"kdf.json": kdf_vectors(), "messages.json": message_vectors(),
             "errors.json": error_vectors()}
    names: set[str] = set()
    for vectors in files.values():
        for v in vectors:
            if v["name"] in names:
                raise VectorError(f"duplicate vector name {v['name']}")
            names.add(v["name"])
    return {fn: _dump(vs) for fn, vs in files.items()}


def _dump(vectors: list[Json]) -> str:
    lines = [json.dumps(v, ensure_ascii=False) for v in vectors]
    return '{"vectors": [\n' + ",\n".join(lines) + "\n]}\n"


def write(directory: Path = VECTORS_DIR) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    files = build()
    for stale in directory.glob("*.json"):
        if stale.name not in files:
            stale.unlink()
    for fn, text in files.items():
        (directory / fn).write_text(text, encoding="utf-8")
    return sorted(files)


def check(directory: Path = VECTORS_DIR) -> list[str]:
    """Names of the files that differ from a fresh generation (missing, extra or changed)."""
    files = build()
    on_disk = {p.name for p in directory.glob("*.json")}
    bad = on_disk - set(files)
    for fn, text in files.items():
        p = directory / fn
        if not p.exists() or p.read_text(encoding="utf-8") != text:
            bad.add(fn)
    return sorted(bad)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hexiao.tools.gen_vectors", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true",
                    help="compare a fresh generation with the files; exit 1 if they differ")
    ap.add_argument("--dir", type=Path, default=VECTORS_DIR, help="vectors directory")
    args = ap.parse_args(argv)
    try:
        if args.check:
            bad = check(args.dir)
            if bad:
                print(f"out of date: {', '.join(bad)} (run python -m hexiao.tools.gen_vectors)",
                      file=sys.stderr)
                return 1
            print("vectors up to date")
            return 0
        for fn in write(args.dir):
            n = (args.dir / fn).read_text(encoding="utf-8").count('\n{"name": ')
            print(f"wrote {args.dir / fn} ({n} vectors)")
    except VectorError as e:
        print(f"vector disagrees with the implementation: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
