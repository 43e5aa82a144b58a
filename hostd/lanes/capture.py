"""Link captures: record the raw bytes of a device link to a file; decode.py reads them back.

File format, version 1 (integers big-endian):

    magic     10 bytes  89 48 58 43 41 50 0D 0A 1A 0A  (0x89 "HXCAP" CR LF ^Z LF)
    version   u16       1
    hlen      u32       length of the header
    header    hlen      UTF-8 JSON object: device_id (text), start_unix_us (int), writer (text),
                        max_bytes (int), and once the capture ends, stopped (text: why); padded
                        with spaces so that `stopped` can be written in place at the end
    records   to the end of the file, each:
      dir     u8        1 = d2h (device to host), 2 = h2d; anything else is corrupt
      t_us    u64       microseconds since the start (monotonic clock)
      len     u32       length of data
      data    len       the bytes as they crossed the wire: noise, split frames and all

Why binary with length prefixes, not JSON lines: the data is raw line bytes, noise included,
which JSON would carry as hex or base64 (twice the size, and an encoder in hostd's I/O path);
here a record is 13 bytes of head plus the bytes verbatim. Each record is one write, flushed, so
a crash or a cut-off upload leaves whole records and at most one partial one, which the length
prefix pins down exactly: the decoder reports where the file was cut and decodes everything
before it. The PNG-style magic makes a file mangled by a text-mode transfer (CR LF conversion,
7-bit stripping: the usual accident with ticket attachments) fail at the magic with a message
that says so, instead of decoding as garbage. The header is JSON so that it can grow without a
new version; the version changes only with the record layout. `hexiao decode --json` is the
greppable form. Captures carry coupon codes (scan payloads are MAC'd, not encrypted): 0600.

A capture is bounded: the file never grows past max_bytes (MAX_BYTES unless told; line noise on
a fast port fills a disk in minutes). The record that would cross the cap is not written; the
capture ends there and its header says "stopped": "size cap reached ...", so a short file is
never mistaken for a quiet link. Whoever stops a capture can say why the same way.

Rules this module keeps: the format and its two ends (CaptureWriter/record_pair write it,
read_capture parses it) and nothing about what the bytes mean; frames, keys and verdicts are
tools/support/decode.py's (`hexiao decode`), which imports this module, never the other way.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

MAGIC = b"\x89HXCAP\r\n\x1a\n"
VERSION = 1
D2H, H2D = "d2h", "h2d"
_DIR_CODE = {D2H: 1, H2D: 2}
_DIR_NAME = {1: D2H, 2: H2D}
_REC = struct.Struct(">BQI")
MAX_BYTES = 64 * 1024 * 1024
_HEAD_ROOM = 160  # spaces after the header's JSON, for "stopped" (reasons are cut to fit)


def kid_text(kid: bytes) -> str:
    """A device id as hostd's config spells it: printable ASCII as is, otherwise "hex:..."."""
    ok = kid and all(0x21 <= b < 0x7F for b in kid) and not kid.startswith(b"hex:")
    return kid.decode("ascii") if ok else "hex:" + kid.hex()


