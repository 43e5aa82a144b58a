"""Install the udev rules and the systemd unit that ship with hexiao.

`hexiao udev install|show` and `hexiao service install|show` (the click groups `udev_main` and
`service_main`, registered in tools/cli.py).

`install` writes the file atomically (temporary file in the destination, fsync, rename) with
mode 0644, then reloads udev or systemd unless --no-reload. Exit codes (sysexits.h):

  0   installed (or --dry-run printed the plan)
  2   usage error
  69  the reload tool (udevadm / systemctl) is missing; nothing written
  73  the destination could not be written (other OS error); nothing written
  75  the file was written but the reload command failed; run it yourself
  77  needs root: the destination is a system directory; nothing written
"""

from __future__ import annotations

import grp
import importlib.resources
import os
import pwd
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import click
from hexiao.tools.install.errors import InstallError

EXIT_UNAVAILABLE = 69
EXIT_CANTCREAT = 73
EXIT_RELOAD_FAILED = 75
EXIT_NOPERM = 77

SERVICE_USER = "hexiao"
# Directories only root may write. /run/user/<uid> belongs to its user.
_SYSTEM_DIRS = (Path("/etc"), Path("/usr"), Path("/lib"), Path("/run"))
_USER_RUN = Path("/run/user")


@dataclass(frozen=True)
class Target:
    what: str  # "udev rules" / "systemd unit", for messages
    name: str  # file name, in the package data and at the destination
    default_dest: Path
    reload: tuple[tuple[str, ...], ...]


UDEV = Target("udev rules", "99-hexiao.rules", Path("/etc/udev/rules.d"), (
    ("udevadm", "control", "--reload-rules"),
    # re-run the rules for ports already plugged in, so no replug is needed
    ("udevadm", "trigger", "--subsystem-match=tty"),
))
SERVICE = Target("systemd unit", "hexiao-hostd.service", Path("/etc/systemd/system"), (
    ("systemctl", "daemon-reload"),
))


def data_file(name: str) -> str:
    """Text of a shipped file: the installed package data (`hexiao.udev`)."""
    resource = importlib.resources.files("hexiao.udev").joinpath(name)
    if resource.is_file():
        return resource.read_text(encoding="utf-8")
    raise InstallError(f"{name} is missing from this hexiao installation; reinstall hexiao",
                       EXIT_CANTCREAT)


def render_unit(text: str, hostd: str | None) -> str:
    """The unit with ExecStart pointing at `hostd` (an absolute path) instead of the bare name."""
    if hostd is None:
        return text
    old = "ExecStart=hexiao-hostd "
    if old not in text:
        raise InstallError("the shipped unit has no `ExecStart=hexiao-hostd` line to rewrite",
                           EXIT_CANTCREAT)
    return text.replace(old, f"ExecStart={hostd} ", 1)


def is_system_dir(dest: Path) -> bool:
    d = Path(os.path.abspath(dest))
    if d == _USER_RUN or _USER_RUN in d.parents:
        return False
    return any(d == s or s in d.parents for s in _SYSTEM_DIRS)


def needs_root(dest: Path) -> bool:
    return os.geteuid() != 0 and is_system_dir(dest)


def missing_tools(target: Target) -> list[str]:
    return sorted({argv[0] for argv in target.reload if shutil.which(argv[0]) is None})


