"""`hexiao demo`: a lane on this machine, shown step by step.

This layer: the real firmware link (MicroPython, in the device's 64 KB heap, from staged .mpy)
on a pty "cable" with a man in the middle (tools/relay.py), and the host's link over pyserial
(hostd/serial_link.py). The demo narrates the handshake, a scan answered by a verdict, then a
corrupted, a forged and a replayed frame put on the cable, each shown rejected and counted, and
ends with both ends' counters.

Each step is a function in STEPS that checks what it shows. Exit status: 0 every step saw what
it expected; 1 a step did not (the reason is printed); 2 bad command-line options; 3 the lane
could not be set up (e.g. mpy-cross or micropython missing).
`--json` prints one JSON object per line instead of prose. Later layers (hostd, the WeChat
simulator, the POS) add their steps to STEPS and their parts to Lane.
"""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
from hexiao.hostd.serial_link import EV_PORT_CLOSED, EventLog, SerialLink, keystore_from
from hexiao.protocol import errors, messages
from hexiao.protocol.link import EV_ACKED, EV_CLOSED, EV_MESSAGE, EV_OPEN, EV_REJECTED
from hexiao.tools import micropython, relay

DEVICE_ID = "lane-1"
EXIT_OK, EXIT_FAILED, EXIT_SETUP = 0, 1, 3
FIRMWARE_MODULE = "hexiao.firmware.linkpeer"


class StepFailed(Exception):
    """A step did not see what it should have; the message says what and what to do."""


class Narrator:
    """Prose for a person, or one JSON object per line for a machine."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, event: str, text: str = "", /, **fields: Any) -> None:
        """An event: a JSON line, or its text for a person."""
        if self.as_json:
            click.echo(json.dumps({"event": event, **fields}, ensure_ascii=False, default=str))
        elif text:
            click.echo(text)

    def line(self, text: str) -> None:
        """More prose about the last event (nothing in JSON mode)."""
        if not self.as_json:
            click.echo(text)

    def title(self, text: str) -> None:
        if not self.as_json:
            click.secho(text, bold=True)


class HostSide(EventLog):
    """The host application of this layer: every scan gets a verdict; events are recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.port: SerialLink | None = None

    def on_event(self, ev: tuple[Any, ...]) -> None:
        self.append(ev)
        if ev[0] == EV_MESSAGE and ev[1]["type"] == "scan" and self.port is not None:
            s = ev[1]
            self.port.send({"type": "verdict", "scan_id": s["scan_id"], "outcome": 0,
                            "beep": 1, "led": 1,
                            "text": f"{s['data'].decode('ascii', 'replace')[:32]} accepted"})


@dataclass
class Lane:
    """Everything running for the demo; steps read and drive it."""

    workdir: Path
    heap: str
    timeout: float
    cable: relay.Cable | None = None
    device: relay.DeviceProcess | None = None
    host: SerialLink | None = None
    app: HostSide = field(default_factory=HostSide)
    notes: dict[str, Any] = field(default_factory=dict)  # what one step tells a later one

    def start(self) -> None:
        staged = micropython.stage(self.workdir / "device")
        key = os.urandom(32)  # this run's device key: in a 0600 file and the host's keystore
        cfg = self.workdir / "device.json"
        cfg.touch(mode=0o600)
        cfg.write_text(json.dumps({"id": DEVICE_ID, "key": key.hex()}))
        self.cable = relay.Cable().start()
        argv, env = micropython.command(FIRMWARE_MODULE, staged, heap=self.heap,
                                        args=[f"cfg={cfg}", "scans=1"])
        self.device = relay.DeviceProcess(self.cable, argv, env, str(staged))
        self.host = SerialLink.open(self.cable.host_port,
                                    keystore_from({DEVICE_ID.encode(): key}), self.app.on_event)
        self.app.port = self.host
        self.host.start()

    def close(self) -> None:
        if self.host is not None:
            self.host.close()
        if self.cable is not None:
            self.cable.close()
        if self.device is not None:
            self.device.stop()

    # helpers for steps

    def wait(self, pred: Callable[[], Any], what: str) -> Any:
        """Wait for the host side; fails early if the device program has died."""
        try:
            return self.app.wait(pred, self.timeout, what, self._device_alive)
        except TimeoutError as e:
            raise StepFailed(str(e).replace("the peer", "the device program")) from None

    def _device_alive(self) -> bool:
        return self.device is None or self.device.proc.poll() is None

    def dev_wait(self, pred: Callable[[list[dict[str, Any]]], Any], what: str) -> Any:
        assert self.device is not None
        try:
            return self.device.wait_for(pred, self.timeout)
        except TimeoutError as e:
            raise StepFailed(f"waiting for {what}: {e}") from None

    def host_counters(self) -> dict[str, int]:
        assert self.host is not None
        return self.host.counters

    def device_counters(self) -> dict[str, Any]:
        """Asked over the link, as hostd does: health_get -> health."""
        assert self.host is not None
        before = len(self.app.of(EV_MESSAGE, "health"))
        if not self.host.send({"type": "health_get"}):
            raise StepFailed("the host link's queue is full")
        got = self.wait(lambda: self.app.of(EV_MESSAGE, "health")[before:],
                        "the device's health report")
        return got[0][1]


