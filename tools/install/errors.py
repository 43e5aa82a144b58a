"""The installers' one error class: a refusal or failure of `hexiao bundle|flash|provision|udev|
service`, with the message that says what to do and the command's exit code for it.

Rules kept here:
- every installer refusal is an InstallError; the command prints its message (one line, or
  --json {"ok": false, "kind", "message", "exit_code"}) and exits with its exit_code, never a
  traceback;
- exit codes are per command, documented in each command's module header (bundle.py, flash.py,
  provision.py, system.py); `kind` names the refusal where a command has a table of them
  (bundle and flash: their EXIT_CODES), else it is empty.
"""

from __future__ import annotations


class InstallError(Exception):
    """A refused or failed install step: message, exit code and (bundle, flash) its kind."""

    def __init__(self, message: str, exit_code: int, kind: str = "") -> None:
        super().__init__(message)
        self.message, self.exit_code, self.kind = message, exit_code, kind
