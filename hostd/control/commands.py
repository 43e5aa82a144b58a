"""The control socket's commands: what hostd implements (Handlers, in handlers.py) and each
command's arguments (COMMANDS), checked before a handler runs.

Rules this module keeps:
- COMMANDS is the one list of commands: a command "a.b" is the Handlers method a_b, and its
  arguments are checked here (unknown, missing, ill-typed or out-of-range arguments are
  bad_request), so a handler only ever sees arguments of the right type and range.
- A handler reports an expected failure as ControlError with one of HANDLER_KINDS; any other
  kind, or a crash, reaches the client as "internal" (server.py).
- A command in SESSION_COMMANDS also gets the connection's Session: what it starts lasts only as
  long as that connection (a capture ends with its client), through the Hold it registers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from hexiao.hostd.control.client import ControlError

HANDLER_KINDS = frozenset({"not_found", "unavailable", "timeout", "internal", "bad_request",
                           "refused"})  # refused: the device said no (device.update)
SESSION_COMMANDS = frozenset({"capture.start"})

log = logging.getLogger("hexiao.control")


class Hold(Protocol):
    """Something a connection started and keeps going (a capture)."""

    def active(self) -> bool: ...  # still going: the connection may idle while it waits
    def release(self) -> None: ...  # the connection ended: undo it (once; a no-op if over)


class Session:
    """One control connection, as the handlers of SESSION_COMMANDS see it."""

    def __init__(self) -> None:
        self.holds: list[Hold] = []

    def hold(self, h: Hold) -> None:
        self.holds = [x for x in self.holds if x.active()] + [h]

    def holding(self) -> bool:
        return any(h.active() for h in self.holds)

    def close(self) -> None:
        holds, self.holds = self.holds, []
        for h in holds:
            try:
                h.release()
            except Exception:  # logged; one failed undo must not skip the others
                log.exception("control: undoing %r for a closed connection failed", h)


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
    def capture_start(self, device: str, path: str,
                      session: Session | None = None) -> dict[str, Any]: ...
    def capture_stop(self, device: str) -> dict[str, Any]: ...
    def device_update(self, device: str, image: str, digest: str, size: int,
                      manifest_size: int, signature: str, board: str, version: str,
                      counter: int) -> dict[str, Any]: ...


def _str(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 256


def _count(v: Any) -> bool:  # bool is an int in Python, never a count here
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**32


def _limit(v: Any) -> bool:  # 0 would be "all" in a slice
    return _count(v) and v >= 1


def _log_max(v: Any) -> bool:  # the device answers at most 12 entries (logs_get.max, SPEC)
    return _count(v) and v <= 12


def _hex(n: int) -> Callable[[Any], bool]:
    return lambda v: (isinstance(v, str) and len(v) == n
                      and all(c in "0123456789abcdef" for c in v))


def _states(v: Any) -> bool:
    return isinstance(v, list) and len(v) <= 16 and all(_str(s) for s in v)


# cmd -> {arg: (check, required, what)}; the method name is cmd with "." -> "_"
_DEV = {"device": (_str, True, "a device name")}
COMMANDS: dict[str, dict[str, tuple[Callable[[Any], bool], bool, str]]] = {
    "status": {}, "device.list": {}, "device.info": _DEV, "device.ping": _DEV,
    "device.health": _DEV,
    "device.logs": {**_DEV, "since": (_count, False, "a log sequence number"),
                    "max": (_log_max, False, "a count from 0 to 12")},
    "journal.list": {"state": (_states, False, "a list of journal states"),
                     "limit": (_limit, False, "a count of 1 or more")},
    "journal.show": {"entry_id": (_count, True, "a journal entry id")},
    "journal.reconcile": {},
    "capture.start": {**_DEV, "path": (_str, True, "a file path")},
    "capture.stop": _DEV,
    # a firmware image `hexiao device update` made from a bundle (protocol/fw_image.py), and
    # its fw_offer's fields; hostd sends it over the device's link (SPEC 6.8)
    "device.update": {**_DEV, "image": (_str, True, "an absolute path to the image file"),
                      "digest": (_hex(64), True, "the image's SHA-256, hex"),
                      "size": (_count, True, "the image's size"),
                      "manifest_size": (_count, True, "the manifest's size"),
                      "signature": (_hex(128), True, "the manifest's Ed25519 signature, hex"),
                      "board": (_str, True, "a board name"),
                      "version": (_str, True, "a version X.Y.Z"),
                      "counter": (_count, True, "a security counter")},
}


def check_args(cmd: str, args: Any) -> dict[str, Any]:
    if cmd not in COMMANDS:
        raise ControlError("unknown_command", f"unknown command {cmd[:64]!r}; known: "
                                              f"{', '.join(sorted(COMMANDS))}")
    if not isinstance(args, dict):
        raise ControlError("bad_request", f"{cmd}: args must be a JSON object")
    spec = COMMANDS[cmd]
    for name in args:
        if name not in spec:
            raise ControlError("bad_request", f"{cmd}: unexpected argument {name[:64]!r}")
    for name, (ok, required, what) in spec.items():
        if name not in args or (args[name] is None and not required):
            if required:
                raise ControlError("bad_request", f"{cmd}: missing argument {name!r} ({what})")
        elif not ok(args[name]):
            raise ControlError("bad_request", f"{cmd}: argument {name!r} must be {what}")
    return {k: v for k, v in args.items() if v is not None}
