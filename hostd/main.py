"""`hexiao-hostd`: the host daemon's entry point (systemd runs it; see udev/hexiao-hostd.service).

Exit status: 0 stopped cleanly (SIGTERM/SIGINT); 1 could not start (the message says why);
2 the configuration is invalid (every problem is listed, one per line) or bad options.
`--check-config` validates the file and exits (0 valid, 2 not).
"""

from __future__ import annotations

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
def main(config_path: Path, check_config: bool, backend_url: str | None,
         log_level: str | None) -> None:
    """hexiao host daemon: the lane's devices, exactly-once redemption, the control socket."""
    try:
        cfg = load(config_path)
    except ConfigError as e:
        for line in e.errors:
            click.echo(line, err=True)
        sys.exit(2)
    if check_config:
        click.echo(f"{config_path}: ok ({len(cfg.devices)} device(s), {len(cfg.lanes)} "
                   f"lane(s), backend {cfg.backend.kind})")
        return
    from hexiao.hostd.daemon import Daemon, DaemonError
    from hexiao.hostd.observability import logs

    logs.configure(log_level or cfg.hostd.log_level)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon = Daemon(cfg, backend_url=backend_url)
    try:
        daemon.start()
    except DaemonError as e:
        click.echo(f"hexiao-hostd: cannot start: {e}", err=True)
        daemon.stop()
        sys.exit(1)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        daemon.stop()