Step = tuple[str, str, Callable[[Lane, Narrator], None]]


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)
            if after.get(k, 0) != before.get(k, 0)}


def _expect_rejection(what: str, delta: dict[str, int], codes: tuple[str, ...]) -> str:
    """Exactly one of `codes` grew by one, and no other rejection code moved."""
    grew = [c for c in codes if delta.get(c, 0) == 1]
    # duplicates may also come from an early resend the fault itself set off: not an error
    others = {c: n for c, n in delta.items()
              if c in REJECTION_CODES and c not in codes and c != "duplicate"}
    if len(grew) != 1 or others or sum(delta.get(c, 0) for c in codes) != 1:
        raise StepFailed(f"{what}: expected one of {'/'.join(codes)} counted once, "
                         f"counters moved by {delta}")
    return grew[0]


REJECTION_CODES = ("crc", "cobs", "oversize", "truncated", "cbor", "non_canonical", "cose",
                   "alg", "header", "kid", "mac", "replay", "no_session", "version",
                   "unknown_type", "schema", "handshake", "rejected", "duplicate")


def step_handshake(lane: Lane, say: Narrator) -> None:
    app = lane.app
    opened = lane.wait(lambda: app.of(EV_OPEN), "the device's hello")
    peer = opened[0][1]
    lane.dev_wait(lambda ev: [e for e in ev if e["ev"] == "open"], "the device's session")
    boot = lane.device.of("boot")[0] if lane.device else {}
    kid = peer["kid"].decode("ascii", "replace")
    if kid != DEVICE_ID:
        raise StepFailed(f"the host opened a session with {kid!r}, not {DEVICE_ID!r}")
    say.emit("handshake", f"  device {kid} ({peer['firmware']} on board '{peer['board']}') "
             f"said hello with a fresh nonce", device_id=kid, firmware=peer["firmware"],
             board=peer["board"], version=peer["version"], heap_free=boot.get("heap_free"),
             heap=lane.heap)
    say.line(f"  host knew its key and answered welcome with its own nonce: session open, "
             f"protocol v{peer['version']}")
    say.line("  session keys come from the device key and both nonces (HKDF);")
    say.line("  the device key itself never crosses the cable")


def step_scan(lane: Lane, say: Narrator) -> None:
    app = lane.app
    scans = lane.wait(lambda: app.of(EV_MESSAGE, "scan"), "the device's scan")
    scan = scans[0][1]
    data = scan["data"].decode("ascii", "replace")
    assert lane.cable is not None
    counter = next(s.counter for s in map(relay.peek, lane.cable.frames(relay.D2H))
                   if s.message["type"] == "scan")
    say.emit("scan", f"  device → host: scan #{scan['scan_id']} {scan['symbology']} '{data}', "
             f"frame counter {counter}, MAC'd with the session key", scan_id=scan["scan_id"],
             symbology=scan["symbology"], data=data, counter=counter)
    verdicts = lane.dev_wait(lambda ev: [e for e in ev if e["ev"] == "verdict"],
                             "the verdict at the device")
    lane.wait(lambda: app.of(EV_ACKED, "verdict"), "the device's ack")
    v = verdicts[0]
    if v["scan_id"] != scan["scan_id"]:
        raise StepFailed(f"verdict for scan {v['scan_id']}, expected {scan['scan_id']}")
    outcome = messages.OUTCOMES[v["outcome"]]
    say.emit("verdict", f"  host → device: verdict for scan #{v['scan_id']}: {outcome} "
             f"('{v['text']}'), acknowledged", scan_id=v["scan_id"], outcome=outcome,
             text=v["text"])
    lane.notes["scan_id"] = scan["scan_id"]


