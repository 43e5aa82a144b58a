"""`device.update` (hostd/control/handlers.py) through a real DeviceLane to the sim board, and
`hexiao device update`'s own refusals. The sim board is started again whenever it resets
(exit 6), as a board's reset would; the lane finds it on its new port, as hostd finds a board
that came back on USB."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hexiao.hostd.control.client import ControlError
from hexiao.hostd.control.handlers import ControlHandlers
from hexiao.hostd.lanes.lane import DeviceLane
from hexiao.protocol import fw_image
from hexiao.tools import micropython
from hexiao.tools.install import bundle
from hexiao.tools.sim import relay
from hexiao.tools.sim.board import recover_switch
from hexiao.tools.support import ctl
from test_firmware_sim import KID, device_cfg
from test_fw_update import DEVICE_KEY, RESET, board, forged, installed, kit  # noqa: F401

# The device budget, with hostd's lane connected (its rules pushed, its pings): it used to run
# out of memory mid-update in about half the runs (issue 14); since the update's overlays were
# split (app_fwchunk per chunk, app_update per offer/commit) and a stable run's end moved out
# of the armed heap (stable_end), it runs at the device's 64 KB.
UPDATE_HEAP = micropython.HEAP


class Runner:
    """The sim board in `root`, started again after each reset, until close()."""

    restart_on: tuple[int, ...] = (RESET,)  # exit codes after which a board starts again

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.exits = root, None, []  # type: ignore[var-annotated]
        self.stderr: list[str] = []  # the last run's other output (a failing test shows it)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._hold = -1
        self._device: relay.DeviceProcess | None = None
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            recover_switch(self.root)  # the board's root main.py's first step
            fifo = self.root / f"scanner-{n}"
            os.mkfifo(fifo)
            hold = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # no EOF while we hold it
            with self._lock:  # close() may have come first: then no board is started at all
                if self._stop.is_set():
                    os.close(hold)
                    return
                self._hold = hold
            argv, env = micropython.command(
                "hexiao.firmware.main", self.root, heap=UPDATE_HEAP,
                args=[f"cfg={device_cfg(self.root, DEVICE_KEY)}", f"scanner={fifo}",
                      f"hid={self.root}/hid.log", f"state={self.root}/state", "stable=300"])
            cable = relay.Cable().start()
            device = self._device = relay.DeviceProcess(cable, argv, env, str(self.root))
            self.port = cable.host_port
            rc = device.proc.wait()
            self.stderr = device.other[-12:]
            self.port = None
            self.exits.append(rc)
            cable.close()
            self._end_scanner()
            if rc not in self.restart_on:
                return

    def _end_scanner(self) -> None:
        with self._lock:
            if self._hold >= 0:
                os.close(self._hold)  # the scanner's end of input: the sim board ends
                self._hold = -1

    def close(self) -> None:
        self._stop.set()
        self._end_scanner()
        self._t.join(3)
        if self._t.is_alive() and self._device is not None:
            # closed before the firmware opened its scanner FIFO: its open() waits for a writer
            # that will never come (the board would sit there until the machine stops)
            self._device.proc.kill()
            self._t.join(30)


class _NoEngine:
    """No scans in these tests: the lane's worker only closes its engine."""

    def __init__(self) -> None:
        self.journal = self.client = self

    def close(self) -> None:
        pass


@pytest.fixture
def lane(board: Path) -> Any:  # noqa: F811
    runner = Runner(board)
    dl = DeviceLane(KID.decode(), KID, "lane-1", lambda: runner.port,
                    lambda kid: DEVICE_KEY if kid == KID else None,
                    engine_factory=_NoEngine, macros={},  # type: ignore[arg-type]
                    backoff=(0.1, 0.5)).start()
    try:
        yield dl, runner
    finally:
        dl.close()
        runner.close()


def handlers(dl: DeviceLane) -> ControlHandlers:
    return ControlHandlers({dl.id: dl}, Path("/nonexistent"), None,  # type: ignore[arg-type]
                           reconcile=list, started=time.time(), update_restart_s=90)


def args(offer: dict[str, Any], img: bytes, tmp: Path) -> dict[str, Any]:
    path = tmp / "fw.img"
    path.write_bytes(img)
    return {"image": str(path), "digest": offer["digest"].hex(), "size": offer["size"],
            "manifest_size": offer["manifest_size"], "signature": offer["signature"].hex(),
            "board": offer["board"], "version": offer["version"], "counter": offer["counter"]}


