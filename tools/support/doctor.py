"""`hexiao doctor`: check a lane end to end and say what is wrong and what to do.

    hexiao doctor [--config /etc/hexiao/hostd.toml] [--timeout 5] [--json]

Checks, in order: the config loads; hostd answers on its control socket; ModemManager is not
in a position to grab the ports; per configured device: present (fixed port, or USB serial via
hostd.discovery), this user may open its port, its key is in the keystore, its handshake works
(through hostd's device.info when hostd runs, else directly on the port: hostd holds the port
while it runs); the backend answers HTTP, the WeChat card API gives a token (45009 = the daily
token quota is used up), this machine's clock agrees with the backend's Date header within
60 s; the tap's printer accepts a connection, and (when hostd runs) hostd's tap is listening
and has not lost that printer. Every check is ok / fail / warn / n/a with a one-line fix that
fits the port: a sim board's DIR/tty is started with `hexiao sim board`, a USB board is
cabled and in the udev rules.
The token check asks the token endpoint as hostd does (cgi-bin/stable_token in normal mode:
the tills' shared token, never invalidated by asking; a central backend.token_url otherwise).

Exit codes: 0 nothing failed (warnings allowed), 1 at least one check failed, 2 usage error.
"""

from __future__ import annotations

import email.utils
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click
from hexiao.hostd.config import Config, ConfigError, Device, load

DEFAULT_CONFIG = Path("/etc/hexiao/hostd.toml")  # as hexiao-hostd's
MAX_SKEW_S = 60.0
PROC_DIR = Path("/proc")
RULES_DIRS = (Path("/etc/udev/rules.d"), Path("/run/udev/rules.d"), Path("/lib/udev/rules.d"),
              Path("/usr/lib/udev/rules.d"))


@dataclass
class Result:
    name: str
    status: str  # ok | fail | warn | n/a
    detail: str
    fix: str = ""


