"""The lane `hexiao demo` runs, all real: the firmware (hexiao.firmware.main on the sim board,
MicroPython) on a relay.Cable pty, `hexiao-hostd` as a subprocess (so it can be SIGKILLed), the
WeChat simulator in this process (it outlives hostd's kill), a scanner FIFO the demo writes scan
lines to, and a fake POS that reads the device's HID reports and shows them as typed text.
The receipt tap (started on first use): the TapService hexiao-hostd runs with [tap] enabled, in
front of a loopback fake printer, with a POS that prints over TCP through it.
Member points: hexiao-hostd itself runs [tap] (its own key, a second fake printer, the claim API
on loopback), so a member card scanned on the lane earns the points of the receipt printed
through hostd's tap, as in a shop (hostd/members/).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from hexiao.hostd.backends.sim.seed import EXAMPLE, read
from hexiao.hostd.config.types import Tap
from hexiao.hostd.control.server import ControlClient, ControlError
from hexiao.hostd.keystore import Keystore
from hexiao.hostd.tap.escpos import Command, Payload, parse
from hexiao.hostd.tap.keys import read_key
from hexiao.hostd.tap.proxy import ConnRecord, TapProxy
from hexiao.hostd.tap.service import TapError, TapService
from hexiao.tools import micropython
from hexiao.tools.sim import relay

DEVICE_ID = "lane-1"
# hostd's backend timeout and how long reconcile leaves an in-flight consume alone (> timeout)
BACKEND_TIMEOUT_S, SETTLE_AFTER_S = 1.0, 1.5
# what the POS shows for keys that are not text
KEY_NAMES = {0x28: "⏎", 0x2B: "⇥", 0x42: "[F9]", 0x43: "[F10]"}


def _us_table() -> dict[tuple[int, int], str]:
    """(modifier, usage) -> char on a US keyboard, from the HID Usage Tables (page 0x07); kept
    apart from the firmware's own table so the POS checks what the device typed."""
    t: dict[tuple[int, int], str] = {}
    for i, ch in enumerate("abcdefghijklmnopqrstuvwxyz"):
        t[(0, 4 + i)], t[(2, 4 + i)] = ch, ch.upper()
    for i, (plain, shifted) in enumerate(zip("1234567890", "!@#$%^&*()", strict=True)):
        t[(0, 0x1E + i)], t[(2, 0x1E + i)] = plain, shifted
    for pair, usage in ((" ", 0x2C), ("-_", 0x2D), ("=+", 0x2E), ("[{", 0x2F), ("]}", 0x30),
                        ("\\|", 0x31), (";:", 0x33), ("'\"", 0x34), ("`~", 0x35), (",<", 0x36),
                        (".>", 0x37), ("/?", 0x38)):
        t[(0, usage)] = pair[0]
        if len(pair) > 1:
            t[(2, usage)] = pair[1]
    return t


US = _us_table()


def pos_text(lines: list[str]) -> str:
    """The text a POS sees from `HID <mod> <usage>` lines (press, then release `HID 00 00`)."""
    out = []
    for line in lines:
        _, mod, usage = line.split()
        m, u = int(mod, 16), int(usage, 16)
        if u == 0:
            continue  # a release
        out.append(US.get((m, u)) or KEY_NAMES.get(u) or f"[{m:02x}:{u:02x}]")
    return "".join(out)


class SetupError(Exception):
    """The lane could not be set up; the message says why."""