def step_corrupted(lane: Lane, say: Narrator) -> None:
    assert lane.cable is not None
    before = lane.host_counters()
    lane.cable.corrupt_next(relay.D2H)
    lane.device_counters()  # the device's answer is the next frame: it and its damaged copy
    lane.wait(lambda: lane.host_counters().get("crc", 0) > before.get("crc", 0),
              "the host to see the damaged copy")
    code = _expect_rejection("corrupted frame", _delta(lane.host_counters(), before), ("crc",))
    say.emit("fault", "  the cable sent the host a copy of the device's next frame, one bit "
             "flipped", fault="corrupt", direction="d2h", rejected_by="host", code=code)
    say.line(f"  host rejected it: {code}, counted as line noise (not tampering)")
    say.line("  and asked for a resend; the real frame was delivered once")


def step_forged(lane: Lane, say: Narrator) -> None:
    assert lane.cable is not None and lane.device is not None
    top = max(relay.peek(w).counter for w in lane.cable.frames(relay.H2D))
    sid = lane.notes.get("scan_id", 1)
    forged = {"type": "verdict", "scan_id": sid, "outcome": 0, "beep": 1, "led": 1,
              "text": "forged: accepted"}
    before = len(lane.device.of("rejected"))
    lane.cable.inject(relay.H2D, relay.forge(forged, DEVICE_ID.encode(), top + 1))
    got = lane.dev_wait(lambda ev: [e for e in ev if e["ev"] == "rejected"][before:],
                        "the device to reject the forgery")
    code = got[0]["code"]
    if code != "mac" or len(got) != 1:
        raise StepFailed(f"forged frame: the device rejected it as {got}, expected mac")
    if [e for e in lane.device.of("verdict") if e["text"] == forged["text"]]:
        raise StepFailed("the device acted on a forged verdict")
    say.emit("fault", f"  the cable injected a verdict 'accepted' for scan #{sid}: well formed,"
             "\n  valid CRC, but MAC'd under a key the attacker made up",
             fault="forge", direction="h2d", rejected_by="device", code=code)
    say.line(f"  device rejected it: {code}, counted as tampering; the cashier saw nothing")


def step_replayed(lane: Lane, say: Narrator) -> None:
    assert lane.cable is not None
    sid = lane.notes.get("scan_id", 1)
    before = lane.host_counters()
    seen = len(lane.app.of(EV_REJECTED))
    wire = lane.cable.replay(relay.D2H, lambda w: relay.peek(w).message["type"] == "scan")
    counter = relay.peek(wire).counter
    got = lane.wait(lambda: lane.app.of(EV_REJECTED)[seen:], "the host to reject the replay")
    # the scan is older than the last message the host accepted (the health report): `replay`
    code = _expect_rejection("replayed frame", _delta(lane.host_counters(), before), ("replay",))
    if got[0][1] != code:
        raise StepFailed(f"replayed frame rejected as {got[0][1]}, expected {code}")
    n = len([e for e in lane.app.of(EV_MESSAGE, "scan") if e[1]["scan_id"] == sid])
    if n != 1:
        raise StepFailed(f"scan #{sid} was delivered {n} times")
    say.emit("fault", f"  the cable re-sent scan #{sid} exactly as captured (counter {counter}): "
             "its MAC is genuine",
             fault="replay", direction="d2h", rejected_by="host", code=code, counter=counter)
    say.line(f"  host rejected it: {code}, its counter is older than the last message;")
    say.line("  nothing is delivered twice, so no coupon is redeemed twice")