class Doctor:
    def __init__(self, config_path: Path, timeout: float) -> None:
        self.config_path, self.timeout = config_path, timeout
        self.results: list[Result] = []
        self.hostd_up = False

    def add(self, name: str, status: str, detail: str, fix: str = "") -> None:
        self.results.append(Result(name, status, detail, fix))

    def run(self) -> list[Result]:
        try:
            cfg = load(self.config_path)
        except ConfigError as e:
            self.add("config", "fail", "; ".join(e.errors),
                     f"fix the config, then `hexiao-hostd --config {self.config_path} "
                     f"--check-config`")
            return self.results
        self.add("config", "ok", f"{self.config_path}: {len(cfg.devices)} device(s), "
                 f"lanes {', '.join(la.name for la in cfg.lanes)}")
        self.private_files(cfg)
        self.hostd(cfg)
        self.modemmanager()
        for dev in cfg.devices:
            self.device(cfg, dev)
        self.backend(cfg)
        self.printer(cfg)
        self.tap(cfg)
        return self.results

    def private_files(self, cfg: Config) -> None:
        """The rule --check-config and hostd's start apply (hostd/config/private.py)."""
        from hexiao.hostd.config import private

        unsafe = private.problems(cfg)
        if unsafe:
            self.add("private files", "fail", "; ".join(unsafe),
                     "run the chmod each line names; replace any secret others may have read")
        else:
            self.add("private files", "ok", "keys, secrets and the journal are 0600, the state "
                     "folder 0700")

    # -- hostd --------------------------------------------------------------------------------

    def _ask(self, cfg: Config, cmd: str, **args: Any) -> Any:
        from hexiao.hostd.control.client import ControlClient

        with ControlClient(cfg.hostd.control_socket, timeout=self.timeout) as c:
            return c.call(cmd, **args)

    def hostd(self, cfg: Config) -> None:
        from hexiao.hostd.control.client import START_HINT, ControlError, HostdNotRunning

        try:
            st = self._ask(cfg, "status")
        except HostdNotRunning:
            self.add("hostd", "fail", f"hostd is not running (no answer on "
                     f"{cfg.hostd.control_socket})",
                     START_HINT[0].upper() + START_HINT[1:] + f" (--config {self.config_path})")
            return
        except ControlError as e:
            self.add("hostd", "fail", e.message, "run as root or as a member of the socket's "
                     "group" if e.kind == "forbidden" else "see hostd's log: journalctl -u "
                     "hexiao-hostd")
            return
        self.hostd_up = True
        self.add("hostd", "ok", f"running (pid {st.get('pid')}, up {st.get('uptime_s')} s)")

    # -- the machine --------------------------------------------------------------------------

    def modemmanager(self) -> None:
        running = False
        for comm in PROC_DIR.glob("[0-9]*/comm"):
            try:
                running = comm.read_text().strip() == "ModemManager"
            except OSError:
                continue  # the process ended while we looked
            if running:
                break
        if not running:
            self.add("modemmanager", "ok", "ModemManager is not running")
            return
        rules = [p for d in RULES_DIRS if d.is_dir() for p in sorted(d.glob("*.rules"))
                 if _mentions(p, "ID_MM_DEVICE_IGNORE") and _mentions(p, "HEXIAO")]
        if rules:
            self.add("modemmanager", "ok", f"ModemManager is running; {rules[0]} keeps it "
                     f"off hexiao ports (ID_MM_DEVICE_IGNORE)")
        else:
            self.add("modemmanager", "fail", "ModemManager is running and no udev rule keeps "
                     "it off hexiao ports: it may probe the port with AT commands and hold it",
                     "sudo hexiao udev install (or: sudo systemctl disable --now ModemManager)")

    # -- devices ------------------------------------------------------------------------------

    def device(self, cfg: Config, dev: Device) -> None:
        from hexiao.hostd.lanes.discovery import finder

        name = f"device {dev.id}"
        where = dev.port or f"USB serial {dev.match.serial if dev.match else '?'}"
        port = finder(dev)()
        info: dict[str, Any] | None = None
        if self.hostd_up:
            info = self._hostd_device(cfg, dev)
        if port is None:
            self.add(f"{name}: present", "fail", f"not found ({where})", _absent_fix(dev))
        else:
            self.add(f"{name}: present", "ok", port)
        self._permission(name, port, info)
        self._key(cfg, dev, name)
        self._handshake(cfg, dev, name, port, info)

    def _hostd_device(self, cfg: Config, dev: Device) -> dict[str, Any] | None:
        from hexiao.hostd.control.client import ControlError

        try:
            return dict(self._ask(cfg, "device.info", device=dev.id))
        except ControlError as e:
            return {"state": "unknown", "error": e.message}

    def _permission(self, name: str, port: str | None, info: dict[str, Any] | None) -> None:
        if port is None or "://" in port:
            self.add(f"{name}: permission", "n/a", "no device file to open" if port is None
                     else f"{port} is a pyserial URL")
            return
        if info and info.get("state") in ("connecting", "open"):
            self.add(f"{name}: permission", "ok", f"hostd has {port} open")
            return
        fix = (f"give hostd's user access: sudo hexiao udev install (group hexiao, 0660), or "
               f"add the user to {port}'s group (ls -l {port})")
        if not os.access(port, os.R_OK | os.W_OK):
            self.add(f"{name}: permission", "fail", f"{port}: this user may not read and write "
                     f"it", fix)
            return
        if self.hostd_up:  # hostd may be about to open it: do not take it
            self.add(f"{name}: permission", "ok", f"{port}: read/write allowed")
            return
        try:
            os.close(os.open(port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))
        except PermissionError:
            self.add(f"{name}: permission", "fail", f"{port}: permission denied on open", fix)
            return
        except OSError as e:
            self.add(f"{name}: permission", "fail", f"{port}: cannot open: {e.strerror}",
                     "another program may hold it (ModemManager, a terminal): "
                     f"fuser -v {port}")
            return
        self.add(f"{name}: permission", "ok", f"{port}: opened read/write")

    def _key(self, cfg: Config, dev: Device, name: str) -> None:
        from hexiao.hostd.keystore import Keystore, KeystoreError

        path = Path(cfg.keystore.path or "")
        try:
            ks = Keystore(path)
        except KeystoreError as e:
            self.add(f"{name}: key", "fail", str(e), "run as hostd's user, or provision: "
                     f"hexiao provision --config {self.config_path} ...")
            return
        if dev.kid in ks:
            self.add(f"{name}: key", "ok", f"in {path}")
        else:
            self.add(f"{name}: key", "fail", f"no key for {dev.id} in {path}",
                     f"provision it: hexiao provision --port PORT --id {dev.id} --lane "
                     f"{dev.lane} --config {self.config_path}")

    def _handshake(self, cfg: Config, dev: Device, name: str, port: str | None,
                   info: dict[str, Any] | None) -> None:
        n = f"{name}: handshake"
        mismatch = ("key mismatch: the device's frames fail the MAC (its key is not the one in "
                    "the keystore)")
        reprovision = (f"re-provision it: hexiao provision --force --id {dev.id} --lane "
                       f"{dev.lane} --config {self.config_path} ... (then restart hostd)")
        if info is not None:  # through hostd
            state, err = info.get("state"), info.get("error") or ""
            peer = info.get("peer") or {}
            foreign = (info.get("counters") or {}).get("foreign_device") or (
                info.get("stats") or {}).get("foreign_device")
            wrong_port = ("check which device is cabled to which port (hexiao device ports), "
                          "then fix the cabling or this [[device]]'s port")
            if state == "open":
                self.add(n, "ok", f"session open via hostd; firmware {peer.get('firmware')}")
            elif state == "unknown":
                self.add(n, "fail", f"hostd: {err}", "restart hostd to load the config")
            elif state == "no key":  # hostd leaves the port alone until the key is there
                self.add(n, "fail", f"hostd has no key for {dev.id}: it waits",
                         err.partition("keystore: ")[2] or "provision it: hexiao provision")
            elif foreign and "refused" in err:  # another device id talks on this port
                self.add(n, "fail", f"hostd: {err}", wrong_port)
            elif (info.get("counters") or {}).get("mac"):
                self.add(n, "fail", mismatch, reprovision)
            elif state == "connecting":
                self.add(n, "fail", f"hostd has {info.get('port')} open but no session yet",
                         "is hexiao firmware running? replug the device or check `hexiao "
                         f"device logs {dev.id}`")
            else:
                self.add(n, "fail", f"hostd: {state}" + (f": {err}" if err else ""),
                         "see the checks above")
            return
        if port is None:
            self.add(n, "n/a", "the device is not present")
            return
        from hexiao.hostd.control.client import ControlError
        from hexiao.tools.support.ctl_direct import DirectDevice

        try:
            with DirectDevice(port, Path(cfg.keystore.path or ""), dev.id, self.timeout) as d:
                self.add(n, "ok", f"direct on {port}; firmware {d.peer.get('firmware')}")
        except ControlError as e:
            if "refused (" in e.message and "mac" in e.message.split("refused (")[1]:
                self.add(n, "fail", mismatch, reprovision)
            else:
                self.add(n, "fail", e.message, "check the checks above; replug the device")

    # -- backend and printer ------------------------------------------------------------------

    def backend(self, cfg: Config) -> None:
        import httpx

        b = cfg.backend
        if not b.base_url:
            for what in ("backend", "clock"):
                self.add(what, "n/a", 'kind = "sim": hostd runs its embedded simulator')
            return
        t0 = time.monotonic()
        try:
            r = httpx.get(b.base_url, timeout=self.timeout)
        except httpx.HTTPError as e:
            self.add("backend", "fail", f"cannot reach {b.base_url}: {type(e).__name__} {e}",
                     "check the network, DNS, proxy and firewall, and backend.base_url in "
                     f"{self.config_path}")
            self.add("clock", "n/a", "the backend did not answer")
            return
        ms = round((time.monotonic() - t0) * 1000)
        self.add("backend", "ok", f"{b.base_url} answered HTTP {r.status_code} in {ms} ms")
        if b.kind == "wechat_card":
            self._token(cfg)
        self._clock(r.headers.get("date"), b.base_url)

    def _token(self, cfg: Config) -> None:
        from hexiao.hostd.backends import wechat_card as wc
        from hexiao.hostd.backends.base import QuotaExceeded, WeChatError

        try:
            args = {**cfg.backend.card_client_args(), "retries": 0, "timeout_s": self.timeout}
            with wc.WeChatCardClient(**args) as client:
                client.token(force=True)
        except ConfigError as e:
            self.add("backend token", "fail", "; ".join(e.errors), "run as hostd's user")
        except QuotaExceeded as e:
            self.add("backend token", "fail", f"token quota exhausted ({e})",
                     "wait for the daily reset (midnight, China time); share one token "
                     "between tills with backend.token_url so they stop using it up")
        except WeChatError as e:
            self.add("backend token", "fail", f"no access token: {e}",
                     "check backend.appid and the secret file (WeChat: 40125 = wrong secret, "
                     "40164 = this IP is not whitelisted)")
        else:
            self.add("backend token", "ok", f"access token issued for {cfg.backend.appid}")

    def _clock(self, date: str | None, url: str) -> None:
        if not date:
            self.add("clock", "warn", f"{url} sent no Date header: clock not checked",
                     "check NTP: timedatectl")
            return
        try:
            theirs = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            self.add("clock", "warn", f"unreadable Date header {date!r}", "check NTP: timedatectl")
            return
        skew = time.time() - theirs
        text = f"this machine is {abs(skew):.0f} s {'ahead of' if skew > 0 else 'behind'} {url}"
        if abs(skew) > MAX_SKEW_S:
            self.add("clock", "fail", f"{text} (more than {MAX_SKEW_S:g} s)",
                     "sync the clock: sudo timedatectl set-ntp true (coupon windows and "
                     "journal times depend on it)")
        else:
            self.add("clock", "ok", text)

    def printer(self, cfg: Config) -> None:
        tap = cfg.tap
        if not tap.enabled:
            self.add("printer", "n/a", "the tap is off (tap.enabled = false)")
            return
        kind, _, where = tap.printer.partition(":")
        fix = f"switch the printer on, check its cable/network and tap.printer ({tap.printer})"
        if kind == "tcp":
            host, _, port = where.rpartition(":")
            try:
                socket.create_connection((host.strip("[]"), int(port)), self.timeout).close()
            except OSError as e:
                self.add("printer", "fail", f"printer offline: cannot connect to {where} "
                         f"({e.strerror or e})", fix)
                return
            self.add("printer", "ok", f"{where} accepts connections")
            return
        path = where.split("@")[0] if kind == "serial" else where
        if os.access(path, os.W_OK):
            self.add("printer", "ok", f"{path} is writable")
        else:
            self.add("printer", "fail", f"printer offline: {path} is missing or not writable",
                     fix)


    def tap(self, cfg: Config) -> None:
        """The tap as hostd runs it (its `status`): listening, and its printer not lost."""
        if not cfg.tap.enabled or not self.hostd_up:
            return  # off: the printer check said so; hostd down: the hostd check did
        from hexiao.hostd.control.client import ControlError

        try:
            tap = self._ask(cfg, "status").get("tap") or {"state": "off"}
        except ControlError as e:
            self.add("tap", "fail", f"hostd did not answer: {e.message}",
                     "see hostd's log: journalctl -u hexiao-hostd")
            return
        if tap["state"] == "off":
            self.add("tap", "fail", "hostd runs without the tap (started before tap.enabled "
                     "was set, or with another config)",
                     "restart hostd: systemctl restart hexiao-hostd")
            return
        if tap["state"] != "listening":
            self.add("tap", "fail", f"hostd's tap is not running: {tap.get('error')}",
                     "fix what it names: hostd tries again every 10 s, redeeming meanwhile")
            return
        printer, n = tap["printer"], tap["counters"]
        if printer["state"] == "lost":
            self.add("tap", "warn", f"listening on {tap['listening']}, but hostd last found "
                     f"the printer lost: {printer['error']}",
                     f"switch the printer on, check its cable/network and tap.printer "
                     f"({printer['target']}); receipts print unchanged when it is back")
            return
        self.add("tap", "ok", f"hostd's tap listens on {tap['listening']}, printer "
                 f"{printer['target']} {printer['state']}; {n['receipts']} receipt(s), "
                 f"{n['injections']} QR code(s) added")


