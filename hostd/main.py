"""`hexiao-hostd`: the host daemon's entry point (systemd runs it; see udev/hexiao-hostd.service).

Exit status: 0 stopped cleanly (SIGTERM/SIGINT); 1 could not start (one line says why: another
hostd on the same journal or control socket, a state folder it cannot create...); 2 the
configuration is invalid (every problem is listed, one per line) or bad options.
`--check-config` validates the file and exits (0 valid, 2 not: also when a configured device has
no key in the keystore; hostd itself starts without it and shows that device as "no key").

Logs: readable lines on a terminal, JSON lines otherwise (journald, files); `--log-format`
chooses. A "stopping" line is logged when a signal asks hostd to stop.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import click
from hexiao.hostd.config import ConfigError, load

DEFAULT_CONFIG = Path("/etc/hexiao/hostd.toml")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hexiao")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, path_type=Path),
              default=DEFAULT_CONFIG, show_default=True, help="the TOML configuration file")
@click.option("--check-config", is_flag=True, help="validate the configuration and exit")
@click.option("--backend-url", help="talk to this WeChat-card-API-compatible server instead "
              "of backend.base_url (e.g. a `hexiao sim wechat` URL)")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="overrides hostd.log_level")
@click.option("--log-format", type=click.Choice(["auto", "console", "json"]), default="auto",
              show_default=True, help="auto: readable on a terminal, JSON lines otherwise")
def main(config_path: Path, check_config: bool, backend_url: str | None,
         log_level: str | None, log_format: str) -> None:
    """hexiao host daemon: the lane's devices, exactly-once redemption, the control socket."""
    try:
        cfg = load(config_path)
    except ConfigError as e:
        for line in e.errors:
            click.echo(line, err=True)
        sys.exit(2)
    from hexiao.hostd.config import private

    unsafe = private.problems(cfg)  # the same rule start-up and `hexiao doctor` apply
    if unsafe:
        for line in unsafe:
            click.echo(f"config {config_path}: {line}", err=True)
        sys.exit(2)
    if check_config:
        unkeyed = private.missing_keys(cfg)  # at start a lane without its key waits ("no key")
        if unkeyed:
            for line in unkeyed:
                click.echo(f"config {config_path}: {line}", err=True)
            sys.exit(2)
        click.echo(f"{config_path}: ok ({len(cfg.devices)} device(s), {len(cfg.lanes)} "
                   f"lane(s), backend {cfg.backend.kind})")
        return
    from hexiao.hostd.control.client import ControlError
    from hexiao.hostd.daemon import Daemon, DaemonError
    from hexiao.hostd.instance import InstanceError, journal_lock
    from hexiao.hostd.observability import logs

    logs.configure(log_level or cfg.hostd.log_level, format=log_format)
    log = logging.getLogger("hexiao.hostd")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if not stop.is_set():
            log.info("stopping (%s)", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon = Daemon(cfg, backend_url=backend_url)
    lock = journal_lock(daemon.journal_path)
    try:
        daemon.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        lock.acquire()
        daemon.start()
    except (DaemonError, InstanceError, ControlError, OSError) as e:
        click.echo(f"hexiao-hostd: cannot start: {e}", err=True)
        daemon.stop()
        lock.release()
        sys.exit(1)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        daemon.stop()
        lock.release()
        log.info("stopped")
