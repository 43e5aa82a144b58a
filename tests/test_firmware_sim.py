"""Drive the firmware (hexiao.firmware.main on the sim board, under real MicroPython) from tests
and the benchmark: a scanner pty, the HID output file read as a fake POS would, the link on a
relay.Cable with an optional host (SerialLink) that answers every scan with a verdict."""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hexiao.hostd.lanes.serial_link import EventLog, SerialLink, keystore_from
from hexiao.protocol.link import EV_MESSAGE
from hexiao.tools import micropython
from hexiao.tools.sim import relay

KID = b"till-1"

US_SHIFTED = '~!@#$%^&*()_+{}|:"<>?ABCDEFGHIJKLMNOPQRSTUVWXYZ'


def us_report(ch: str) -> tuple[int, int]:
    """(modifier, usage) for one printable ASCII char on a US keyboard: an independent table,
    from the HID Usage Tables (Keyboard page 0x07)."""
    plain = "abcdefghijklmnopqrstuvwxyz1234567890"
    if ch.lower() in plain and ch.isalpha():
        return (2 if ch.isupper() else 0), 4 + plain.index(ch.lower())
    if ch.isdigit():
        return 0, 0x1E + "1234567890".index(ch)
    shifted_digits = "!@#$%^&*()"
    if ch in shifted_digits:
        return 2, 0x1E + shifted_digits.index(ch)
    pairs = {" ": 0x2C, "-_": 0x2D, "=+": 0x2E, "[{": 0x2F, "]}": 0x30, "\\|": 0x31,
             ";:": 0x33, "'\"": 0x34, "`~": 0x35, ",<": 0x36, ".>": 0x37, "/?": 0x38}
    for chars, usage in pairs.items():
        if ch in chars:
            return (2 if chars.index(ch) else 0), usage
    raise ValueError(ch)


def typed(text: str, suffix: int | None = 0x28) -> list[str]:
    """The HID lines a fake POS reads for `text` typed then the suffix key: press, release."""
    out = []
    for ch in text:
        mod, usage = us_report(ch)
        out += [f"HID {mod:02x} {usage:02x}", "HID 00 00"]
    if suffix:
        out += [f"HID 00 {suffix:02x}", "HID 00 00"]
    return out