def sim_board_dir(port: str | None) -> Path | None:
    """The sim board folder whose link `port` is (DIR/tty, DIR flashed), else None."""
    if not port or "://" in port:
        return None
    p = Path(port)
    return p.parent if p.name == "tty" and (p.parent / "hexiao" / "firmware").is_dir() else None


def _absent_fix(dev: Device) -> str:
    """What to do about a device that is not there, for its kind of port."""
    board = sim_board_dir(dev.port)
    if board is not None:
        return (f"the sim board is not running: start it with `hexiao sim board --dir "
                f"{board}` (hostd connects by itself)")
    if dev.port and "://" not in dev.port and not dev.port.startswith("/dev/"):
        return (f"start whatever serves {dev.port} (a pty or link); `hexiao device list` shows "
                "what hostd sees")
    return ("plug the device in and check its USB cable (a data cable, not charge-only); "
            "`hexiao device ports` lists the boards on USB, `hexiao device list` what hostd "
            "sees" + ("" if dev.port else "; udev rules: sudo hexiao udev install"))


def _mentions(path: Path, text: str) -> bool:
    try:
        return text in path.read_text(errors="replace")
    except OSError:
        return False


_MARK = {"ok": "ok  ", "fail": "FAIL", "warn": "warn", "n/a": "n/a "}


@click.command("doctor", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_CONFIG, show_default=True, help="hostd's config file.")
@click.option("--timeout", type=click.FloatRange(0.1, 60), default=5.0, show_default=True,
              help="Seconds to wait for each answer (hostd, device, backend, printer).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def main(config_path: Path, timeout: float, as_json: bool) -> None:
    """Check a lane end to end: config, hostd, devices, keys, backend, clock, printer.

    Exit codes: 0 nothing failed (warnings allowed), 1 at least one check failed."""
    results = Doctor(config_path, timeout).run()
    failed = sum(r.status == "fail" for r in results)
    warned = sum(r.status == "warn" for r in results)
    if as_json:
        click.echo(json.dumps({"ok": not failed, "failed": failed, "warnings": warned,
                               "checks": [asdict(r) for r in results]},
                              ensure_ascii=False, indent=2))
    else:
        for r in results:
            click.echo(f"[{_MARK[r.status]}] {r.name}: {r.detail}")
            if r.fix and r.status in ("fail", "warn"):
                click.echo(f"       fix: {r.fix}")
        click.echo(f"{failed} failed, {warned} warning(s)" if failed or warned
                   else "all checks passed")
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
