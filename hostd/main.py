"""`hexiao-hostd`: the host daemon's entry point.

The daemon (config, device discovery, control socket, redemption, receipt tap under one
supervisor) is being built in pieces (issue 5): the link, the journal, the WeChat client, the
redemption engine and the tap proxy exist as libraries. Until the daemon assembles them, this
entry point says so plainly and exits 2 rather than pretending to serve a lane.
"""

from __future__ import annotations

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hexiao")
def main() -> None:
    """hexiao host daemon (not assembled yet)."""
    click.echo(
        "hexiao-hostd: the daemon is not assembled yet; its parts are libraries today.\n"
        "  see the lane working:  hexiao demo\n"
        "  run the receipt tap:   hexiao tap serve --help\n"
        "  run the WeChat sim:    hexiao sim wechat --help",
        err=True,
    )
    raise SystemExit(2)
