"""`hexiao device ports`: the hexiao boards plugged in now (like mpremote's `connect list`).

Boards are recognised by the USB ids in the shipped udev rules; each is shown with its serial
number (what a [[device]]'s match.serial names) and its stable udev name when the rules are
installed. Exit status: 0 (an empty list is an answer, not an error).
"""

from __future__ import annotations

import json

import click
from hexiao.hostd.lanes.discovery import hexiao_ports


@click.command("ports", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="one JSON array")
def ports(as_json: bool) -> None:
    """List the hexiao boards on USB: port, board, USB id, serial number, udev name."""
    found = hexiao_ports()
    if as_json:
        click.echo(json.dumps([p.as_json() for p in found]))
        return
    if not found:
        click.echo("no hexiao board on USB: check the cable (a data cable, not charge-only) and "
                   "that the board runs the hexiao firmware; a sim board's port is DIR/tty")
        return
    rows = [("PORT", "BOARD", "USB ID", "SERIAL", "UDEV NAME")] + [
        (p.device, p.board, f"{p.vid:04x}:{p.pid:04x}", p.serial or "-",
         p.stable or "- (hexiao udev install)") for p in found]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
