"""The device `hexiao provision` writes to and the checklist its self-test fills in: shared by
provision.py (which writes) and selftest.py (which only looks), so neither imports the other.

Rules kept here:
- the device's config is written as /config.json.new, then renamed (a board that loses power in
  between keeps its old config); on the sim board the file is 0600 from its first byte;
- a Report holds every check with its status (pass | fail | n/a | skipped) and a detail line;
  `ok` means every required check passed.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hexiao.hostd.keystore import write_private

CONFIG_PATH = "/config.json"


@dataclass
class Check:
    name: str
    status: str  # pass | fail | n/a | skipped
    detail: str = ""
    required: bool = True


@dataclass
class Report:
    device: str
    lane: str
    target: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hostd_config: str = ""

    def add(self, name: str, status: str, detail: str = "", required: bool = True) -> bool:
        self.checks.append(Check(name, status, detail, required))
        return status == "pass"

    @property
    def ok(self) -> bool:
        return all(c.status == "pass" for c in self.checks if c.required)


# -- writing the device's config ----------------------------------------------------------------


# -- writing the device's config ----------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` 0600 from the first byte (a key must never be readable, even briefly)."""
    path.unlink(missing_ok=True)
    write_private(path, data)


class Board:
    """The device's filesystem: the sim board's folder, or a USB board through mpremote."""

    def __init__(self, sim_dir: Path | None, port: str | None) -> None:
        from hexiao.tools.install.flash_targets import DirTarget, MpremoteTarget

        self.sim_dir, self.port = sim_dir, port
        # InstallError (flash's "unreachable") if there is no such board
        self.target: Any = DirTarget(sim_dir) if sim_dir else MpremoteTarget(str(port))

    def read_config(self) -> dict[str, Any] | None:
        raw = self.target.read_file(CONFIG_PATH)
        if raw is None:
            return None
        try:
            cfg = json.loads(raw)
        except ValueError:
            return {}  # unreadable, but present: still provisioned, as far as we can tell
        return cfg if isinstance(cfg, dict) else {}

    def stage(self, data: bytes) -> None:
        if self.sim_dir:
            _write_private(self.sim_dir / "config.json.new", data)
        else:
            self.target.write_file(CONFIG_PATH + ".new", data)

    def commit(self) -> None:
        self.target.rename(CONFIG_PATH + ".new", CONFIG_PATH)
        if self.sim_dir:
            fd = os.open(self.sim_dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def discard(self) -> None:
        with contextlib.suppress(Exception):
            self.target.remove(CONFIG_PATH + ".new")
