"""`hexiao sim`: simulators of the backends, on loopback, for tests, the demo and integrators."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import click
from hexiao.hostd.backends.sim.seed import EXAMPLE, SeedError, read
from hexiao.hostd.backends.sim.server import HOST, WeChatSim


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Run simulators of the backends on loopback."""


@main.command()
@click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help=f"TCP port on {HOST}; 0 picks a free one.")
@click.option("--seed", "seed_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Seed file (JSON): apps, cards, codes, behaviour, faults. "
              "Default: the documented example, seed.example.json.")
@click.option("--quiet", is_flag=True, help="No per-request log lines on stderr.")
def wechat(port: int, seed_path: Path | None, quiet: bool) -> None:
    """Serve the WeChat card API on loopback, as the real service behaves.

    cgi-bin/token, card/code/get, card/code/consume, card/code/decrypt and card/get, with tokens
    that expire and are replaced by newer ones, the real errcodes, and fault injection. The
    first line on stdout is the server's URL (for a parent process to read). Admin endpoints:
    GET /_sim/state, GET|POST /_sim/faults, POST /_sim/reset, /_sim/clock,
    /_sim/tokens/invalidate, /_sim/codes. Stops cleanly on Ctrl-C or SIGTERM.
    """
    path = seed_path or EXAMPLE
    try:
        sim = WeChatSim(read(path), port=port, log=None if quiet else sys.stderr)
    except SeedError as e:
        raise click.BadParameter(str(e), param_hint="--seed") from e
    except OSError as e:
        raise click.ClickException(
            f"cannot listen on {HOST}:{port} ({e.strerror}); choose another --port, "
            f"or --port 0 for a free one") from e
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        sim.start()
        click.echo(sim.url)
        seed = sim.state.seed
        click.echo(f"hexiao sim wechat: {len(seed.apps)} app(s), {len(seed.cards)} card(s), "
                   f"{len(seed.codes)} code(s) from {path}; state at {sim.url}/_sim/state; "
                   f"Ctrl-C to stop", err=True)
        while not stop.wait(1.0):
            pass
    finally:
        sim.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    click.echo("hexiao sim wechat: stopped", err=True)


def _add_board() -> None:
    from hexiao.tools.sim.board import board

    main.add_command(board)


_add_board()