class Host(EventLog):
    """hostd's part reduced to the link: scans answered with `answer(scan)` (None: silence)."""

    def __init__(self, answer: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        super().__init__()
        self.answer = answer
        self.scans: list[dict[str, Any]] = []
        self.outbox: collections.deque[dict[str, Any]] = collections.deque()
        self.port: SerialLink | None = None
        self.pumping = threading.Lock()

    def on_event(self, ev: tuple[Any, ...]) -> None:
        with self.cond:
            self.events.append(ev)
            if ev[0] == EV_MESSAGE and ev[1]["type"] == "scan":
                self.scans.append(ev[1])
                reply = self.answer(ev[1])
                if reply:
                    self.outbox.append(reply)
            self.cond.notify_all()
        self.pump()

    def send(self, msg: dict[str, Any]) -> None:
        with self.cond:
            self.outbox.append(msg)
        self.pump()

    def pump(self) -> None:
        # one pumper at a time (the test's thread and the link's): else the head goes twice
        with self.pumping:
            while self.port is not None:
                with self.cond:
                    if not self.outbox:
                        return
                    msg = self.outbox[0]
                if not self.port.send(msg):
                    return  # an ack makes room and brings us back
                with self.cond:
                    self.outbox.popleft()

    def messages(self, type_: str) -> list[dict[str, Any]]:
        return [e[1] for e in self.of(EV_MESSAGE, type_)]

    def ask(self, msg: dict[str, Any], reply: str, timeout: float = 30) -> dict[str, Any]:
        before = len(self.messages(reply))
        self.send(msg)
        got = self.wait(lambda: self.messages(reply)[before:], timeout, f"the device's {reply}")
        return got[0]


def verdict_for(scan: dict[str, Any]) -> dict[str, Any]:
    return {"type": "verdict", "scan_id": scan["scan_id"], "outcome": 0, "beep": 1, "led": 1,
            "text": f"ok {scan['data'].decode('ascii', 'replace')}"}


@dataclass
class Sim:
    cable: relay.Cable
    device: relay.DeviceProcess
    scanner: int  # the write end of the scanner FIFO (the scan engine's UART)
    hid: Path
    host: Host | None = None
    link: SerialLink | None = None
    done: list[int] = field(default_factory=list)

    def scan(self, line: bytes, end: bytes = b"\r") -> None:
        os.write(self.scanner, line + end)

    def hid_lines(self) -> list[str]:
        return self.hid.read_text().splitlines() if self.hid.exists() else []

    def wait_hid(self, n: int, timeout: float = 30) -> list[str]:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            lines = self.hid_lines()
            if len(lines) >= n:
                return lines
            time.sleep(0.01)
        raise AssertionError(f"{n} HID lines expected, got {self.hid_lines()}")

    def events(self, kind: str) -> list[dict[str, Any]]:
        return self.device.of(kind)

    def wait_ev(self, kind: str, n: int = 1, timeout: float = 30, **match: Any) -> list[Any]:
        def pred(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
            got = [e for e in evs if e["ev"] == kind
                   and all(e.get(k) == v for k, v in match.items())]
            return got if len(got) >= n else []

        return self.device.wait_for(pred, timeout)

    def logs(self) -> list[str]:
        return [e["text"] for e in self.device.of("log")]

    def stop_host(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None

    def shutdown(self) -> int:
        """Hang up the scanner (the sim board's end) and the cable; the device's exit status."""
        if self.done:
            return self.done[0]
        self.stop_host()
        os.close(self.scanner)  # end of file: the sim board ends its program
        rc = self.device.stop()
        self.cable.close()
        self.done.append(rc)
        return rc


def device_cfg(tmp: Path, key: bytes) -> Path:
    cfg = tmp / "device.json"
    cfg.write_text(json.dumps({"id": KID.decode(), "key": key.hex()}))
    cfg.chmod(0o600)
    return cfg


def open_writer(fifo: Path, device: relay.DeviceProcess, timeout: float = 30) -> int:
    """The scanner FIFO's write end, once the device has opened its read end."""
    try:
        return device.open_writer(fifo, timeout)
    except TimeoutError:
        raise AssertionError(f"the device never opened its scanner: {device.other}") from None


@contextmanager
def sim(stage: Path, tmp: Path, *, key: bytes | None = None, host: Host | None = None,
        heap: str = micropython.HEAP, state: Path | None = None, rto: int = 200,
        tries: int = 8, noise: float = 0.0, seed: int = 0, printer: Path | None = None,
        button: Path | None = None) -> Iterator[Sim]:
    key = key or os.urandom(32)
    hid = tmp / f"hid-{time.monotonic_ns()}.txt"
    # a FIFO, not a pty: a pty the device opens would become its controlling terminal, and
    # closing it would kill the device with SIGHUP before its last report
    fifo = tmp / f"scanner-{time.monotonic_ns()}"
    os.mkfifo(fifo)
    args = [f"cfg={device_cfg(tmp, key)}", f"scanner={fifo}", f"hid={hid}",
            f"rto={rto}", f"tries={tries}"]
    if state is not None:
        args.append(f"state={state}")
    if printer is not None:
        args.append(f"printer={printer}")
    if button is not None:
        args.append(f"button={button}")
    argv, env = micropython.command("hexiao.firmware.main", stage, heap=heap, args=args)
    cable = relay.Cable(noise=noise, seed=seed).start()  # noise: see relay.Cable
    device = relay.DeviceProcess(cable, argv, env, str(stage))
    try:
        writer = open_writer(fifo, device)
    except BaseException:
        cable.close()
        device.stop(1)
        raise
    s = Sim(cable, device, writer, hid, host)
    try:
        if host is not None:
            s.link = SerialLink.open(cable.host_port, keystore_from({KID: key}), host.on_event,
                                     rto_ms=rto, max_tries=tries)
            host.port = s.link
            s.link.start()
        yield s
    finally:
        if s.shutdown() != 0:  # shown with a failing test's captured output
            print("device exit", s.done[0], "stderr:", *s.device.other[-12:], sep="\n  ")


# -- the application's pure logic, under CPython (the same module the device runs) -----------


def test_us_keymap_matches_the_hid_usage_tables() -> None:
    from hexiao.firmware.app import US

    for c in range(0x20, 0x7F):
        mod, usage = us_report(chr(c))
        assert (US[c - 0x20] & 0x7F, 2 if US[c - 0x20] & 0x80 else 0) == (usage, mod), chr(c)


def test_gs1_check_digit_and_rule_order() -> None:
    from hexiao.firmware.app import DEFAULT_RULES, classify, gs1_ok
    from hexiao.firmware.app_rules import compile_rules

    assert gs1_ok(b"4006381333931") and gs1_ok(b"96385074") and gs1_ok(b"036000291452")
    assert not gs1_ok(b"4006381333932") and not gs1_ok(b"7") and not gs1_ok(b"40063813A3931")
    assert classify(DEFAULT_RULES, "]E0", b"036000291452") == 0  # UPC-A: product
    assert classify(DEFAULT_RULES, "]Q1", b"036000291452") == 1  # same digits as QR: coupon
    assert classify(DEFAULT_RULES, "]Q1", b"short") == 0  # under min_len: the default
    r = compile_rules({"version": 3, "default": 2, "rules": [
        {"action": 1, "symbologies": [], "min_len": 1},  # an empty list matches nothing
        {"action": 0, "prefix": b"69", "check": 1}]})
    assert classify(r, "]E0", b"6901234567892") == 0 and classify(r, "]E0", b"6901234567891") == 2
    assert compile_rules({"version": 4, "default": 0, "rules": [
        {"action": 0, "symbologies": ["E0"]}]}) == "bad symbology"
    # ids are stored as one text; an id with a second "]" could match across two of them
    assert compile_rules({"version": 5, "default": 0, "rules": [
        {"action": 0, "symbologies": ["]A]"]}]}) == "bad symbology"
    r = compile_rules({"version": 6, "default": 2, "rules": [
        {"action": 0, "symbologies": ["]E0", "]E4"]}, {"action": 1, "symbologies": ["]Q1"]}]})
    assert r[2][0][1] == "]E0]E4"
    # (App.scanned passes 3-character ids that start with "]", as the scanner sends them)
    assert [classify(r, s, b"1") for s in ("]E0", "]E4", "]Q1", "]E1", "]0]", "]]E")] == [
        0, 0, 1, 2, 2, 2]


def test_stored_rules_are_checked_field_by_field() -> None:
    from hexiao.firmware.app_rules import stored_rule_ok

    assert stored_rule_ok([1, "]Q1]C0", 8, 512, b"WX", 0])
    assert stored_rule_ok([0, None, None, None, None, 1])
    for bad in ([1, "]Q1]C", None, None, None, 0], [1, "]Q]]C0", None, None, None, 0],
                [1, ["]Q1"], None, None, None, 0], [1, "]Q1", -1, None, None, 0],
                [3, "]Q1", None, None, None, 0], [1, "]Q1", None, None, "WX", 0],
                [1, "]Q1", None, None, None, 2], [1, "]Q1", None, None, None]):
        assert not stored_rule_ok(bad), bad