def wait_open(dl: DeviceLane) -> None:
    end = time.monotonic() + 60
    while dl.state != "open":
        assert time.monotonic() < end, f"the lane never opened: {dl.state} {dl.last_error}"
        time.sleep(0.05)


def test_device_update_through_a_lane(kit, board: Path, lane, tmp_path: Path) -> None:  # noqa: F811
    dl, runner = lane
    wait_open(dl)
    offer, img = forged(kit, "1.1.0", 3)
    try:
        out = handlers(dl).device_update(dl.id, **args(offer, img, tmp_path))
    finally:
        print("exits", runner.exits, "lane", dl.state, dl.last_error, *runner.stderr, sep="\n")
    assert (out["version"], out["sent"]) == ("1.1.0", len(img))
    assert out["state"] in ("trial", "confirmed")  # stable=300: it may be confirmed already
    assert runner.exits[:2] == [RESET, RESET]  # to install, then to boot it
    assert installed(board)["version"] == "1.1.0"


def test_a_request_ends_when_its_session_does_not_at_its_timeout(board: Path, lane) -> None:  # noqa: F811
    """A device that goes away mid-request (reset, cable pulled) cannot answer on that session:
    the caller hears so at once (ConnectionError: `device.update` says "run it again, it
    resumes"), not after its whole timeout as a device that "did not answer"."""
    dl, runner = lane
    wait_open(dl)
    asked: dict[str, Any] = {}
    sent = threading.Event()
    send = dl._send

    def spy(msg: dict[str, Any]) -> None:  # the request is on the wire before the power goes
        send(msg)
        if msg.get("type") == "health_get":
            sent.set()

    dl._send = spy  # type: ignore[method-assign]

    def ask() -> None:
        try:  # an answer type the device never sends: only the session's end can end this
            dl.request({"type": "health_get"}, "no_such_answer", timeout=120)
        except Exception as e:
            asked["error"] = e

    t = threading.Thread(target=ask, daemon=True)
    t.start()
    assert sent.wait(30)
    assert runner._device is not None
    runner._device.proc.kill()  # the board loses power: not a reset, so not started again
    t.join(60)  # a hang guard: the fix answers at once, the old code after 120 s
    assert not t.is_alive()
    assert isinstance(asked.get("error"), ConnectionError), asked
    assert "went away before it answered health_get" in str(asked["error"])


def test_device_update_refused_by_the_device_says_why(kit, board: Path, lane,  # noqa: F811
                                                      tmp_path: Path) -> None:
    dl, _ = lane
    wait_open(dl)
    offer, img = forged(kit, "1.1.0", 3, key=Ed25519PrivateKey.generate())
    with pytest.raises(ControlError) as e:
        handlers(dl).device_update(dl.id, **args(offer, img, tmp_path))
    assert e.value.kind == "refused" and "bad signature" in e.value.message
    assert installed(board)["version"] == "1.0.0"
    offer, img = forged(kit, "0.9.0", 1)  # a downgrade: refused at the offer
    with pytest.raises(ControlError) as e:
        handlers(dl).device_update(dl.id, **args(offer, img, tmp_path))
    assert e.value.kind == "refused" and "downgrade" in e.value.message


def test_device_update_bad_requests(kit, lane, tmp_path: Path) -> None:  # noqa: F811
    dl, _ = lane
    offer, img = forged(kit, "1.1.0", 3)
    a = args(offer, img, tmp_path)
    with pytest.raises(ControlError, match="not the image offered"):
        handlers(dl).device_update(dl.id, **{**a, "size": a["size"] + 1})
    with pytest.raises(ControlError, match="absolute path"):
        handlers(dl).device_update(dl.id, **{**a, "image": "fw.img"})
    with pytest.raises(ControlError, match="no device"):
        handlers(dl).device_update("nope", **a)


def test_the_cli_refuses_a_bad_bundle_in_one_line(kit, tmp_path: Path) -> None:  # noqa: F811
    r = CliRunner().invoke(ctl.device_main, ["update", "till-1", str(tmp_path / "no.tar")])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "not-found" in r.output
    unsigned = tmp_path / "unsigned.tar"
    bundle.write_container(unsigned, kit["manifest"], None, kit["files"])
    r = CliRunner().invoke(ctl.device_main, ["update", "till-1", str(unsigned)])
    assert r.exit_code == 1 and "not signed" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(ctl.device_main, ["update", "till-1", str(kit["v1"]),
                                             "--socket", str(tmp_path / "none.sock")])
    assert r.exit_code == 3, r.output  # hostd is not running: said so, nothing sent
    assert fw_image.CHUNK <= 768
