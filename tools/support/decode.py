"""`hexiao decode FILE`: decode a link capture (capture.py's format) into frames, messages,
counters and a summary that tells line noise from MAC failures and replays.

Rules this module keeps:
- Verification follows the receiver's rules (SPEC 8.2): a session key is derived only from a
  handshake verified earlier in the same capture; without a key only the structure is checked,
  and the summary says so.
- Keys never appear in output; scanned codes are masked to their last 4 characters unless
  --show-codes.
- A truncated capture is decoded up to the cut and reported, never refused.

Exit codes of `hexiao decode`: 0 decoded (whatever the frames' verdicts); 1 the file cannot be
decoded (unreadable, not a capture, unsupported version) or a key option is bad; 2 usage error;
3 the capture is truncated: everything before the cut was decoded and reported.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import click
from hexiao.hostd.lanes.capture import D2H, H2D, CaptureError, kid_text, read_capture
from hexiao.protocol import codecs, frame, messages
from hexiao.protocol.crypto import session_keys
from hexiao.protocol.errors import ProtocolError
from hexiao.protocol.errors import name as error_name
from hexiao.protocol.replay import DUPLICATE, TOO_OLD, Window

NOISE = ("crc", "cobs", "truncated", "oversize")
STATUSES = ("ok", *NOISE, "cose", "mac", "replay", "payload", "unverified")
GAP_US = 1_000_000
EXIT_ERROR, EXIT_TRUNCATED = 1, 3
Keystore = Callable[[bytes], bytes | None]


@dataclass
class Session:
    """A session seen in the capture (a verified welcome). Keys never appear in output."""

    number: int
    kid: bytes
    host_nonce: bytes
    device_nonce: bytes
    t_us: int
    d2h_key: bytes = field(repr=False)
    h2d_key: bytes = field(repr=False)
    last: dict[str, int] = field(default_factory=lambda: {D2H: 0, H2D: 0}, repr=False)
    window: dict[str, Window] = field(
        default_factory=lambda: {D2H: Window(), H2D: Window()}, repr=False)


@dataclass
class Report:
    header: dict[str, Any]
    frames: list[dict[str, Any]]
    summary: dict[str, Any]
    sessions: list[Session]
    truncated: str | None
    mac_checked: bool


def mask_code(data: bytes, show: bool = False) -> str:
    """Coupon codes are shown by their last 4 characters only; shorter ones not at all."""
    text = data.decode("utf-8", "backslashreplace")
    if not show:
        text = "*" * len(text) if len(text) <= 4 else "*" * (len(text) - 4) + text[-4:]
    # control characters (GS1's group separator) made visible, one escape per character
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _plain(v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


class _Decoder:
    def __init__(self, keystore: Keystore | None, aad: bytes, show_codes: bool) -> None:
        self.keystore, self.aad, self.show = keystore, aad, show_codes
        self.deframer = {D2H: frame.Deframer(), H2D: frame.Deframer()}
        self.pending = {D2H: 0, H2D: 0}  # bytes of the frame being received, per direction
        self.sessions: list[Session] = []
        self.current: dict[bytes, Session] = {}
        self.hello: dict[bytes, bytes] = {}

    def feed(self, d: str, data: bytes) -> Iterator[tuple[int, Any]]:
        """(size, cose bytes or ProtocolError) of each frame that ends in data."""
        start = 0
        while start < len(data):  # one delimiter per feed: each result gets its frame's size
            end = data.find(b"\x00", start)
            piece = data[start:] if end < 0 else data[start : end + 1]
            start += len(piece)
            self.pending[d] += len(piece)
            for item in self.deframer[d].feed(piece):
                yield self.pending[d] - (end >= 0), item
            if end >= 0:
                self.pending[d] = 0

    def classify(self, d: str, c: bytes, t_us: int) -> dict[str, Any]:
        try:
            m = codecs.parse(bytes(c))
        except ProtocolError as e:
            return {"status": "cose", "error": e.code, "detail": e.detail}
        out: dict[str, Any] = {"alg": m.alg, "kid": kid_text(m.kid), "counter": m.counter}
        if self.keystore is None:
            return out | {"status": "unverified", "detail": "MAC not checked: no key given"}
        s = self.current.get(m.kid)
        if m.counter == 0:
            key = self.keystore(m.kid)
            if key is None:
                return out | {"status": "unverified", "detail": "no key for this device"}
            what = "the device key"
        elif s is None:
            return out | {"status": "unverified",
                          "detail": "no verified handshake earlier in the capture"}
        else:
            key, what = (s.d2h_key if d == D2H else s.h2d_key), f"the {d} session key"
        try:
            m.verify(key, self.aad)
        except ProtocolError:
            return out | {"status": "mac", "error": "mac",
                          "detail": f"MAC under {what} failed: wrong key or tampered"}
        try:
            msg = codecs.decode(m.payload)
            messages.check_epoch(m.counter, msg)
            if messages.info(msg["type"])[1] not in (d, messages.BOTH):
                raise ProtocolError("unknown_type", f"{msg['type']} is not sent {d}")
        except ProtocolError as e:
            if s is not None and m.counter:  # the receiver gives it the reliable slot too
                s.last[d] = max(s.last[d], m.counter)
            return out | {"status": "payload", "error": e.code, "detail": e.detail}
        out |= {"status": "ok", "message": self._show(msg)}
        if m.counter == 0:
            return out | self._handshake(m.kid, key, msg, t_us)
        return out | {"session": s.number} | self._fresh(s, d, m.counter, msg["type"])

    def _handshake(self, kid: bytes, key: bytes, msg: dict[str, Any], t_us: int) -> dict:
        t, s = msg["type"], self.current.get(kid)
        if t == "hello":
            again = self.hello.get(kid) == msg["nonce"]
            self.hello[kid] = msg["nonce"]
            return {"retransmit": True} if again else {}
        if t != "welcome":
            return {}
        hn, dn = msg["host_nonce"], msg["device_nonce"]
        if s is not None and (s.host_nonce, s.device_nonce) == (hn, dn):
            return {"retransmit": True, "session": s.number}
        s = Session(len(self.sessions) + 1, kid, hn, dn, t_us, *session_keys(key, hn, dn))
        self.sessions.append(s)
        self.current[kid] = s
        return {"session": s.number}

    @staticmethod
    def _fresh(s: Session, d: str, c: int, t: str) -> dict[str, Any]:
        # the receiver's rules (SPEC 8.2): reliable messages by the last counter, acks by a window
        if messages.info(t)[3]:
            if c == s.last[d]:
                return {"retransmit": True}
            if c < s.last[d]:
                return {"status": "replay", "error": "replay",
                        "detail": f"counter {c} is below the last message's ({s.last[d]})"}
            s.last[d] = c
        else:
            seen = s.window[d].check(c)
            if seen in (DUPLICATE, TOO_OLD):  # acks and nacks are never retransmitted
                return {"status": "replay", "error": "replay",
                        "detail": f"{t} counter {c} seen before or older than the window"}
        s.window[d].mark(c)
        return {}

    def _show(self, msg: dict[str, Any]) -> dict[str, Any]:
        out = _plain(msg)
        if msg["type"] == "scan":
            out["data"] = mask_code(msg["data"], self.show)
        elif msg["type"] == "nack":  # the number is on the wire; a support engineer wants the name
            out["code_name"] = error_name(msg["code"])
        return out


def decode_capture(path: str | os.PathLike[str], keystore: Keystore | None = None, *,
                   aad: bytes = b"", show_codes: bool = False) -> Report:
    """Decode a capture. keystore: kid -> device key or None (e.g. hostd's Keystore); without
    one only the structure is checked. Raises CaptureError if the file cannot be decoded."""
    header, records, cut = read_capture(path)
    dec = _Decoder(keystore, aad, show_codes)
    frames = []
    for d, t_us, data in records:
        for size, item in dec.feed(d, data):
            rec = {"t_us": t_us, "dir": d, "size": size}
            if isinstance(item, ProtocolError):
                rec |= {"status": item.code, "error": item.code, "detail": item.detail}
            else:
                rec |= dec.classify(d, item, t_us)
            frames.append({"frame": len(frames) + 1, **rec})
    summary = _summarise(header, records, frames, dec, keystore is not None, cut)
    return Report(header, frames, summary, dec.sessions, cut, keystore is not None)


def _summarise(header: dict, records: list, frames: list, dec: _Decoder, checked: bool,
               cut: str | None) -> dict[str, Any]:
    dirs: dict[str, Any] = {}
    for d in (D2H, H2D):
        fs = [f for f in frames if f["dir"] == d]
        status = Counter(f["status"] for f in fs)
        dirs[d] = {"frames": len(fs), "status": {s: status[s] for s in STATUSES},
                   "retransmissions": sum(1 for f in fs if f.get("retransmit")),
                   "types": dict(Counter(f["message"]["type"] for f in fs if "message" in f)),
                   "unfinished_bytes": dec.pending[d]}
    times = [t for _, t, _ in records]
    gaps = [{"at_us": a, "seconds": (b - a) / 1e6} for a, b in itertools.pairwise(times)
            if b - a > GAP_US]
    total = {s: dirs[D2H]["status"][s] + dirs[H2D]["status"][s] for s in STATUSES}
    noise = sum(total[s] for s in NOISE)
    advice = []
    if noise:
        advice.append(f"{noise} frames damaged on the line (CRC/COBS/truncated/oversize): line "
                      "noise, not keys; check the USB cable, port and hub")
    if total["mac"]:
        advice.append(f"{total['mac']} frames failed their MAC: the keystore's key is not the "
                      "device's (re-provision it), or someone tampers with the line")
    if total["replay"]:
        advice.append(f"{total['replay']} replayed frames: old frames sent again (tampering, "
                      "or a misbehaving proxy on the line)")
    if total["cose"] or total["payload"]:
        advice.append(f"{total['cose'] + total['payload']} frames passed their CRC but are "
                      "malformed: a peer bug or crafted frames")
    if not checked:
        advice.append("MAC not checked: no key given (use --keystore, or --key with --kid)")
    elif total["unverified"]:
        advice.append(f"{total['unverified']} frames not verified: no key for their device, or "
                      "the capture began after the handshake")
    return {"type": "summary", "device_id": header.get("device_id"),
            "start_unix_us": header.get("start_unix_us"), "records": len(records),
            "first_us": times[0] if times else None, "last_us": times[-1] if times else None,
            "mac_checked": checked, "sessions": len(dec.sessions), "directions": dirs,
            "noise": noise, "mac": total["mac"], "replay": total["replay"], "gaps": gaps,
            "advice": advice or ["no errors"], "truncated": cut}


def _line(f: dict[str, Any]) -> str:
    s = f"{f['t_us'] / 1e6:12.6f} {f['dir']} {f['size']:5d}B  {f['status']:<10}"
    if "counter" in f:
        s += f" kid={f['kid']} alg={f['alg']} ctr={f['counter']}"
    if "message" in f:
        m = f["message"]
        s += "  " + m["type"] + "".join(f" {k}={v}" for k, v in m.items() if k != "type")
    elif "detail" in f:  # the exact code where the status is a class (cose: header, alg, ...)
        code = f.get("error", f["status"])
        s += f"  {f['detail']}" if code == f["status"] else f"  {code}: {f['detail']}"
    return s + ("  [retransmission]" if f.get("retransmit") else "")


def _summary_lines(s: dict[str, Any]) -> list[str]:
    out = [f"capture of {s['device_id']}: {s['records']} records"]
    if s["first_us"] is not None:
        out[0] += f", {s['first_us'] / 1e6:.6f} .. {s['last_us'] / 1e6:.6f} s"
    out.append(f"sessions: {s['sessions']}; MAC {'checked' if s['mac_checked'] else 'NOT checked'}")
    for d, v in s["directions"].items():
        counts = ", ".join(f"{k} {n}" for k, n in v["status"].items() if n)
        types = ", ".join(f"{k} {n}" for k, n in sorted(v["types"].items()))
        out.append(f"{d}: {v['frames']} frames ({counts or 'none'}); retransmissions "
                   f"{v['retransmissions']}; types: {types or 'none'}")
        if v["unfinished_bytes"]:
            out.append(f"{d}: {v['unfinished_bytes']} bytes of an unfinished frame at the end")
    out += [f"gap of {g['seconds']:.3f} s after {g['at_us'] / 1e6:.6f} s" for g in s["gaps"]]
    return out + [f"- {a}" for a in s["advice"]]


def _keys(keystore: str | None, key: str | None, kid: str | None) -> Keystore | None:
    from hexiao.hostd.config import kid_bytes
    from hexiao.hostd.keystore import Keystore as FileKeystore
    from hexiao.hostd.keystore import KeystoreError

    if (key is None) != (kid is None):
        raise click.UsageError("--key and --kid go together")
    one: dict[bytes, bytes] = {}
    if key is not None:
        try:
            raw = bytes.fromhex(key)
        except ValueError:
            raw = b""
        k = kid_bytes(kid or "")
        if len(raw) != 32 or not k or len(k) > 16:
            raise click.ClickException("--key must be 64 hex digits and --kid a device id of "
                                       '1..16 bytes (text, or "hex:" and hex digits)')
        one[k] = raw
    store = None
    if keystore is not None:
        try:
            store = FileKeystore(keystore)
        except (OSError, KeystoreError) as e:
            raise click.ClickException(f"keystore: {e}") from None
    if store is None:
        return one.get if one else None
    return lambda k: one.get(k) or store.get(k)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--keystore", type=click.Path(dir_okay=False), help="hostd's keystore file.")
@click.option("--key", help="A device key (64 hex digits), with --kid.")
@click.option("--kid", help='Its device id: text ("hx-0001") or "hex:" and hex digits.')
@click.option("--aad", default="", help="External AAD, if the deployment sets one (text).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per frame, then a summary.")
@click.option("--show-codes", is_flag=True, help="Show scanned codes in full (default: last 4).")
@click.option("--summary", "summary_only", is_flag=True, help="Only the summary.")
def main(file: str, keystore: str | None, key: str | None, kid: str | None, aad: str,
         as_json: bool, show_codes: bool, summary_only: bool) -> None:
    """Decode a link capture FILE: frames, messages, counters, noise vs MAC failures, timings.

    Exit codes: 0 decoded; 1 cannot decode (unreadable, not a capture, unsupported version, bad
    key option); 2 usage; 3 truncated capture (what precedes the cut is decoded)."""
    ks = _keys(keystore, key, kid)
    try:
        rep = decode_capture(file, ks, aad=aad.encode(), show_codes=show_codes)
    except CaptureError as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        for f in [] if summary_only else rep.frames:
            click.echo(json.dumps(f))
        click.echo(json.dumps(rep.summary))
    else:
        for f in [] if summary_only else rep.frames:
            click.echo(_line(f))
        click.echo("\n".join(_summary_lines(rep.summary)))
    if rep.truncated:
        click.echo(f"warning: {file}: {rep.truncated}; decoded everything before it", err=True)
        sys.exit(EXIT_TRUNCATED)


if __name__ == "__main__":
    main()
