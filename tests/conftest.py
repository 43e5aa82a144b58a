from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from browser import browser, chromium  # noqa: F401 (fixtures: Debian's headless Chromium)
from fakeclock import Clock
from fleet_conftest import (  # noqa: F401 (fixtures: the real PostgreSQL and Mosquitto)
    fleet_broker,
    fleet_dsn,
    fleet_pg_admin,
    fleet_prefix,
    throwaway_broker,
)
from hexiao.tools import micropython
from hypothesis import HealthCheck, settings

TESTS = Path(__file__).resolve().parent

# Hypothesis's per-example deadline and its too-slow health check are timed assertions: on a
# loaded 2-core CI machine they fail tests that are correct. Properties here are about results.
settings.register_profile("hexiao", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("hexiao")


@pytest.fixture(scope="session")
def mpy_stage(tmp_path_factory) -> Path:
    """The device-side modules compiled with mpy-cross, laid out as on a board's filesystem."""
    return micropython.stage(tmp_path_factory.mktemp("mpy"))


@pytest.fixture(scope="session")
def run_mpy(mpy_stage):
    """Run a script under real MicroPython in the device heap budget; returns CompletedProcess."""

    def run(script, *args, heap=micropython.HEAP, stdin=None, timeout=120):
        argv, env = micropython.command(script, mpy_stage, heap=heap, args=[str(a) for a in args])
        return subprocess.run(
            argv, env=env, input=stdin, capture_output=True, timeout=timeout, cwd=mpy_stage
        )

    return run


@pytest.fixture
def clock() -> Clock:
    """A clock at fakeclock.T0 that the test moves by setting .now."""
    return Clock()
