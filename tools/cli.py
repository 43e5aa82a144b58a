"""The `hexiao` command: one click group; each subcommand lives in its own module.

Rules this module keeps:
- a subcommand's module is imported only when it runs, so `hexiao --help` stays fast;
- shell completion sees every subcommand's own options and subcommands: while click completes
  (resilient parsing) a lazy subcommand resolves to its real command. Enable it with
  `eval "$(_HEXIAO_COMPLETE=bash_source hexiao)"` (zsh_source, fish_source for those shells).
"""

from __future__ import annotations

import importlib

import click

_REAL: dict[str, tuple[str, str]] = {}  # subcommand -> (module, attribute)


class _Group(click.Group):
    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if ctx.resilient_parsing and cmd_name in _REAL:  # completing: the real command
            module, attr = _REAL[cmd_name]
            command: click.Command = getattr(importlib.import_module(module), attr)
            return command
        return super().get_command(ctx, cmd_name)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hexiao")
def main() -> None:
    """hexiao (核销): redeem WeChat cards and coupons at an unchanged till."""


def _lazy(name: str, module: str, help: str, attr: str = "main") -> None:
    # subcommands import their module only when run, so `hexiao --help` stays fast
    _REAL[name] = (module, attr)

    @main.command(name, help=help, context_settings={"ignore_unknown_options": True},
                  add_help_option=False)
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def _cmd(args: tuple[str, ...]) -> None:
        command = getattr(importlib.import_module(module), attr)
        # each subcommand declares -h itself (tests/test_lint.py checks): click caches a
        # command's help option the first time it is built, so passing it here is not enough
        command.main(args=list(args), prog_name=f"hexiao {name}")


_lazy("demo", "hexiao.tools.demo.run", "Run a lane on this machine and show it working.")
_lazy("bench", "hexiao.tools.bench.codec", "Measure the protocol codec and the firmware link.")
_lazy("sim", "hexiao.tools.sim.cli",
      "Run simulators of the backends (WeChat card API) on loopback.")
_lazy("tap", "hexiao.tools.tap", "Receipt tap: serve, replay, render, verify, bench.")
_lazy("receipt", "hexiao.tools.tap", "Receipt tokens: verify a QR's token.", "receipt_main")
_lazy("status", "hexiao.tools.support.ctl", "Show hostd's state: devices, journal, backend.",
      "status_main")
_lazy("device", "hexiao.tools.support.ctl",
      "Devices: list, info, ping, health, logs (via hostd or --port).", "device_main")
_lazy("journal", "hexiao.tools.support.ctl", "Redemption journal: list, show, reconcile.",
      "journal_main")
_lazy("capture", "hexiao.tools.support.ctl", "Record a device's raw link traffic through hostd.",
      "capture_main")
_lazy("decode", "hexiao.tools.support.decode",
      "Decode a link capture: frames, messages, counters, noise vs MAC failures.")
_lazy("flash", "hexiao.tools.install.flash",
      "Install a signed firmware bundle on a board (USB) or the sim board.")
_lazy("provision", "hexiao.tools.install.provision",
      "Give a device its key and lane, record the key, self-test it.")
_lazy("doctor", "hexiao.tools.support.doctor",
      "Check a lane end to end and say what is wrong and what to do.")
_lazy("bench-hostd", "hexiao.tools.bench.hostd",
      "Measure hostd's own latency per redemption and its throughput with many lanes.")
_lazy("bench-firmware", "hexiao.tools.bench.firmware",
      "Measure the firmware's scan-to-HID latency and heap high-water on the sim board.")
_lazy("keys", "hexiao.tools.install.keys", "Firmware signing keys: generate, show.")
_lazy("bundle", "hexiao.tools.install.bundle", "Build and verify signed firmware bundles.")
_lazy("udev", "hexiao.tools.install.system", "Install or show the udev rules for hexiao devices.",
      "udev_main")
_lazy("service", "hexiao.tools.install.system",
      "Install or show the systemd unit for hexiao-hostd.",
      "service_main")
_lazy("report", "hexiao.tools.report",
      "Chain reports from headquarters' database: redemptions, settlement, duplicates, quiet.")
_lazy("fleet", "hexiao.tools.fleet",
      "Headquarters: stores, lanes, remote status and device diagnostics; bench.")