def step_counters(lane: Lane, say: Narrator) -> None:
    health = lane.device_counters()
    dev = {errors.counter_name(k): v for k, v in health["link"].items()}
    host = lane.host_counters()
    problems = []
    if host.get("crc") != 1:
        problems.append(f"host crc {host.get('crc', 0)}, expected 1")
    if dev.get("mac") != 1 or host.get("mac", 0):
        problems.append(f"mac: device {dev.get('mac', 0)} (expected 1), host "
                        f"{host.get('mac', 0)} (expected 0)")
    if host.get("replay") != 1:
        problems.append(f"host replay {host.get('replay', 0)}, expected 1")
    if host.get("sessions") != 1 or dev.get("sessions") != 1:
        problems.append("more than one session")
    if problems:
        raise StepFailed("counters: " + "; ".join(problems))
    say.emit("counters", "", host=host, device=dev, heap_free=health["heap_free"],
             heap_peak=health["heap_peak"])
    for who, c in (("host", host), ("device", dev)):
        shown = "  ".join(f"{k} {v}" for k, v in sorted(c.items()))
        say.line(f"  {who:6}  {shown}")
    say.line(f"  device heap: {health['heap_free']} bytes free, {health['heap_peak']} "
             f"in use at most, of {lane.heap}")


STEPS: list[Step] = [
    ("handshake", "handshake", step_handshake),
    ("scan", "a coupon scan and its verdict", step_scan),
    ("corrupt", "line noise: a corrupted frame", step_corrupted),
    ("forge", "tampering: a forged frame", step_forged),
    ("replay", "tampering: a replayed frame", step_replayed),
    ("counters", "what each end counted", step_counters),
]


def run(say: Narrator, heap: str, timeout: float, steps: list[Step] = STEPS) -> int:
    say.title("hexiao demo: the signed link, device ⇄ host, over a pty cable with a man in "
              "the middle")
    with tempfile.TemporaryDirectory(prefix="hexiao-demo-") as tmp:
        lane = Lane(Path(tmp), heap, timeout)
        try:
            try:
                lane.start()
            except (OSError, RuntimeError, ValueError) as e:
                say.emit("error", f"could not set up the lane: {e}", step="setup",
                         message=str(e))
                say.emit("result", "", ok=False)
                return EXIT_SETUP
            for i, (name, title, fn) in enumerate(steps, 1):
                say.title(f"[{i}/{len(steps)}] {title}")
                try:
                    fn(lane, say)
                except StepFailed as e:
                    _explain(lane, say, name, str(e))
                    return EXIT_FAILED
        finally:
            lane.close()
    say.emit("result", "all steps behaved as expected", ok=True)
    return EXIT_OK


def _explain(lane: Lane, say: Narrator, step: str, message: str) -> None:
    hint = ""
    if lane.device is not None and lane.device.proc.poll() is not None:
        lane.device.stop()  # gone already: collect the rest of what it said
    other = lane.device.other if lane.device else []
    if any("MemoryError" in line for line in other):
        hint = (f". The device ran out of its {lane.heap} heap; try `hexiao demo --heap 128k` "
                "to see the rest")
    elif lane.device is not None and lane.device.proc.poll() is not None:
        hint = ". The device program exited; its last words are above"
    closed = [e for e in lane.app.events if e[0] in (EV_CLOSED, EV_PORT_CLOSED)]
    if not say.as_json:
        for line in other[-8:]:
            click.echo(f"  device| {line}", err=True)
    say.emit("error", "", step=step, message=message + hint, device_stderr=other[-8:],
             host_events=[list(e[:2]) for e in closed])
    rejected = [e[1] for e in lane.app.events if e[0] == EV_REJECTED]
    if not say.as_json:
        click.secho(f"FAILED at {step}: {message}{hint}", fg="red", err=True)
        if rejected:
            click.echo(f"  host rejections so far: {rejected}", err=True)
    say.emit("result", "", ok=False)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@click.option("--heap", default=micropython.HEAP, show_default=True,
              help="The device's MicroPython heap (the product's budget is 64k).")
@click.option("--timeout", default=30.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="Seconds any one wait may take before the step fails.")
def main(as_json: bool, heap: str, timeout: float) -> None:
    """Run the link of a lane on this machine and show it working, and resisting.

    Exit status: 0 all steps as expected, 1 a step failed, 2 bad options, 3 set-up failed."""
    if not re.fullmatch(r"[1-9][0-9]*[kKmM]?", heap):
        raise click.BadParameter("a size such as 64k", param_hint="--heap")
    sys.exit(run(Narrator(as_json), heap, timeout))
