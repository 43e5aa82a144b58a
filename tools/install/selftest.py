"""`hexiao provision`'s self-test: start the provisioned device, then check it over its link
with the new key (handshake, ping, health, the default rules pushed and acknowledged).

Rules this module keeps:
- Every check lands in the Report as pass/fail/n-a/skipped with a detail line; nothing raises
  for a failed check, and checks after a failed handshake are reported as skipped, not dropped.
- The sim board runs its real firmware (SIM_MODULE under MicroPython, in its 64 KB heap) on a
  pty cable, its scanner a FIFO the test scan is written to;
  a USB board is reset so that it reads its new /config.json, and its test scan is the
  installer scanning the printed test code (n/a, not a failure, when none comes).
- Nothing is written here: provision.py writes, this module only looks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hexiao.tools.install.device import Board, Report

SIM_MODULE = "hexiao.firmware.main"  # the application the sim board runs
TEST_CODE = "HEXIAO-TEST"  # what the printed test code carries (QR): ]Q1HEXIAO-TEST


@contextlib.contextmanager
def _running_sim(root: Path) -> Iterator[tuple[str, Any, int]]:
    """The sim board's firmware on a pty cable: yields (host port, DeviceProcess, the write end
    of its scanner FIFO)."""
    import tempfile

    from hexiao.tools import micropython
    from hexiao.tools.sim import relay

    with tempfile.TemporaryDirectory(prefix="hexiao-selftest-") as tmp:
        fifo = Path(tmp) / "scanner"
        os.mkfifo(fifo, 0o600)
        scanner = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # held: no end of input for it
        argv, env = micropython.command(
            SIM_MODULE, root, heap=micropython.HEAP,
            args=["cfg=config.json", f"scanner={fifo}", f"hid={tmp}/hid.log"])
        cable = relay.Cable().start()
        device = None
        try:
            device = relay.DeviceProcess(cable, argv, env, str(root))
            yield cable.host_port, device, scanner
        finally:
            cable.close()
            os.close(scanner)
            if device is not None:
                device.stop()


def _start(board: Board, report: Report, timeout: float) -> contextlib.AbstractContextManager[
        str | None]:
    @contextlib.contextmanager
    def sim() -> Iterator[str | None]:
        assert board.sim_dir is not None
        with _running_sim(board.sim_dir) as (port, device, scanner):
            sim_io[:] = [device, scanner]
            try:
                device.wait_for(lambda ev: [e for e in ev if e["ev"] == "boot"], timeout)
            except TimeoutError as e:
                tail = str(e).strip().splitlines()[-1] if str(e).strip() else ""
                report.add("device starts", "fail", f"the firmware did not boot: "
                           f"{str(e).splitlines()[0]} ({tail})")
                yield None
                return
            report.add("device starts", "pass", f"{SIM_MODULE} on {port}")
            yield port

    @contextlib.contextmanager
    def usb() -> Iterator[str | None]:
        board.target.reset()  # the firmware reads /config.json at boot
        report.add("device starts", "pass", f"reset {board.port}")
        yield board.port

    sim_io: list[Any] = []  # the sim board's DeviceProcess and scanner, for the test scan
    cm = sim() if board.sim_dir else usb()
    cm.sim_io = sim_io  # type: ignore[attr-defined]
    return cm


def self_test(board: Board, device_id: str, keystore: Path, report: Report,
              timeout: float) -> None:
    from hexiao.hostd.control.client import ControlError
    from hexiao.hostd.lanes.lane import DEFAULT_RULES
    from hexiao.protocol.link import EV_ACKED, EV_NACKED
    from hexiao.tools.support.ctl_direct import DirectDevice

    required = ("handshake", "ping", "health", "rules pushed")
    starter = _start(board, report, timeout)
    with starter as port:
        dev = None
        try:
            if port is not None:
                dev = DirectDevice(port, keystore, device_id, timeout)
        except ControlError as e:
            report.add("handshake", "fail", e.message)
        if dev is None:
            done = {c.name for c in report.checks}
            for name in (n for n in required if n not in done):
                report.add(name, "skipped", "not run: an earlier check failed")
            return
        with dev:
            fw = str(dev.peer.get("firmware", "?"))
            report.add("handshake", "pass", f"with the new key; firmware {fw}, "
                       f"board {dev.peer.get('board', '?')}")
            for name, call in (("ping", lambda: f"{dev.ping(os.urandom(8))['rtt_ms']} ms"),
                               ("health", lambda: "heap free {heap_free}, uptime {uptime_ms} ms"
                                .format(**dev.health()))):
                try:
                    report.add(name, "pass", call())
                except (ControlError, KeyError) as e:
                    report.add(name, "fail", getattr(e, "message", f"bad reply: {e}"))
            if not dev.link.send(DEFAULT_RULES):
                report.add("rules pushed", "fail", "the link's send queue is full")
            else:
                try:
                    got = dev.events.wait(lambda: dev.events.of(EV_ACKED, "rules")
                                          or dev.events.of(EV_NACKED, "rules"), timeout,
                                          "the rules' ack")
                    ok = got[0][0] == EV_ACKED
                    report.add("rules pushed", "pass" if ok else "fail",
                               "default classifier rules acknowledged" if ok
                               else f"the device refused the rules: {got[0][2]}")
                except TimeoutError:
                    report.add("rules pushed", "fail", f"no ack within {timeout:g} s (out of "
                               f"heap decoding them?)")
            _test_scan(dev, starter.sim_io, timeout, report)


def _test_scan(dev: Any, sim_io: list[Any], timeout: float, report: Report) -> None:
    """A scan of the test code reaches the host (the sim board: written to its scanner; a USB
    board: the installer scans the printed code), and the host's answer beeps and lights."""
    from hexiao.protocol.link import EV_MESSAGE

    if sim_io:
        os.write(sim_io[1], f"]Q1{TEST_CODE}\r\n".encode())
    try:
        ev = dev.events.wait(lambda: [e for e in dev.events.of(EV_MESSAGE, "scan")
                                      if e[1]["data"] == TEST_CODE.encode()], timeout,
                             "the test scan")
    except TimeoutError:
        report.add("test scan", "n/a", f"no scan of the printed test code ({TEST_CODE}) within "
                   f"{timeout:g} s: scan it during the self-test to check the scan engine",
                   required=False)
        report.add("test beep", "n/a", "needs the test scan", required=False)
        return
    sid = ev[0][1]["scan_id"]
    report.add("test scan", "pass", f"the scan engine's read of {TEST_CODE} reached the host "
               f"(scan {sid})", required=False)
    from hexiao.protocol import messages

    dev.link.send({"type": "verdict", "scan_id": sid, "outcome": messages.OUTCOMES.index("info"),
                   "beep": messages.BEEPS.index("ok"), "led": messages.LEDS.index("blue"),
                   "text": "hexiao self-test ok"})
    if not sim_io:
        report.add("test beep", "pass", "answered with an ok beep and a blue light: did the "
                   "device beep and light?", required=False)
        return
    try:
        shown = sim_io[0].wait_for(lambda evs: [e for e in evs if e["ev"] == "verdict"
                                                and e.get("scan_id") == sid], timeout)[0]
    except TimeoutError:
        report.add("test beep", "fail", "the device did not show the host's answer",
                   required=False)
        return
    ok = (shown.get("beep"), shown.get("led")) == ("ok", "blue")
    report.add("test beep", "pass" if ok else "fail", f"the device sounded {shown.get('beep')} "
               f"and lit {shown.get('led')}", required=False)
