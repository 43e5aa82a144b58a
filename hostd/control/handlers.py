"""The control socket's commands, as hostd answers them (commands.Handlers).

Rules this module keeps:
- ControlHandlers is given what it reads (the lanes, the journal's path, the config, a clock,
  the start time, the receipt tap's state) and what it may do (reconcile); it starts nothing of
  its own and holds no state but the capture size cap, so the daemon stays the one place where
  parts are assembled;
- results are plain JSON-able data; coupon codes only as the journal keeps them (last 4 shown),
  times as local ISO 8601;
- an expected failure is a ControlError with a kind from commands.HANDLER_KINDS and a message
  that says what to do; anything else is a bug, logged by the server, "internal" to the client;
- a capture started over a connection is that connection's (commands.Session): it ends when the
  client goes away (a killed `hexiao capture` never leaves hostd recording), and every capture is
  capped in bytes (capture.MAX_BYTES unless told).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from hexiao.hostd import journal as jr
from hexiao.hostd.config import Config
from hexiao.hostd.control.client import ControlError
from hexiao.hostd.control.commands import Session
from hexiao.hostd.lanes.capture import MAX_BYTES, CaptureWriter
from hexiao.hostd.lanes.lane import DeviceLane
from hexiao.hostd.redeem import Verdict, tail
from hexiao.protocol import fw_image


class ControlHandlers:
    """hostd's answers to the control commands (commands.Handlers)."""

    def __init__(self, lanes: Mapping[str, DeviceLane], journal_path: Path, cfg: Config, *,
                 reconcile: Callable[[], list[Verdict]], started: float,
                 clock: Callable[[], float] = time.time,
                 tap_state: Callable[[], dict[str, Any]] | None = None,
                 points_state: Callable[[], dict[str, Any]] | None = None,
                 capture_max_bytes: int = MAX_BYTES, update_timeout: float = 10.0,
                 update_restart_s: float = 120.0) -> None:
        self.lanes, self.journal_path, self.cfg = lanes, journal_path, cfg
        self._reconcile, self.started, self._clock = reconcile, started, clock
        self._tap_state = tap_state or (lambda: {"state": "off"})
        self._points_state = points_state or (lambda: {"state": "off"})
        self.capture_max_bytes = capture_max_bytes
        self.update_timeout, self.update_restart_s = update_timeout, update_restart_s

    def _lane(self, device: str) -> DeviceLane:
        lane = self.lanes.get(device)
        if lane is None:
            raise ControlError("not_found", f"no device {device!r}; known: "
                               + (", ".join(sorted(self.lanes)) or "none"))
        return lane

    def _ask(self, device: str, msg: dict[str, Any], answer: str) -> dict[str, Any]:
        try:
            reply = self._lane(device).request(msg, answer)
        except ConnectionError as e:
            raise ControlError("unavailable", str(e)) from e
        except TimeoutError as e:
            raise ControlError("timeout", str(e)) from e
        return {k: (v.hex() if isinstance(v, bytes) else v) for k, v in reply.items()}

    # -- hostd and its devices ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with jr.Journal(self.journal_path) as journal:
            attention = [e.id for e in journal.entries(("unknown",))]
        return {"pid": os.getpid(), "uptime_s": round(self._clock() - self.started, 1),
                "backend": self.cfg.backend.kind, "journal": str(self.journal_path),
                "devices": {d: lane.state for d, lane in self.lanes.items()},
                "verify_manually": attention, "tap": self._tap_state(),
                "points": self._points_state()}

    def device_list(self) -> list[dict[str, Any]]:
        return [lane.info() for lane in self.lanes.values()]

    def device_info(self, device: str) -> dict[str, Any]:
        return self._lane(device).info()

    def device_ping(self, device: str) -> dict[str, Any]:
        t = time.monotonic()
        self._ask(device, {"type": "ping", "data": b"hexiao"}, "pong")
        return {"device": device, "rtt_ms": round((time.monotonic() - t) * 1000, 1)}

    def device_health(self, device: str) -> dict[str, Any]:
        return self._ask(device, {"type": "health_get"}, "health")

    def device_logs(self, device: str, since: int | None = None,
                    max: int | None = None) -> dict[str, Any]:
        msg: dict[str, Any] = {"type": "logs_get"}
        if since is not None:
            msg["since"] = since
        if max is not None:
            msg["max"] = max
        return self._ask(device, msg, "logs")

    # -- firmware over the link (SPEC 6.8) ------------------------------------------------------

    def device_update(self, device: str, image: str, digest: str, size: int,
                      manifest_size: int, signature: str, board: str, version: str,
                      counter: int) -> dict[str, Any]:
        """Send an image (protocol/fw_image.py) through the device's link, commit it, then wait
        for the device to come back and say what became of it (on trial, or refused and why)."""
        if not os.path.isabs(image):
            raise ControlError("bad_request", f"give an absolute path (hostd's cwd is not "
                                              f"yours): {image}")
        lane = self._lane(device)
        try:
            img = Path(image).read_bytes()
        except OSError as e:
            raise ControlError("bad_request", f"cannot read {image}: {e.strerror} (hostd reads "
                                              "it as its own user)") from e
        if len(img) != size or hashlib.sha256(img).hexdigest() != digest:
            raise ControlError("bad_request", f"{image} is not the image offered (size or "
                                              "SHA-256 differ): run `hexiao device update` again")
        offer = {"type": "fw_offer", "digest": bytes.fromhex(digest), "size": size,
                 "manifest_size": manifest_size, "signature": bytes.fromhex(signature),
                 "board": board, "version": version, "counter": counter}
        try:
            sent = fw_image.send(lambda m, a, t: lane.request(m, a, t), offer, img,
                                 timeout=self.update_timeout)
        except fw_image.Refused as e:
            raise ControlError("refused", f"device {device} refused {version}: {e.why}") from e
        except ConnectionError as e:
            raise ControlError("unavailable", f"{e}; run the update again: it resumes where "
                                              "it stopped") from e
        except TimeoutError as e:
            raise ControlError("timeout", f"{e}; run the update again: it resumes where it "
                                          "stopped") from e
        st = self._after_restart(lane, version)
        out = {"device": device, "version": version, **sent,
               "state": fw_image.STATES[st["state"]], "why": st.get("why", "")}
        if st["state"] in (6, 7):  # it runs its last good firmware
            raise ControlError("refused", f"device {device} did not install {version}: "
                                          f"{out['why']}")
        return out

    def _after_restart(self, lane: DeviceLane, version: str) -> dict[str, Any]:
        # the device resets to check and install: ask it, once it is back, what it did (a port
        # that vanishes under the write, as the device resets, is an OSError: SerialException)
        end = time.monotonic() + self.update_restart_s
        while True:
            with contextlib.suppress(ConnectionError, TimeoutError, OSError):
                st = lane.request({"type": "fw_query"}, "fw_status", 5.0)
                if st["state"] >= 4 and st.get("version") == version:
                    return st
            if time.monotonic() > end:
                raise ControlError("timeout", f"device {lane.id} did not come back within "
                                              f"{self.update_restart_s:g} s of restarting to "
                                              "install: look at it (`hexiao device health`)")
            time.sleep(0.5)

    # -- captures -----------------------------------------------------------------------------

    def capture_start(self, device: str, path: str,
                      session: Session | None = None) -> dict[str, Any]:
        if not os.path.isabs(path):
            raise ControlError("bad_request", f"give an absolute path (hostd's cwd is not "
                                              f"yours): {path}")
        lane = self._lane(device)
        try:
            writer = lane.start_capture(path, self.capture_max_bytes)
        except FileExistsError as e:
            raise ControlError("bad_request", str(e) if "already" in str(e) else
                               f"{path} exists: captures never overwrite a file") from e
        except OSError as e:
            raise ControlError("bad_request", f"cannot create {path}: {e.strerror} "
                                              f"(hostd writes it as its own user)") from e
        if session is not None:
            session.hold(_CaptureHold(lane, writer))
        return {"device": device, "path": path, "started": True,
                "max_bytes": self.capture_max_bytes}

    def capture_stop(self, device: str) -> dict[str, Any]:
        try:
            return self._lane(device).stop_capture("capture.stop")
        except LookupError as e:
            raise ControlError("bad_request", str(e)) from e

    # -- the journal --------------------------------------------------------------------------

    def journal_list(self, state: list[str] | None = None, limit: int = 50) -> list[dict[str, Any]]:
        if limit < 1:  # commands.py refuses it; [-0:] would be every entry
            raise ControlError("bad_request", "journal.list: limit must be 1 or more")
        with jr.Journal(self.journal_path) as journal:  # the newest `limit`, by the index
            entries = journal.latest(state, limit)
        return [_entry(e) for e in reversed(entries)]  # oldest first, as before

    def journal_show(self, entry_id: int) -> dict[str, Any]:
        with jr.Journal(self.journal_path) as journal:
            try:
                e = journal.get(entry_id)
            except KeyError as exc:
                raise ControlError("not_found", f"no journal entry {entry_id}") from exc
            steps = [{"step": s.step, "at": _when(s.at), "detail": s.detail}
                     for s in journal.steps(entry_id)]
        return {**_entry(e), "steps": steps}

    def journal_reconcile(self) -> dict[str, Any]:
        out = self._reconcile()
        return {"settled": [v.entry_id for v in out if v.outcome != "verify_manually"],
                "still_unknown": [v.entry_id for v in out if v.outcome == "verify_manually"]}


class _CaptureHold:
    """A capture that lasts as long as the connection that started it (commands.Hold)."""

    def __init__(self, lane: DeviceLane, writer: CaptureWriter) -> None:
        self.lane, self.writer = lane, writer

    def active(self) -> bool:
        return self.lane.capturing(self.writer)

    def release(self) -> None:
        # only this capture (one started since by another client is not ours); LookupError:
        # stopped already (capture.stop, hostd stopping)
        with contextlib.suppress(LookupError):
            self.lane.stop_capture("its client went away", only=self.writer)

    def __repr__(self) -> str:
        return f"capture of {self.lane.id} to {self.writer.path}"


def _when(t: float) -> str:
    """A journal time as support reads it: local ISO 8601 to the millisecond, with its offset."""
    return datetime.fromtimestamp(t).astimezone().isoformat(timespec="milliseconds")


def _entry(e: jr.Entry) -> dict[str, Any]:
    return {"id": e.id, "lane": e.lane, "state": e.state, "outcome": e.outcome,
            "reason": e.reason, "code": tail(e.code or e.scanned), "created": _when(e.created),
            "updated": _when(e.updated), "title": e.detail.get("title"),
            "card_type": e.detail.get("card_type")}