class Lane:
    def __init__(self, workdir: Path, timeout: float, backend_url: str | None = None,
                 heap: str = micropython.HEAP, appid: str | None = None,
                 secret_file: Path | None = None) -> None:
        self.dir, self.timeout, self.heap = workdir, timeout, heap
        # backend_url: any card-API server, driven through its API only (never /_sim/*);
        # appid and secret_file (a 0600 file hostd reads): its credentials
        self.backend_url, self.appid, self.secret_file = backend_url, appid, secret_file
        self.sim: Any = None
        self.cable: relay.Cable | None = None
        self.device: relay.DeviceProcess | None = None
        self.hostd: subprocess.Popen[bytes] | None = None
        self.hostd_starts = 0
        self.scanner = -1
        self.hid = workdir / "pos-hid.txt"
        self.sock = workdir / "run" / "hostd.sock"
        self.hostd_log = workdir / "hostd.log"
        self.pos_seen = 0  # HID lines already shown
        self.tap: ReceiptTap | None = None
        self.points_printer: FakePrinter | None = None  # behind hostd's own tap
        self.points_key = workdir / "hostd-tap.key"
        self._secret_file: Path | None = None

    # -- set-up -------------------------------------------------------------------------------

    def start(self) -> None:
        seed = read(EXAMPLE)
        if self.backend_url is None:
            from hexiao.hostd.backends.sim.server import WeChatSim

            self.sim = WeChatSim(seed).start()
        app = seed["apps"][0]  # the example seed's (fake) credentials unless given
        appid, secret_file = self.appid or app["appid"], self.secret_file
        staged = micropython.stage(self.dir / "device")
        key = os.urandom(32)  # this run's device key: 0600 files only, never printed
        state = self.dir / "state"
        state.mkdir(mode=0o700)
        Keystore(state / "keystore.jsonl", create=True).add(DEVICE_ID.encode(), key)
        cfg = self.dir / "device.json"
        cfg.touch(mode=0o600)
        cfg.write_text(json.dumps({"id": DEVICE_ID, "key": key.hex()}))
        if secret_file is None:
            secret_file = self.dir / "wechat.secret"
            secret_file.touch(mode=0o600)
            secret_file.write_text(app["secret"])
        self._secret_file = secret_file
        self.points_key.touch(mode=0o600)  # hostd's tap key, never printed
        self.points_key.write_text(os.urandom(32).hex() + "\n")
        self.points_printer = FakePrinter()
        self.cable = relay.Cable().start()
        self._write_hostd_config(appid, self.cable.host_port, secret_file.absolute())
        fifo = self.dir / "scanner"
        os.mkfifo(fifo)
        flash = self.dir / "flash"
        flash.mkdir()
        argv, env = micropython.command(
            "hexiao.firmware.main", staged, heap=self.heap,
            args=[f"cfg={cfg}", f"scanner={fifo}", f"hid={self.hid}", f"state={flash}"])
        self.device = relay.DeviceProcess(self.cable, argv, env, str(staged))
        self.scanner = self._open_scanner(fifo)
        self.start_hostd()

    def _write_hostd_config(self, appid: str, port: str, secret_file: Path) -> None:
        # user-given strings as TOML basic strings (JSON's escapes are TOML's)
        url, appid_s = json.dumps(self.backend_url or self.sim.url), json.dumps(appid)
        (self.dir / "hostd.toml").write_text(
            f'[hostd]\nstate_dir = "state"\ncontrol_socket = "{self.sock}"\n'
            f'log_level = "info"\n'
            f'[backend]\nkind = "wechat_card"\nbase_url = {url}\nappid = {appid_s}\n'
            f'secret_file = {json.dumps(str(secret_file))}\n'
            f'timeout_s = {BACKEND_TIMEOUT_S}\nretries = 1\n'
            f'backoff_s = 0.05\nsettle_after_s = {SETTLE_AFTER_S}\n'
            f'[[device]]\nid = "{DEVICE_ID}"\nlane = "lane-1"\nport = "{port}"\n'
            f'[tap]\nenabled = true\nlisten = "127.0.0.1:0"\nlane = "lane-1"\n'
            f'printer = "tcp:127.0.0.1:{self.points_printer.port}"\n'
            f'content = "{TAP_CONTENT}"\nkey_file = {json.dumps(str(self.points_key))}\n'
            f'claim_listen = "127.0.0.1:0"\n'
            # F9, the amount in yuan, Enter: the POS's own cash-discount key
            f'[macros.CASH]\nitems = [[0x42, 0], "{{reduce_cost_yuan}}", [0x28, 0]]\n'
            f'delay_ms = 0\n')

    def _open_scanner(self, fifo: Path) -> int:
        """The scanner FIFO's write end, once the device has opened its read end."""
        assert self.device is not None
        try:
            return self.device.open_writer(fifo, self.timeout)
        except TimeoutError:
            raise SetupError("the device never opened its scanner: "
                             + " | ".join(self.device.other[-4:])) from None

    def start_hostd(self) -> None:
        self.hostd_starts += 1
        with self.hostd_log.open("ab") as log:
            self.hostd = subprocess.Popen(
                [micropython.executable("hexiao-hostd"), "--config",
                 str(self.dir / "hostd.toml")], stdin=subprocess.DEVNULL,
                stdout=log, stderr=log, cwd=self.dir, start_new_session=True)
        self.wait(lambda: self.sock.exists(), "hostd's control socket", hostd=True)

    def kill_hostd(self) -> int:
        """SIGKILL: no clean-up of any kind, as a crash or the OOM killer would."""
        assert self.hostd is not None
        pid = self.hostd.pid
        os.kill(pid, signal.SIGKILL)
        self.hostd.wait(self.timeout)
        self.sock.unlink(missing_ok=True)  # left behind by the dead process
        return pid

    def receipt_tap(self) -> ReceiptTap:
        """The tap, started on first use (the scan steps do not need it)."""
        if self.tap is None:
            self.tap = ReceiptTap(self.dir, self.timeout)
            self.tap.start()
        return self.tap

    def close(self) -> None:
        if self.tap is not None:
            self.tap.close()
        if self.points_printer is not None:
            self.points_printer.close()
        if self.hostd is not None and self.hostd.poll() is None:
            self.hostd.terminate()
            try:
                self.hostd.wait(10)
            except subprocess.TimeoutExpired:
                self.hostd.kill()
                self.hostd.wait(5)
        if self.scanner >= 0:
            os.close(self.scanner)  # the sim board ends its program when its scanner hangs up
        if self.cable is not None:
            self.cable.close()
        if self.device is not None:
            self.device.stop()
        if self.sim is not None:
            self.sim.stop()

    # -- driving and watching -----------------------------------------------------------------

    def scan(self, line: bytes) -> None:
        os.write(self.scanner, line + b"\r\n")

    def wait(self, pred: Callable[[], Any], what: str, *, hostd: bool = False) -> Any:
        """Wait for pred() to be truthy; TimeoutError saying what did not happen."""
        end = time.monotonic() + self.timeout
        while True:
            got = pred()
            if got:
                return got
            if self.device is not None and self.device.proc.poll() is not None:
                raise TimeoutError(f"waiting for {what}: the device program exited: "
                                   + " | ".join(self.device.other[-4:]))
            if hostd and self.hostd is not None and self.hostd.poll() is not None:
                raise TimeoutError(f"waiting for {what}: hostd exited "
                                   f"({self.hostd.returncode}): {self.hostd_tail()}")
            if time.monotonic() > end:
                raise TimeoutError(f"waiting for {what}: nothing after {self.timeout:g} s")
            time.sleep(0.02)

    def hostd_tail(self) -> str:
        try:
            return " | ".join(self.hostd_log.read_text("utf-8", "replace").splitlines()[-3:])
        except OSError:
            return ""

    def hid_lines(self) -> list[str]:
        return self.hid.read_text().splitlines() if self.hid.exists() else []

    def pos_wait(self, want: str, after_other: bool = False) -> str:
        """The POS's new text (complete keystrokes) once it has len(want) keys, or, after_other
        (unchecked scans before), once it ends with want."""
        def ready() -> list[str] | None:
            new = self.hid_lines()[self.pos_seen:]
            done = new[:len(new) - len(new) % 2]
            text = pos_text(done)
            ok = text.endswith(want) if after_other else len(text) >= len(want)
            return done if ok else None

        lines = self.wait(ready, f"the POS to receive {want!r}")
        self.pos_seen += len(lines)
        return pos_text(lines)

    def verdicts(self, scan_id: int) -> list[dict[str, Any]]:
        assert self.device is not None
        return [v for v in self.device.of("verdict") if v["scan_id"] == scan_id]

    def verdict(self, scan_id: int, n: int = 1) -> dict[str, Any]:
        return self.wait(lambda: self.verdicts(scan_id)[n - 1:],
                         f"the device's verdict for scan #{scan_id}")[0]

    def ctl(self, cmd: str, **args: Any) -> Any:
        """A hostd control command, as `hexiao status|journal|device` sends it."""
        client = ControlClient(self.sock, timeout=self.timeout)
        try:
            return client.call(cmd, **args)
        finally:
            client.close()

    def session_open(self) -> dict[str, Any]:
        def opened() -> dict[str, Any] | None:
            try:
                info = self.ctl("device.info", device=DEVICE_ID)
            except (ControlError, OSError):
                return None
            return info if info.get("state") == "open" else None

        return self.wait(opened, "the device's session with hostd", hostd=True)

    def print_via_hostd(self, data: bytes) -> bytes:
        """The POS prints `data` through hostd's own tap; what the printer got."""
        assert self.points_printer is not None
        listening = self.ctl("status")["tap"].get("listening") or ""
        host, _, port = listening.rpartition(":")
        if not port:
            raise OSError(f"hostd's receipt tap is not listening: {self.ctl('status')['tap']}")
        done = len(self.points_printer.jobs)
        with socket.create_connection((host, int(port)), timeout=self.timeout) as pos:
            pos.sendall(data)
            pos.shutdown(socket.SHUT_WR)
            while pos.recv(4096):
                pass
        return self.points_printer.wait_jobs(done + 1, self.timeout)[done]

    def member_info(self, code: str, card_id: str) -> Any:
        """The member's card now, as the card API's card/membercard/userinfo/get says."""
        from hexiao.hostd.backends.wechat_card import WeChatCardClient
        from hexiao.hostd.config.types import read_secret

        assert self._secret_file is not None
        appid = self.appid or read(EXAMPLE)["apps"][0]["appid"]
        with WeChatCardClient(self.url, appid, read_secret(self._secret_file),
                              sleep=lambda s: None) as client:
            return client.member_info(code, card_id)

    # -- the backend's side (the simulator's admin API; absent on a real backend) -------------

    @property
    def url(self) -> str:
        return self.backend_url or self.sim.url

    def sim_state(self) -> dict[str, Any] | None:
        """The built-in simulator's state; None with --backend-url: /_sim/* is ours alone."""
        if self.sim is None:
            return None
        try:
            r = httpx.get(f"{self.url}/_sim/state", timeout=self.timeout)
        except httpx.HTTPError:
            return None
        return r.json() if r.status_code == 200 else None

    def consume_count(self, code: str) -> int | None:
        state = self.sim_state()
        if state is None or code not in state.get("codes", {}):
            return None
        return int(state["codes"][code]["consume_count"])

    def faults(self, **faults: Any) -> None:
        if self.sim is None:
            raise RuntimeError("fault injection needs the built-in simulator, not --backend-url")
        r = httpx.post(f"{self.url}/_sim/faults", json=faults, timeout=self.timeout)
        if r.status_code != 200:
            raise RuntimeError(f"the simulator refused faults {faults}: {r.text}")


