"""The control socket's commands: what the daemon implements (Handlers) and each command's
arguments (COMMANDS), checked before a handler runs.

Rules this module keeps:
- COMMANDS is the one list of commands: a command "a.b" is the Handlers method a_b, and its
  arguments are checked here (unknown, missing or ill-typed arguments are bad_request), so a
  handler only ever sees arguments of the right type.
- A handler reports an expected failure as ControlError with one of HANDLER_KINDS; any other
  kind, or a crash, reaches the client as "internal" (control.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from hexiao.hostd.control.client import ControlError

HANDLER_KINDS = frozenset({"not_found", "unavailable", "timeout", "internal", "bad_request"})


class Handlers(Protocol):
    """What the daemon implements; raise ControlError(kind, message) for expected failures."""

    def status(self) -> dict[str, Any]: ...
    def device_list(self) -> list[dict[str, Any]]: ...
    def device_info(self, device: str) -> dict[str, Any]: ...
    def device_ping(self, device: str) -> dict[str, Any]: ...
    def device_health(self, device: str) -> dict[str, Any]: ...
    def device_logs(self, device: str, since: int | None = None,
                    max: int | None = None) -> dict[str, Any]: ...
    def journal_list(self, state: list[str] | None = None,
                     limit: int = 50) -> list[dict[str, Any]]: ...
    def journal_show(self, entry_id: int) -> dict[str, Any]: ...
    def journal_reconcile(self) -> dict[str, Any]: ...
    def capture_start(self, device: str, path: str) -> dict[str, Any]: ...
    def capture_stop(self, device: str) -> dict[str, Any]: ...


def _str(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 256


def _count(v: Any) -> bool:  # bool is an int in Python, never a count here
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32


def _states(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= 16 and all(_str(s) for s in v)


# cmd -> {arg: (check, required, what)}; the method name is cmd with "." -> "_"
_DEV = {"device": (_str, True, "a device name")}
COMMANDS: dict[str, dict[str, tuple[Callable[[Any], bool], bool, str]]] = {
    "status": {}, "device.list": {}, "device.info": _DEV, "device.ping": _DEV,
    "device.health": _DEV,
    "device.logs": {**_DEV, "since": (_count, False, "a log sequence number"),
                    "max": (_count, False, "a count")},
    "journal.list": {"state": (_states, False, "a list of journal states"),
                     "limit": (_count, False, "a count")},
    "journal.show": {"entry_id": (_count, True, "a journal entry id")},
    "journal.reconcile": {},
    "capture.start": {**_DEV, "path": (_str, True, "a file path")},
    "capture.stop": _DEV,
}


def check_args(cmd: str, args: Any) -> dict[str, Any]:
    if cmd not in COMMANDS:
        raise ControlError("unknown_command", f"unknown command {cmd!r}; known: "
                                              f"{', '.join(sorted(COMMANDS))}")
    if not isinstance(args, dict):
        raise ControlError("bad_request", f"{cmd}: args must be a JSON object")
    spec = COMMANDS[cmd]
    for name in args:
        if name not in spec:
            raise ControlError("bad_request", f"{cmd}: unexpected argument {name!r}")
    for name, (ok, required, what) in spec.items():
        if name not in args or (args[name] is None and not required):
            if required:
                raise ControlError("bad_request", f"{cmd}: missing argument {name!r} ({what})")
        elif not ok(args[name]):
            raise ControlError("bad_request", f"{cmd}: argument {name!r} must be {what}")
    return {k: v for k, v in args.items() if v is not None}
