"""Direct mode of `hexiao device info|ping|health|logs --port PORT --keystore FILE`: talk to a
device on its serial port without hostd (for when hostd is stopped; it holds the port while it
runs). Also used by `hexiao provision` and `hexiao doctor`.

Rules this module keeps:
- The same answers as through hostd: results have hostd's shape and every failure is a
  ControlError with hostd's kinds (unavailable, timeout, not_found, bad_request), so ctl.py
  prints and exits the same way in both modes.
- Only the device whose key is in the keystore (and, with --kid, only that id) gets a session;
  a device key is never printed.
- No timed loops of its own: every wait is the link's event log waiting, up to `timeout`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hexiao.hostd.control.client import ControlError
from hexiao.tools.support.render import LEVELS


def _kid_text(kid: bytes) -> str:
    text = kid.decode("ascii", "replace")
    return text if text.isprintable() and "\ufffd" not in text else kid.hex()


class DirectDevice:
    """A device on a serial port without hostd: the handshake, then one request at a time."""

    def __init__(self, port: str, keystore: Path, kid: str | None, timeout: float) -> None:
        import serial
        from hexiao.hostd.keystore import Keystore, KeystoreError
        from hexiao.hostd.lanes.serial_link import EventLog, SerialLink
        from hexiao.protocol.link import EV_OPEN

        try:
            ks = Keystore(keystore)
        except KeystoreError as e:
            raise ControlError("bad_request", str(e)) from None
        want = None if kid is None else _kid_bytes(kid, ks)
        self.port, self.timeout, self.events = port, timeout, EventLog()
        try:
            self.link = SerialLink.open(
                port, lambda k: ks(k) if want is None or bytes(k) == want else None,
                self.events.append)
        except (serial.SerialException, OSError) as e:
            raise ControlError("unavailable", f"cannot open {port}: {e} (while hostd runs it "
                                              f"holds the port: leave out --port)") from None
        self.link.start()
        ids = [bytes(k) for k in ks.ids()] if want is None else [want]
        if len(ids) == 1:  # a device still in a session with a stopped hostd: hello now
            try:
                self.link.poke(ids[0])
            except ValueError as e:
                self.link.close()
                raise ControlError("bad_request", f"{e} ({keystore})") from None
        got = self._wait(lambda: self.events.of(EV_OPEN))
        if not got:
            refused = sorted({str(e[1]) for e in self.events.of("rejected")})
            why = (f"its frames were refused ({', '.join(refused)}): is its key in {keystore}"
                   f"{'' if kid is None else f' under id {kid}'}?" if refused else
                   "is hexiao firmware running there? (give --kid: a device still in a "
                   "session with a stopped hostd is asked to say hello only by its own id)")
            raise ControlError("unavailable", f"no handshake from a device on {port} within "
                                              f"{timeout:g} s: {why}")
        self.peer: dict[str, Any] = got[0][1]

    def _wait(self, pred: Callable[[], Any]) -> Any:
        """pred()'s first true value, or None after the timeout; the port failing is an error."""
        from hexiao.hostd.lanes.serial_link import EV_PORT_CLOSED

        try:
            return self.events.wait(pred, self.timeout, "the device",
                                    alive=lambda: not self.events.of(EV_PORT_CLOSED))
        except TimeoutError:
            closed = self.events.of(EV_PORT_CLOSED)
            if closed:
                raise ControlError("unavailable", f"{self.port} closed: {closed[0][1]}") from None
            return None

    def request(self, msg: dict[str, Any], reply: str,
                match: Callable[[dict[str, Any]], bool] = lambda m: True) -> dict[str, Any]:
        from hexiao.protocol.link import EV_ACKED, EV_MESSAGE, EV_NACKED

        before = len(self.events.of(EV_MESSAGE, reply))
        if not self.link.send(msg):
            raise ControlError("unavailable", "the link's send queue is full")
        got = self._wait(lambda: [e[1] for e in self.events.of(EV_MESSAGE, reply)[before:]
                                  if match(e[1])] or self.events.of(EV_NACKED, msg["type"]))
        what = msg["type"]
        if got and isinstance(got[0], tuple):  # (EV_NACKED, msg, code, detail)
            raise ControlError("bad_request", f"the device refused {what}: {got[0][2]}")
        if got:
            return {k: v for k, v in got[0].items() if k != "type"}
        if self.events.of(EV_ACKED, what):
            raise ControlError("timeout", (
                f"the device received {what} but sent no {reply} within {self.timeout:g} s "
                f"(its firmware, {self.peer.get('firmware')}, may not answer {what})"))
        raise ControlError("timeout", f"no answer to {what} from the device on {self.port} "
                                      f"within {self.timeout:g} s")

    def info(self) -> dict[str, Any]:
        kid = bytes(self.peer["kid"])
        return {"device": _kid_text(kid), "kid": kid.hex(), "port": self.port, "connected": True,
                **{k: v for k, v in self.peer.items() if k != "kid"}}

    def ping(self, data: bytes) -> dict[str, Any]:
        t0 = time.monotonic()
        self.request({"type": "ping", "data": data}, "pong", lambda m: m.get("data") == data)
        return {"device": _kid_text(bytes(self.peer["kid"])),
                "rtt_ms": round((time.monotonic() - t0) * 1000, 1)}

    def health(self) -> dict[str, Any]:
        from hexiao.protocol.errors import counter_name

        h = self.request({"type": "health_get"}, "health")
        h["link"] = {counter_name(k): v for k, v in h.get("link", {}).items()}
        return {"device": _kid_text(bytes(self.peer["kid"])), **h}

    def logs(self, since: int | None, max_: int | None) -> dict[str, Any]:
        msg: dict[str, Any] = {"type": "logs_get"}
        if since is not None:
            msg["since"] = since
        if max_ is not None:
            msg["max"] = max_
        r = self.request(msg, "logs")
        entries = [{"seq": s, "uptime_ms": t, "level": LEVELS[lv], "event": ev}
                   for s, t, lv, ev in r["entries"]]
        return {"entries": entries, "next": r["next"]}

    def close(self) -> None:
        self.link.close()

    def __enter__(self) -> DirectDevice:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kid_bytes(kid: str, ks: Any) -> bytes:
    """--kid as text if the keystore has it so, else as hex."""
    if kid.encode() in ks:
        return kid.encode()
    try:
        return bytes.fromhex(kid)
    except ValueError:
        raise ControlError("not_found", f"no device {kid!r} in {ks.path}") from None