# -- the receipt tap ------------------------------------------------------------------------------

TAP_CONTENT = "https://hexiao.example/r/{token}"
DLE_EOT_1 = b"\x10\x04\x01"  # transmit printer status: the POS asks before it prints
PRINTER_STATUS = 0x16         # the fake printer's answer: online, drawer closed


def receipt_bytes(shop: str, items: list[tuple[str, str]], total: str) -> bytes:
    """One Chinese receipt as a POS prints it: ESC @, Chinese mode, a double-size centred shop
    name, item lines and the 合计 line in GB18030, a feed and a full cut."""
    # columns by printed width: a Chinese character takes two half-width cells
    body = [name + " " * max(1, 32 - _cells(name) - len(price)) + price + "\n"
            for name, price in items]
    return b"".join((
        b"\x1b@\x1c&\x1ba\x01\x1d!\x11", f"{shop}\n".encode("gb18030"), b"\x1d!\x00",
        time.strftime("%Y-%m-%d %H:%M  收银员 01\n").encode("gb18030"), b"\x1ba\x00",
        "".join(body).encode("gb18030"), b"\x1bE\x01",
        f"合计: ¥{total}\n".encode("gb18030"), b"\x1bE\x00\x1ba\x01",
        "谢谢惠顾\n".encode("gb18030"), b"\x1bd\x04\x1dV\x00"))