class CaptureWriter:
    """Appends records to a new capture file (0600; an existing file is never overwritten), at
    most max_bytes in all. Thread-safe: hostd's reader and writer threads may record at once,
    and the control socket may close it meanwhile (records after the end are dropped)."""

    def __init__(self, path: str | os.PathLike[str], device_id: bytes | str,
                 max_bytes: int = MAX_BYTES) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.fchmod(fd, 0o600)
        self._f = os.fdopen(fd, "wb")
        self.path = os.fspath(path)
        self.max_bytes = max_bytes
        self.stopped: str | None = None  # why it ended, once it has
        self._t0 = time.monotonic_ns()
        self._lock = threading.Lock()
        try:
            writer = "hexiao " + version("hexiao")
        except PackageNotFoundError:
            writer = "hexiao"
        dev = kid_text(device_id) if isinstance(device_id, bytes) else device_id
        self._head = {"device_id": dev, "start_unix_us": time.time_ns() // 1000,
                      "writer": writer, "max_bytes": max_bytes}
        head = json.dumps(self._head).encode() + b" " * _HEAD_ROOM
        self._f.write(MAGIC + struct.pack(">HI", VERSION, len(head)) + head)
        self._f.flush()
        self.size = len(MAGIC) + 6 + len(head)
        self._hlen = len(head)

    def record(self, direction: str, data: bytes, t: int | None = None) -> None:
        """Record bytes that crossed the wire; t: microseconds since the start (default: now).
        Once the capture has ended (closed, or at its cap), a no-op."""
        if direction not in _DIR_CODE:
            raise ValueError(f"direction must be {D2H!r} or {H2D!r}, not {direction!r}")
        if not data:
            return
        t_us = (time.monotonic_ns() - self._t0) // 1000 if t is None else int(t)
        rec = _REC.pack(_DIR_CODE[direction], t_us, len(data)) + bytes(data)
        with self._lock:
            if self._f.closed:
                return
            if self.size + len(rec) > self.max_bytes:
                self._end(f"size cap reached: the next record would pass {self.max_bytes} "
                          f"bytes; nothing after it was recorded")
                return
            self._f.write(rec)
            self._f.flush()  # a crash loses at most the record being written
            self.size += len(rec)

    def close(self, reason: str | None = None) -> None:
        """End the capture; `reason` (why it stopped) goes into the header. Idempotent: the
        first reason stays."""
        with self._lock:
            if not self._f.closed:
                self._end(reason)

    def _end(self, reason: str | None) -> None:
        # under the lock
        try:
            if reason is not None:
                self.stopped = reason
                head = b""
                while True:  # cut the reason until the header fits its room
                    head = json.dumps({**self._head, "stopped": reason}).encode()
                    if len(head) <= self._hlen or not reason:
                        break
                    reason = reason[:-8]
                if len(head) <= self._hlen:
                    self._f.flush()
                    os.pwrite(self._f.fileno(), head.ljust(self._hlen), len(MAGIC) + 6)
        finally:
            self._f.close()

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def record_pair(writer: CaptureWriter, clock: Callable[[], int] | None = None
                ) -> tuple[Callable[[bytes], bytes], Callable[[bytes], bytes]]:
    """Taps for the two directions of a link: (d2h, h2d). Each records the bytes it is given and
    returns them unchanged, so it can sit in any byte path. clock: microseconds since the
    capture's start (default: the writer's monotonic clock)."""

    def tap(direction: str) -> Callable[[bytes], bytes]:
        def through(data: bytes) -> bytes:
            writer.record(direction, data, None if clock is None else clock())
            return data
        return through

    return tap(D2H), tap(H2D)


class CaptureError(Exception):
    """The file cannot be decoded at all."""


def read_capture(path: str | os.PathLike[str]) -> tuple[dict[str, Any],
                                                          list[tuple[str, int, bytes]], str | None]:
    """(header, records as (direction, t_us, data), why the file is truncated or None)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise CaptureError(f"cannot read {path}: {e.strerror}") from None
    if not raw.startswith(MAGIC):
        if raw.startswith(b"\x89HXCAP\n") or raw.startswith(b"\x89HXCAP\r\r\n"):
            raise CaptureError(f"{path}: a capture damaged by a text-mode transfer (line ends "
                               "converted); transfer it again as a binary file")
        raise CaptureError(f"{path} is not a hexiao capture (bad magic)")
    if len(raw) < len(MAGIC) + 6:
        raise CaptureError(f"{path}: truncated inside its header; nothing to decode")
    ver, hlen = struct.unpack_from(">HI", raw, len(MAGIC))
    if ver != VERSION:
        raise CaptureError(f"{path}: capture format version {ver} is not supported (this hexiao "
                           f"reads version {VERSION}); upgrade hexiao to decode it")
    pos = len(MAGIC) + 6 + hlen
    if pos > len(raw):
        raise CaptureError(f"{path}: truncated inside its header; nothing to decode")
    try:
        header = json.loads(raw[pos - hlen : pos])
    except ValueError:
        raise CaptureError(f"{path}: the capture header is not valid JSON") from None
    records, cut = [], None
    while pos < len(raw):
        if pos + _REC.size > len(raw):
            cut = f"truncated at byte {len(raw)}, inside the head of record {len(records) + 1}"
            break
        d, t_us, n = _REC.unpack_from(raw, pos)
        if d not in _DIR_NAME:
            cut = f"corrupt at byte {pos}: record {len(records) + 1} has direction code {d}"
            break
        if pos + _REC.size + n > len(raw):
            cut = (f"truncated at byte {len(raw)}, inside record {len(records) + 1} "
                   f"({len(raw) - pos - _REC.size} of its {n} bytes)")
            break
        records.append((_DIR_NAME[d], t_us, raw[pos + _REC.size : pos + _REC.size + n]))
        pos += _REC.size + n
    return header, records, cut

