"""A pty "cable" between the host and a device process, with a man in the middle.

    host (pyserial) ── pty A ──┐                    ┌── pty B ── device (stdin/stdout)
                               └─ relay thread ─────┘
                                  noise, capture, injection

Cable creates both ptys in raw mode: the host opens `cable.host_port` with pyserial, the device
process gets `cable.device_fd` as its stdin and stdout. A thread copies bytes between the two
masters and, per direction ("h2d", "d2h"), can:

- add line noise: each byte is, with probability p, corrupted, dropped or duplicated (seeded);
- send a corrupted copy of the next frame right after it (the frame, de-COBSed, with one bit
  flipped and its old CRC, so the receiver's verdict is exactly `crc`);
- inject a frame at a frame boundary: a forgery (see forge()) or a replay of a captured frame.

Everything the relay changes is recorded in `cable.log` and summed in `cable.stats`, so a test
can compare what the link counted with what was done to it. spawn_device() starts a device
process (MicroPython running firmware) on the cable and collects the JSON lines it reports on
stderr.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pty
import random
import select
import subprocess
import termios
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hexiao.protocol import cobs, codecs, cose, frame

H2D, D2H = "h2d", "d2h"
DIRECTIONS = (H2D, D2H)
NOISE_KINDS = ("corrupt", "drop", "dup")


def set_raw(fd: int) -> None:
    """cfmakeraw(3): no echo, no line editing, no signals, no CR/LF translation, 8 bits."""
    attr = termios.tcgetattr(fd)
    attr[0] &= ~(termios.IGNBRK | termios.BRKINT | termios.PARMRK | termios.ISTRIP
                 | termios.INLCR | termios.IGNCR | termios.ICRNL | termios.IXON | termios.IXOFF)
    attr[1] &= ~termios.OPOST
    attr[2] &= ~(termios.CSIZE | termios.PARENB)
    attr[2] |= termios.CS8
    attr[3] &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.ISIG | termios.IEXTEN)
    attr[6][termios.VMIN] = 1
    attr[6][termios.VTIME] = 0
    termios.tcsetattr(fd, termios.TCSANOW, attr)


def forge(msg: dict[str, Any], kid: bytes, counter: int, alg: int = cose.ALG_HMAC256,
          key: bytes | None = None) -> bytes:
    """A well-formed frame (valid COBS, CRC and COSE structure) whose MAC is made with a key the
    attacker has: a random one unless given. A receiver must reject it as `mac`."""
    mac_key = key if key is not None else os.urandom(32)
    return frame.encode(codecs.mac0(mac_key, alg, kid, counter, codecs.encode(msg)))


@dataclass(frozen=True)
class Seen:
    """A frame as a wire tapper reads it."""

    kid: bytes
    counter: int  # the frame counter (Partial IV), not an ack's "counter" field
    alg: int
    message: dict[str, Any]


def peek(wire: bytes) -> Seen:
    """What anyone on the cable can read in a frame (the link authenticates, it does not
    encrypt). Raises ProtocolError if the frame is damaged."""
    m = codecs.parse(frame.decode(wire.rstrip(b"\x00")))
    return Seen(m.kid, m.counter, m.alg, codecs.decode(m.payload))


def corrupt_copy(wire: bytes, rng: random.Random) -> bytes:
    """The frame with one bit of its COSE bytes flipped and the original CRC kept."""
    body = bytearray(cobs.decode(wire.rstrip(b"\x00")))
    i = rng.randrange(len(body) - 4)
    body[i] ^= 1 << rng.randrange(8)
    return cobs.encode(bytes(body)) + b"\x00"


class _Path:
    """One direction of the cable."""

    def __init__(self, name: str, src: int, dst: int, p: float, keep: int, seed: int) -> None:
        self.name, self.src, self.dst, self.p = name, src, dst, p
        # one generator per direction: its noise depends on its own bytes, not on how the
        # two directions' reads happen to interleave
        self.rng = random.Random(f"{seed}/{name}")
        self.out = bytearray()  # bytes for dst not yet written
        self.partial = bytearray()  # the source's current frame, for capture
        self.frames: deque[bytes] = deque(maxlen=keep)  # clean frames as the source sent them
        self.corrupt_next = 0
        self.held: list[tuple[str, bytes]] = []  # injections waiting for a frame boundary
        self.stats = {"bytes": 0, "frames": 0, "corrupt": 0, "drop": 0, "dup": 0,
                      "corrupt_copy": 0, "forge": 0, "replay": 0}
        self.eof = False


class Cable:
    """Two raw ptys joined by a relay thread; see the module docstring."""

    def __init__(self, *, noise: float | Mapping[str, float] = 0.0, seed: int = 0,
                 keep_frames: int = 512) -> None:
        p = noise if isinstance(noise, Mapping) else {H2D: noise, D2H: noise}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.log: list[dict[str, Any]] = []
        self._ma, self._sa = pty.openpty()
        self._mb, self._sb = pty.openpty()
        for fd in (self._sa, self._sb):
            set_raw(fd)
        for fd in (self._ma, self._mb):
            os.set_blocking(fd, False)
        # the relay keeps pty A's slave open: its raw settings stay, and the master does not
        # see EIO while the host has the port closed
        self.host_port = os.ttyname(self._sa)
        self._wake_r, self._wake_w = os.pipe()
        self._paths = {
            H2D: _Path(H2D, self._ma, self._mb, p.get(H2D, 0.0), keep_frames, seed),
            D2H: _Path(D2H, self._mb, self._ma, p.get(D2H, 0.0), keep_frames, seed),
        }

    @property
    def device_fd(self) -> int:
        """The device end: give it to the device process as stdin and stdout."""
        if self._sb < 0:
            raise RuntimeError("device end already handed over")
        return self._sb

    def release_device_fd(self) -> None:
        """Close the relay's copy of the device end once the device process holds it, so the
        relay sees the device hang up when it exits."""
        if self._sb >= 0:
            os.close(self._sb)
            self._sb = -1

    # -- control ------------------------------------------------------------------------------

    def start(self) -> Cable:
        self._thread = threading.Thread(target=self._run, name="hexiao-cable", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the relay and close both masters: both ends see a hang-up."""
        self._stop.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(5)
        for fd in (self._ma, self._mb, self._sa, self._sb, self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._ma = self._mb = self._sa = self._sb = self._wake_r = self._wake_w = -1

    def __enter__(self) -> Cable:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def corrupt_next(self, direction: str) -> None:
        """After the next complete frame in `direction`, also send a corrupted copy of it."""
        with self._lock:
            self._paths[direction].corrupt_next += 1

    def inject(self, direction: str, wire: bytes, kind: str = "forge") -> None:
        """Send `wire` (a complete frame) to the receiving end at the next frame boundary."""
        if kind not in ("forge", "replay"):
            raise ValueError("kind is forge or replay")
        with self._lock:
            path = self._paths[direction]
            path.held.append((kind, bytes(wire)))
            if not path.partial:
                self._release_held(path)
        self._wake()

    def replay(self, direction: str, pick: Callable[[bytes], bool] | int = -1) -> bytes:
        """Send again a frame captured in `direction`: the pick-th one, or the last one that
        pick(wire) accepts. Returns the frame."""
        with self._lock:
            frames = list(self._paths[direction].frames)
        if isinstance(pick, int):
            wire = frames[pick]
        else:
            chosen = [w for w in frames if pick(w)]
            if not chosen:
                raise LookupError("no captured frame matches")
            wire = chosen[-1]
        self.inject(direction, wire, kind="replay")
        return wire

    def frames(self, direction: str) -> list[bytes]:
        """Clean frames seen in `direction` (as sent, before any noise), oldest first."""
        with self._lock:
            return list(self._paths[direction].frames)

    @property
    def stats(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {d: dict(self._paths[d].stats) for d in DIRECTIONS}

    def wait_idle(self, timeout: float = 2.0) -> bool:
        """Wait until the relay has written everything it holds; False on timeout."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if not any(p.out or p.held for p in self._paths.values()):
                    return True
            time.sleep(0.005)
        return False

    # -- the relay thread ---------------------------------------------------------------------

    def _run(self) -> None:
        by_src = {p.src: p for p in self._paths.values()}
        by_dst = {p.dst: p for p in self._paths.values()}
        while not self._stop.is_set():
            with self._lock:
                wlist = [p.dst for p in self._paths.values() if p.out]
            rlist = [self._wake_r] + [p.src for p in self._paths.values() if not p.eof]
            try:
                readable, writable, _ = select.select(rlist, wlist, [], 0.5)
            except (OSError, ValueError):
                return  # closed under us
            if self._wake_r in readable:
                with contextlib.suppress(OSError):
                    os.read(self._wake_r, 512)
            for fd in readable:
                path = by_src.get(fd)
                if path is None:
                    continue
                try:
                    data = os.read(fd, 4096)
                except BlockingIOError:
                    continue
                except OSError:  # EIO: the slave side was closed (the device exited)
                    data = b""
                with self._lock:
                    if data:
                        self._forward(path, data)
                    else:
                        path.eof = True
                        self.log.append({"dir": path.name, "kind": "hangup"})
            for fd in writable:
                path = by_dst[fd]
                with self._lock:
                    try:
                        n = os.write(fd, path.out)
                    except BlockingIOError:
                        continue
                    except OSError:  # the receiving side is gone; drop what it would get
                        n = len(path.out)
                    del path.out[:n]

    def _forward(self, path: _Path, data: bytes) -> None:
        # under the lock: capture frames from the clean stream, then apply noise byte by byte
        rng, p, out, stats = path.rng, path.p, path.out, path.stats
        start = stats["bytes"]
        stats["bytes"] += len(data)
        for i, b in enumerate(data):
            if p and rng.random() < p:
                kind = rng.choice(NOISE_KINDS)
                stats[kind] += 1
                self.log.append({"dir": path.name, "kind": kind, "at": start + i})
                if kind == "corrupt":
                    out.append(b ^ rng.randrange(1, 256))
                elif kind == "dup":
                    out.append(b)
                    out.append(b)
            else:
                out.append(b)
            if b:
                path.partial.append(b)
                continue
            if path.partial:  # a frame ended (a lone delimiter is not one)
                wire = bytes(path.partial) + b"\x00"
                path.partial.clear()
                path.frames.append(wire)
                stats["frames"] += 1
                if path.corrupt_next:
                    path.corrupt_next -= 1
                    out.extend(corrupt_copy(wire, rng))
                    stats["corrupt_copy"] += 1
                    self.log.append({"dir": path.name, "kind": "corrupt_copy"})
            self._release_held(path)

    def _release_held(self, path: _Path) -> None:
        for kind, wire in path.held:
            path.out.extend(wire)
            path.stats[kind] += 1
            self.log.append({"dir": path.name, "kind": kind, "len": len(wire)})
        path.held.clear()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\x01")


class DeviceProcess:
    """A device program on a cable's device end; its stderr JSON lines become `events`."""

    def __init__(self, cable: Cable, argv: list[str], env: dict[str, str], cwd: str) -> None:
        self._cond = threading.Condition()
        self.events: list[dict[str, Any]] = []
        self.other: list[str] = []  # stderr lines that are not events (a traceback, say)
        fd = cable.device_fd
        self.proc = subprocess.Popen(
            argv, stdin=fd, stdout=fd, stderr=subprocess.PIPE, env=env, cwd=cwd,
            start_new_session=True,
        )
        cable.release_device_fd()
        self._reader = threading.Thread(target=self._read, name="hexiao-device-stderr",
                                        daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            try:
                ev = json.loads(line)
            except ValueError:
                ev = None
            with self._cond:
                if isinstance(ev, dict) and "ev" in ev:
                    self.events.append(ev)
                else:
                    self.other.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def of(self, kind: str) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self.events if e["ev"] == kind]

    def wait_for(self, pred: Callable[[list[dict[str, Any]]], Any], timeout: float) -> Any:
        """Wait until pred(events) is truthy and return it; TimeoutError if it is not within
        `timeout` seconds or the process ends first (with its stderr in the message)."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                got = pred(self.events)
                if got:
                    return got
                left = end - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = "\n".join(self.other[-8:])
                    state = "timed out" if left <= 0 else f"device exited ({self.proc.poll()})"
                    raise TimeoutError(f"{state}; device stderr:\n{tail}")
                self._cond.wait(min(left, 0.2))

    def open_writer(self, fifo: str | os.PathLike[str], timeout: float) -> int:
        """The (blocking) write end of a FIFO this device reads, e.g. the sim board's scanner,
        once the device has opened its read end: until then the open fails with ENXIO.
        TimeoutError if it has not within `timeout` seconds, or has exited."""
        end = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                if time.monotonic() > end or self.proc.poll() is not None:
                    raise TimeoutError(f"the device never opened {fifo}") from None
                time.sleep(0.01)
                continue
            os.set_blocking(fd, True)
            return fd

    def stop(self, timeout: float = 10.0) -> int:
        """Wait for the process to end (after the cable hung up on it); kill it if it does not."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        self._reader.join(5)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()
        return rc