def _cells(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def qr_stored(data: bytes) -> list[bytes]:
    """The data of every GS ( k store command (cn 49, fn 80: 'P') in an ESC/POS stream, read by
    the project's own parser, without the leading m byte (0x30)."""
    found: list[bytes] = []
    store: bytearray | None = None
    left = 0
    for ev in parse(data):
        if store is not None and isinstance(ev, Payload):
            store += ev.raw
            left -= len(ev.raw)
            if left <= 0:
                found.append(bytes(store[1:]))
                store = None
            continue
        store = None
        if isinstance(ev, Command) and ev.name == "GS ( k" and ev.raw[5:7] == b"1P" \
                and ev.payload:
            store, left = bytearray(), ev.payload
    return found


class FakePrinter:
    """A loopback TCP printer: records each connection's bytes, answers DLE EOT n."""

    def __init__(self) -> None:
        self.jobs: list[bytes] = []
        self.cond = threading.Condition()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, name="demo-printer", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf, scanned = bytearray(), 0
        with conn:
            while data := conn.recv(65536):
                buf += data
                while (j := buf.find(b"\x10\x04", scanned)) >= 0 and j + 2 < len(buf):
                    conn.sendall(bytes((PRINTER_STATUS,)))
                    scanned = j + 3
                scanned = max(scanned, len(buf) - 2)
            with self.cond:  # recorded before the close, so the tap's job is done by then
                self.jobs.append(bytes(buf))
                self.cond.notify_all()

    def wait_jobs(self, n: int, timeout: float) -> list[bytes]:
        with self.cond:
            if not self.cond.wait_for(lambda: len(self.jobs) >= n, timeout):
                raise TimeoutError(f"waiting for the printer's job {n}: nothing after "
                                   f"{timeout:g} s")
            return list(self.jobs)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


class ReceiptTap:
    """A fake printer with the tap in front, assembled as hexiao-hostd runs it with [tap]
    enabled (TapService), its key in a 0600 file; the POS prints through `print_receipt`."""

    def __init__(self, workdir: Path, timeout: float, lane: str = DEVICE_ID) -> None:
        self.timeout, self.lane = timeout, lane
        self.key_file = workdir / "tap.key"
        self.printer: FakePrinter | None = None
        self.service: TapService | None = None
        self.proxy: TapProxy | None = None

    def start(self) -> None:
        self.key_file.touch(mode=0o600)  # the key is written to a 0600 file, never printed
        self.key_file.write_text(os.urandom(32).hex() + "\n")
        self.key = read_key(self.key_file)
        self.printer = FakePrinter()
        cfg = Tap(enabled=True, listen="127.0.0.1:0",
                  printer=f"tcp:127.0.0.1:{self.printer.port}", profile="generic-80",
                  content=TAP_CONTENT, lane=self.lane, key_file=self.key_file,
                  connect_timeout_s=self.timeout, printer_timeout_s=self.timeout)
        self.service = TapService(cfg)
        try:
            self.service.start()
        except TapError as e:  # the demo reports a tap that cannot start as an OSError
            raise OSError(e.where()) from None
        self.proxy = self.service.proxy

    def print_receipt(self, data: bytes) -> tuple[bytes, ConnRecord, bytes]:
        """The POS connects, asks for the printer's status, prints `data` and closes. Returns
        the status reply it got, the tap's record of the connection and what the printer got."""
        assert self.proxy is not None and self.printer is not None
        done = self.proxy.ended
        with socket.create_connection(self.proxy.address, timeout=self.timeout) as pos:
            pos.sendall(DLE_EOT_1)
            status = pos.recv(1)
            pos.sendall(data)
            pos.shutdown(socket.SHUT_WR)  # end of job; the tap closes after the printer does
            while pos.recv(4096):
                pass
        rec = self.proxy.wait_finished(done + 1, self.timeout)[-1]
        job = self.printer.wait_jobs(done + 1, self.timeout)[-1]
        return status, rec, job

    def close(self) -> None:
        if self.service is not None:
            self.service.stop()
        if self.printer is not None:
            self.printer.close()
