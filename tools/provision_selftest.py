"""`hexiao provision`'s self-test: start the provisioned device, then check it over its link
with the new key (handshake, ping, health, the default rules pushed and acknowledged).

Rules this module keeps:
- Every check lands in the Report as pass/fail/n-a/skipped with a detail line; nothing raises
  for a failed check, and checks after a failed handshake are reported as skipped, not dropped.
- The sim board runs its real firmware (SIM_MODULE under MicroPython, in the device's heap) on a
  pty cable; a USB board is reset so that it reads its new /config.json.
- Nothing is written here: provision.py writes, this module only looks.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # provision.py imports this module: its types only for annotations
    from hexiao.tools.provision import Board, Report

SIM_MODULE = "hexiao.firmware.linkpeer"
SIM_HEAP = "64k"  # the device budget (micropython.HEAP): the link peer decodes the rules push
# firmware that can sound a test beep / report a test scan on request; none can yet
BEEP_FIRMWARE: frozenset[str] = frozenset()


@contextlib.contextmanager
def _running_sim(root: Path) -> Iterator[tuple[str, Any]]:
    """The sim board's firmware on a pty cable: yields (host port, DeviceProcess)."""
    from hexiao.tools import micropython, relay

    argv, env = micropython.command(SIM_MODULE, root, heap=SIM_HEAP, args=["cfg=config.json"])
    cable = relay.Cable().start()
    device = None
    try:
        device = relay.DeviceProcess(cable, argv, env, str(root))
        yield cable.host_port, device
    finally:
        cable.close()
        if device is not None:
            device.stop()


def _start(board: Board, report: Report, timeout: float) -> contextlib.AbstractContextManager[
        str | None]:
    @contextlib.contextmanager
    def sim() -> Iterator[str | None]:
        assert board.sim_dir is not None
        with _running_sim(board.sim_dir) as (port, device):
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

    return sim() if board.sim_dir else usb()


def self_test(board: Board, device_id: str, keystore: Path, report: Report,
              timeout: float) -> None:
    from hexiao.hostd.control_client import ControlError
    from hexiao.hostd.lane import DEFAULT_RULES
    from hexiao.protocol.link import EV_ACKED, EV_NACKED
    from hexiao.tools.ctl_direct import DirectDevice

    required = ("handshake", "ping", "health", "rules pushed")
    with _start(board, report, timeout) as port:
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
            support = "" if fw in BEEP_FIRMWARE else f"not supported by this firmware ({fw})"
            report.add("test beep", "n/a", support, required=False)
            report.add("test scan", "n/a", support, required=False)