def write_atomic(dest_dir: Path, name: str, text: str) -> Path:
    """Write dest_dir/name with mode 0644: readers see the old file or the new one, never a
    partial one, and a failure leaves the old file as it was and no temporary file behind."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / name
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600, and the umask must not matter
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(dest_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself survives a power cut
    finally:
        os.close(dir_fd)
    return final


def _sudo_hint(command_path: str, dest: Path) -> str:
    return (f"writing to {dest} needs root; rerun with sudo: sudo {command_path} install"
            + ("" if dest in (UDEV.default_dest, SERVICE.default_dest) else f" --dest {dest}"))


def install(target: Target, dest: Path, text: str, *, reload: bool, dry_run: bool,
            command_path: str, echo=click.echo) -> Path:
    """Install `text` as dest/target.name and reload; raise InstallError on refusal/failure."""
    final = dest / target.name
    missing = missing_tools(target) if reload else []
    if dry_run:
        echo(f"would write {final} ({len(text.encode())} bytes, mode 0644, "
             f"via a temporary file and rename)")
        for argv in target.reload if reload else ():
            echo(f"would run: {shlex.join(argv)}")
        if needs_root(dest):
            echo(f"note: {_sudo_hint(command_path, dest)}")
        if missing:
            echo(f"note: {', '.join(missing)} not found; the real run would refuse")
        return final
    if needs_root(dest):
        raise InstallError(_sudo_hint(command_path, dest), EXIT_NOPERM)
    if missing:
        raise InstallError(
            f"{', '.join(missing)} not found, so the {target.what} could not be reloaded; "
            f"nothing was written. Install with --no-reload and reload by hand, or install "
            f"{'udev' if target is UDEV else 'systemd'} first", EXIT_UNAVAILABLE)
    try:
        write_atomic(dest, target.name, text)
    except PermissionError as e:
        raise InstallError(_sudo_hint(command_path, dest), EXIT_NOPERM) from e
    except OSError as e:
        raise InstallError(f"cannot write {final}: {e.strerror}; nothing was written",
                           EXIT_CANTCREAT) from e
    echo(f"wrote {final}")
    for argv in target.reload if reload else ():
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        if done.returncode != 0:
            raise InstallError(
                f"{final} is in place, but `{shlex.join(argv)}` failed (exit "
                f"{done.returncode}): {done.stderr.strip() or done.stdout.strip()}; "
                f"run it yourself", EXIT_RELOAD_FAILED)
        echo(f"ran: {shlex.join(argv)}")
    return final


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def next_steps(target: Target) -> list[str]:
    """What the installer still has to do, as messages with the command to run."""
    steps = []
    if not _group_exists(SERVICE_USER):
        steps.append(f"group {SERVICE_USER} does not exist (udev then leaves ports to root): "
                     f"sudo groupadd --system {SERVICE_USER}")
    if target is SERVICE and not _user_exists(SERVICE_USER):
        steps.append(f"user {SERVICE_USER} does not exist (the unit runs as it): sudo useradd "
                     f"--system --gid {SERVICE_USER} --home-dir /var/lib/hexiao --no-create-home "
                     f"--shell /usr/sbin/nologin {SERVICE_USER}")
    if target is SERVICE:
        steps.append("start it now and at boot: sudo systemctl enable --now hexiao-hostd")
    else:
        steps.append("a plugged-in device now appears as /dev/hexiao/<serial number>")
    return steps


def _hostd_option(f):
    return click.option(
        "--hostd", type=click.Path(exists=True, dir_okay=False, executable=True,
                                   resolve_path=True),
        default=None, help="Absolute path for ExecStart (e.g. the hexiao-hostd of a "
        "virtualenv). Default: the bare name, found in systemd's search path.")(f)


def _make_group(target: Target, doc: str) -> click.Group:
    is_unit = target is SERVICE

    @click.group(help=doc, context_settings={"help_option_names": ["-h", "--help"]})
    def group() -> None:
        pass

    def text_for(hostd: str | None) -> str:
        text = data_file(target.name)
        return render_unit(text, hostd) if is_unit else text

    @group.command("install", help=f"Install the {target.what} ({target.name}) and reload.",
                   epilog="Exit codes: 0 done, 69 reload tool missing, 73 cannot write, "
                   "75 reload failed (file written), 77 needs root (rerun with sudo).")
    @click.option("--dest", type=click.Path(file_okay=False, path_type=Path),
                  default=target.default_dest, show_default=True, help="Directory to write to.")
    @click.option("--no-reload", is_flag=True, help="Write the file only.")
    @click.option("--dry-run", is_flag=True, help="Print what would be done; change nothing.")
    @(_hostd_option if is_unit else (lambda f: f))
    @click.pass_context
    def install_cmd(ctx: click.Context, dest: Path, no_reload: bool, dry_run: bool,
                    hostd: str | None = None) -> None:
        try:
            install(target, dest, text_for(hostd), reload=not no_reload, dry_run=dry_run,
                    command_path=ctx.parent.command_path if ctx.parent else "hexiao")
        except InstallError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(e.exit_code)
        if not dry_run:
            for step in next_steps(target):
                click.echo(f"next: {step}", err=True)

    @group.command(help=f"Print the {target.what} ({target.name}) that install writes.")
    @(_hostd_option if is_unit else (lambda f: f))
    def show(hostd: str | None = None) -> None:
        try:
            click.echo(text_for(hostd), nl=False)
        except InstallError as e:
            raise click.ClickException(str(e)) from e

    return group


udev_main = _make_group(UDEV, "udev rules: stable /dev/hexiao/<serial> names, access for the "
                        "service user, ModemManager kept off the device.")
service_main = _make_group(SERVICE, "The systemd unit that runs hexiao-hostd (Type=notify, "
                           "watchdog, hardened).")
