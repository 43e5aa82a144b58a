"""The receipt tap's TCP proxy: POS connections in, one printer out, an Injector per connection.

Rules this module keeps:
- Threads, not asyncio: the injector is blocking CPU-bound sans-I/O code and the printer is one
  blocking resource (socket, serial port or file), so one thread per POS connection plus a FIFO
  printer turn is the simplest design that keeps jobs whole. One more, the door thread, accepts
  connections and watches those waiting for a job's first bytes (one selector).
- A job is what a POS connection sends while it holds the printer: from its first byte to its
  close, or to an idle gap of `idle_timeout` at a command boundary. A connection takes the
  printer's turn only once its first bytes have arrived, so connections that send nothing never
  delay a receipt; jobs take the printer in the order their first bytes arrived, and a waiting
  connection's further bytes stay in the kernel, never interleaved with another job's. A status
  request (DLE EOT) is a job's first bytes like any other: it is answered in its turn.
- Hostile or broken clients cannot stop the tap: running out of descriptors (EMFILE) or memory
  in accept() is logged once per burst and retried every ACCEPT_BACKOFF seconds, never the end
  of the accept loop; at `max_connections` (by default half the descriptor limit, at most 1024)
  the oldest connection that has never sent a byte is closed to make room ("shed"), and when
  there is none the new connection is closed at once. Selectors (epoll/poll) only: select()
  breaks on descriptors above 1023. What is kept per connection is bounded: the last
  `keep_receipts` receipt records (inject.py and receipt.py bound each one).
- No delay added: every byte goes out as soon as the injector releases it (it holds at most the
  tail before a cut, never a status request), and printer -> POS bytes (DLE EOT / GS r / GS a / ASB
  replies) go straight back, both directions served by one selector loop per job.
- The bound on what the tap adds to a job: one extra connection to the printer, parsing, and one
  QR block per receipt (native: well under 1 ms; raster: a few ms), plus `connect_timeout` at
  most when the printer refuses and is retried. Bytes are held only up to the injector's
  `hold_limit` (4 KB) and never past the cut or the job end. `hexiao tap proxybench` measures it.
- Fail-open: the injector never drops bytes (inject.py); should it raise anyway, the chunk goes
  out unchanged and the connection continues as a plain pipe.
- Never twice: bytes written to the printer are never written again. A printer that refuses the
  connection is retried for `connect_timeout` before anything is written (a brief drop is
  debounced); a printer lost mid-job ends the job, is logged and counted, the POS connection is
  closed cleanly (FIN after draining), and the proxy serves the next job.
- A POS that closes early (or goes silent mid-command for `stall_timeout`): everything received,
  a truncated command included, is flushed to the printer as sent.
"""

from __future__ import annotations

import errno
import logging
import resource
import selectors
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

from hexiao.hostd.tap.inject import Injector
from hexiao.hostd.tap.printer import PrinterConn, Target
from hexiao.hostd.tap.receipt import Receipt

log = logging.getLogger("hexiao.tap")

DEFAULT_PORT = 9100
ACCEPT_BACKOFF = 0.05   # seconds between accept() retries while descriptors or memory run out
_LISTENER_GONE = frozenset((errno.EBADF, errno.EINVAL, errno.ENOTSOCK))


def default_max_connections() -> int:
    """Half the descriptor limit (each job also needs a printer connection and a selector),
    at most 1024 (a thread each)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return max(8, min(1024, (soft if soft != resource.RLIM_INFINITY else 2048) // 2))


class PrinterLost(Exception):
    """The printer refused, dropped or stopped taking bytes during a job."""


class _Turn:
    """A FIFO queue for the printer: tickets are served in the order they were taken."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._next = self._serving = 0

    @property
    def waiting(self) -> int:
        with self._cond:
            return max(0, self._next - self._serving - 1)

    def take(self) -> int:
        with self._cond:
            ticket, self._next = self._next, self._next + 1
            return ticket

    @contextmanager
    def hold(self, ticket: int) -> Iterator[None]:
        """Wait for `ticket`'s turn; every ticket taken must pass through here exactly once."""
        try:
            with self._cond:
                self._cond.wait_for(lambda: self._serving == ticket)
            yield
        finally:
            with self._cond:
                self._serving += 1
                self._cond.notify_all()


@dataclass
class ConnRecord:
    """What one POS connection did, kept after it ends (for tests, the demo and stats)."""
    peer: str
    jobs: int = 0
    job_ids: list[int] = field(default_factory=list)  # numbers of its jobs, in printing order
    bytes_in: int = 0
    bytes_out: int = 0          # to the printer, injected blocks included
    replies: int = 0            # printer -> POS bytes
    end: str = ""               # closed | shed | printer-lost | printer-refused | stalled | error
    injections: list[tuple[int, int]] = field(default_factory=list)
    receipts: list[Receipt] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    counters: Counter[str] = field(default_factory=Counter)

    def as_json(self) -> dict[str, object]:
        return {"peer": self.peer, "end": self.end, "jobs": self.job_ids, "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out, "replies": self.replies,
                "injected": self.counters["injected"], "injections": self.injections,
                "receipts": [rc.as_json() for rc in self.receipts], "errors": self.errors}


class _Waiter:
    """A POS connection as the door loop and its thread share it."""

    def __init__(self, pos: socket.socket, peer: str) -> None:
        self.pos, self.peer = pos, peer
        self.ready = threading.Event()
        self.ticket: int | None = None   # the printer's turn for the bytes that came
        self.silent = True               # has never sent a byte
        self.shed = False                # closed to make room for a new connection

    def wake(self, ticket: int | None) -> None:
        self.ticket = ticket
        self.ready.set()

    def end_of_stream(self) -> None:
        """Stopping: the thread reads what the POS sent, then the end; never blocks."""
        with suppress(OSError):
            self.pos.shutdown(socket.SHUT_RD)
        self.wake(None)


class TapProxy:
    """Listen for POS connections; see the module rules. `start()`, then `stop()`."""

    def __init__(self, target: Target, make_injector: Callable[[], Injector],
                 listen: tuple[str, int] = ("127.0.0.1", DEFAULT_PORT), *,
                 idle_timeout: float = 2.0, connect_timeout: float = 5.0,
                 stall_timeout: float = 30.0, linger: float = 1.0,
                 keep: int = 1000,
                 on_finish: Callable[[ConnRecord], None] | None = None,
                 max_connections: int | None = None, keep_receipts: int = 20) -> None:
        self.target, self.make_injector, self.listen_addr = target, make_injector, listen
        self.idle_timeout, self.connect_timeout = idle_timeout, connect_timeout
        self.stall_timeout, self.linger = stall_timeout, linger
        self.max_connections = max_connections or default_max_connections()
        self.keep_receipts = keep_receipts  # receipt records kept per connection (the last)
        if keep_receipts < 1 or self.max_connections < 1:
            raise ValueError("keep_receipts and max_connections must be at least 1")
        self.counters: Counter[str] = Counter()
        self.errors: deque[str] = deque(maxlen=keep)
        self.finished: deque[ConnRecord] = deque(maxlen=keep)  # the last `keep` connections
        self.ended = 0                  # connections ended since start
        self.on_finish = on_finish      # called (in the connection's thread) as each one ends
        self._conns: set[socket.socket] = set()
        self._lock = threading.Condition()
        self._door_open = True
        self._returning: list[_Waiter] = []   # connections handed back to the door loop
        self._wake_r, self._wake_w = socket.socketpair()
        self._turn = _Turn()
        self._sock: socket.socket | None = None
        self._threads: set[threading.Thread] = set()
        self._stopping = threading.Event()

    # -- lifecycle --

    def start(self) -> tuple[str, int]:
        sock = socket.socket(socket.AF_INET6 if ":" in self.listen_addr[0] else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(self.listen_addr)
        sock.listen(64)
        self._sock = sock
        sock.setblocking(False)  # the door loop accepts only when the selector says so
        t = threading.Thread(target=self._door_loop, name="tap-door", daemon=True)
        self._threads.add(t)
        t.start()
        log.info("tap listening on %s:%d, printing to %s", *self.address,
                 self.target.describe())
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        assert self._sock is not None, "start() first"
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def waiting(self) -> int:
        """Connections with a job waiting for the printer."""
        return self._turn.waiting

    def stop(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:  # each POS looks closed: what it sent is flushed, then the thread ends
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RD)
        self._stopping.set()
        with suppress(OSError):
            self._wake_w.send(b"\0")  # the door loop ends and wakes the waiting connections
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(timeout=self.idle_timeout + self.linger + 5)
        if self._sock is not None:
            self._sock.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> TapProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_finished(self, n: int, timeout: float = 30.0) -> list[ConnRecord]:
        """Block until `n` connections have ended since start; the records kept."""
        with self._lock:
            if not self._lock.wait_for(lambda: self.ended >= n, timeout):
                raise TimeoutError(f"{self.ended} of {n} connections ended")
            return list(self.finished)

    # -- connections --
    # One "door" thread owns the listening socket and every connection that waits for its next
    # job's first bytes (one selector). It sees bytes arrive, takes the printer's ticket for them
    # in that order and hands the connection to its thread; the thread serves the job, then hands
    # the connection back. So silent connections never hold a turn, and jobs still print in the
    # order their bytes arrived (a POS that prints, closes and prints again gets its receipts in
    # order, whatever the thread scheduler does).

    def _door_loop(self) -> None:
        assert self._sock is not None
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        sel.register(self._sock, selectors.EVENT_READ, self._sock)
        failed = 0              # accept() failures in this burst: logged at its start and end
        paused_until = 0.0      # the listener is out of the selector until then (backing off)
        try:
            while not self._stopping.is_set():
                timeout = None
                if paused_until:
                    if (left := paused_until - time.monotonic()) <= 0:
                        sel.register(self._sock, selectors.EVENT_READ, self._sock)
                        paused_until, timeout = 0.0, None
                    else:
                        timeout = left
                for key, _ in sel.select(timeout):
                    try:
                        if key.data is None:
                            self._take_back(sel)
                        elif key.data is self._sock:
                            failed, paused = self._accept(sel, failed)
                            if paused:
                                sel.unregister(self._sock)
                                paused_until = time.monotonic() + ACCEPT_BACKOFF
                        else:
                            self._bytes_or_end(sel, key.data)
                    except Exception:  # a bug here must not stop the door for everyone
                        log.exception("tap: the door loop failed on one event")
                        if isinstance(key.data, _Waiter):
                            with suppress(KeyError, ValueError):
                                sel.unregister(key.fileobj)
                            key.data.end_of_stream()
        finally:
            with self._lock:
                self._door_open = False
                waiting = [key.data for key in sel.get_map().values()
                           if isinstance(key.data, _Waiter)] + self._returning
                self._returning = []
            sel.close()
            for w in waiting:  # stopping: each thread ends its connection (what came is printed)
                w.end_of_stream()

    def _take_back(self, sel: selectors.BaseSelector) -> None:
        with suppress(OSError):
            self._wake_r.recv(4096)
        with self._lock:
            back, self._returning = self._returning, []
        for w in back:
            sel.register(w.pos, selectors.EVENT_READ, w)

    def _accept(self, sel: selectors.BaseSelector, failed: int) -> tuple[int, bool]:
        """Accept one connection; (failures in this burst, whether to back off)."""
        assert self._sock is not None
        try:
            conn, peer = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return failed, False
        except OSError as exc:
            if self._stopping.is_set():
                return failed, False
            if exc.errno in _LISTENER_GONE:
                log.error("tap: the listening socket is gone (%s): no more POS connections", exc)
                self._stopping.set()
                return failed, False
            with self._lock:
                self.counters["accept_failed"] += 1
                if not failed:  # once per burst: a flood must not flood the log as well
                    self.errors.append(f"accept: {exc.strerror or exc}")
            if not failed:
                log.warning("tap: cannot accept POS connections: %s (%d open); retrying "
                            "every %.2fs", exc.strerror or exc, len(self._conns), ACCEPT_BACKOFF)
            return failed + 1, True
        if failed:
            log.warning("tap: accepting POS connections again after %d failed attempts", failed)
        self._admit(sel, conn, f"{peer[0]}:{peer[1]}")
        return 0, False

    def _admit(self, sel: selectors.BaseSelector, conn: socket.socket, peer: str) -> None:
        with self._lock:
            full = len(self._conns) >= self.max_connections
        if full:
            victim = next((key.data for key in sel.get_map().values()
                           if isinstance(key.data, _Waiter) and key.data.silent), None)
            if victim is None:  # every connection has sent something: they keep the room
                with self._lock:
                    self.counters["refused_full"] += 1
                conn.close()
                return
            # the oldest connection that never sent a byte makes room (selector keys keep
            # registration order; silent ones are never re-registered)
            sel.unregister(victim.pos)
            victim.shed = True
            with self._lock:
                self.counters["shed"] += 1
            with suppress(OSError):
                victim.pos.shutdown(socket.SHUT_RDWR)
            victim.wake(None)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.setblocking(True)
        except OSError:  # reset before we got to it
            conn.close()
            return
        w = _Waiter(conn, peer)
        t = threading.Thread(target=self._connection, args=(w,),
                             name=f"tap-{peer.rsplit(':', 1)[1]}", daemon=True)
        with self._lock:
            self._conns.add(conn)
            self._threads.add(t)
        try:
            t.start()
        except RuntimeError as exc:  # no thread to be had: this connection only is turned away
            with self._lock:
                self._conns.discard(conn)
                self._threads.discard(t)
                self.counters["accept_failed"] += 1
            log.warning("tap: cannot serve %s: %s", peer, exc)
            conn.close()
            return
        sel.register(conn, selectors.EVENT_READ, w)

    def _bytes_or_end(self, sel: selectors.BaseSelector, w: _Waiter) -> None:
        try:
            peek = w.pos.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            peek = b""  # reset: its thread finds out and ends the connection
        sel.unregister(w.pos)
        w.silent = w.silent and not peek
        w.wake(self._turn.take() if peek else None)  # the ticket: arrival order

    def _hand_back(self, w: _Waiter) -> None:
        """Between jobs: the door loop watches the connection again."""
        with self._lock:
            if self._door_open:
                self._returning.append(w)
            else:
                w.end_of_stream()
                return
        with suppress(OSError):
            self._wake_w.send(b"\0")

    def _count(self, rec: ConnRecord, name: str, error: str | None = None) -> None:
        with self._lock:
            self.counters[name] += 1
            if error:
                self.errors.append(f"{rec.peer}: {error}")
                rec.errors.append(error)
        if error:
            log.warning("tap %s: %s", rec.peer, error)

    def _recv(self, pos: socket.socket) -> bytes:
        try:
            return pos.recv(65536)
        except OSError:
            return b""

    def _connection(self, w: _Waiter) -> None:
        pos = w.pos
        rec = ConnRecord(w.peer)
        self._count(rec, "connections")
        inj: Injector | None = None
        try:
            try:
                inj = self.make_injector()
                inj.keep = min(inj.keep, self.keep_receipts)
            except Exception as exc:  # fail-open: no injector, a plain pipe to the printer
                inj = None
                rec.counters["proxy_failopen"] += 1
                self._count(rec, "proxy_failopen", f"no injector, passing through: {exc!r}")
            while not rec.end:
                w.ready.wait()
                w.ready.clear()
                ticket, w.ticket = w.ticket, None
                first = b""
                # an end (or stop, or shed): bytes may still have come
                if ticket is None and (first := self._recv(pos)):
                    ticket = self._turn.take()
                if ticket is not None:
                    with self._turn.hold(ticket):
                        if first := first or self._recv(pos):
                            self._job(pos, rec, inj, first)
                        else:
                            self._end(pos, rec, inj, w.shed)
                    if not rec.end:
                        self._hand_back(w)
                    continue
                # closed between jobs: only what the injector still holds (normally nothing;
                # an idle end released it) needs the printer's turn
                self._end(pos, rec, inj, w.shed, take_turn=True)
        except Exception as exc:  # a bug here must not take the proxy down
            rec.end = "error"
            self._count(rec, "errors", f"{type(exc).__name__}: {exc}")
        finally:
            self._close_pos(pos)
            if inj is not None:
                rec.receipts, rec.injections = inj.receipts, inj.injections
                rec.errors += inj.errors
                rec.counters.update(inj.counters)
            with self._lock:
                for key in ("injected", "receipts", "failopen", "errors", "status_requests"):
                    self.counters[f"injector_{key}"] += rec.counters[key]
                self.counters[f"end_{rec.end}"] += 1
                self.finished.append(rec)
                self.ended += 1
                self._conns.discard(pos)
                self._threads.discard(threading.current_thread())
                self._lock.notify_all()
            if self.on_finish is not None:
                try:
                    self.on_finish(rec)
                except Exception:
                    log.exception("tap: the on_finish callback failed")

    def _end(self, pos: socket.socket, rec: ConnRecord, inj: Injector | None, shed: bool,
             take_turn: bool = False) -> None:
        rec.end = "shed" if shed else "closed"
        if tail := self._safe(rec, inj, None, time.time()):
            if take_turn:
                with self._turn.hold(self._turn.take()):
                    self._job(pos, rec, inj, tail, already_processed=True)
            else:
                self._job(pos, rec, inj, tail, already_processed=True)

    def _safe(self, rec: ConnRecord, inj: Injector | None, data: bytes | None,
              now: float, idle: bool = False) -> bytes:
        """The injector's output for `data` (None: end of stream); the input unchanged if the
        injector is gone or raises (it promises not to)."""
        if inj is None or rec.counters["proxy_failopen"]:
            return data or b""
        try:
            if data is None:
                return inj.idle(now) if idle else inj.close(now)
            return inj.feed(data, now)
        except Exception as exc:
            rec.counters["proxy_failopen"] += 1
            self._count(rec, "proxy_failopen", f"injector raised, passing through: {exc!r}")
            return data or b""

    def _job(self, pos: socket.socket, rec: ConnRecord, inj: Injector | None, first: bytes,
             already_processed: bool = False) -> None:
        """One job; the caller holds the printer's turn."""
        rec.jobs += 1
        self._count(rec, "jobs")
        rec.job_ids.append(self.counters["jobs"])  # under the turn: the printer's order
        try:
            printer = self._connect()
        except PrinterLost as exc:
            rec.end = "printer-refused"
            self._count(rec, "printer_refused", f"printer refused the job: {exc}")
            return
        try:
            self._pump(pos, rec, inj, printer, first, already_processed)
        except PrinterLost as exc:
            rec.end = "printer-lost"
            self._count(rec, "printer_lost", f"printer lost mid-job after "
                        f"{rec.bytes_out} bytes, nothing resent: {exc}")
        finally:
            self._relay(pos, rec, printer.close(self.linger))

    def _connect(self) -> PrinterConn:
        deadline = time.monotonic() + self.connect_timeout
        delay = 0.05
        while True:
            try:
                return self.target.open()
            except OSError as exc:  # nothing written yet: retrying cannot duplicate a byte
                if time.monotonic() + delay > deadline or self._stopping.is_set():
                    raise PrinterLost(f"{self.target.describe()}: {exc}") from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _send(self, rec: ConnRecord, printer: PrinterConn, data: bytes) -> None:
        if not data:
            return
        try:
            printer.write(data)
        except OSError as exc:
            raise PrinterLost(str(exc) or type(exc).__name__) from exc
        rec.bytes_out += len(data)

    def _relay(self, pos: socket.socket, rec: ConnRecord, data: bytes) -> None:
        if not data:
            return
        rec.replies += len(data)
        with suppress(OSError):  # the POS left: its reply has nobody to go to
            pos.sendall(data)

    def _pump(self, pos: socket.socket, rec: ConnRecord, inj: Injector | None,
              printer: PrinterConn, first: bytes, already_processed: bool) -> None:
        rec.bytes_in += 0 if already_processed else len(first)
        self._send(rec, printer, first if already_processed else
                   self._safe(rec, inj, first, time.time()))
        if already_processed:
            return
        sel = selectors.DefaultSelector()
        try:
            sel.register(pos, selectors.EVENT_READ, "pos")
            if (fd := printer.fileno()) is not None:
                sel.register(fd, selectors.EVENT_READ, "printer")
            last = time.monotonic()
            while True:
                ready = sel.select(max(0.0, last + self.idle_timeout - time.monotonic()))
                if not ready:
                    quiet = time.monotonic() - last
                    if inj is not None and not rec.counters["proxy_failopen"] and \
                            inj.at_boundary:
                        self._send(rec, printer, self._safe(rec, inj, None, time.time(), True))
                        return  # the job ends at the idle gap; the connection stays open
                    if quiet >= self.stall_timeout:
                        rec.end = "stalled"
                        self._count(rec, "stalled", f"POS silent {quiet:.0f}s mid-command: "
                                    "flushing what it sent and closing")
                        self._send(rec, printer, self._safe(rec, inj, None, time.time()))
                        return
                    continue
                for key, _ in ready:
                    if key.data == "printer":
                        try:
                            reply = printer.read()
                        except OSError as exc:
                            raise PrinterLost(str(exc)) from exc
                        if not reply:
                            raise PrinterLost("the printer closed the connection")
                        self._relay(pos, rec, reply)
                        continue
                    try:
                        data = pos.recv(65536)
                    except OSError:
                        data = b""
                    if not data:  # the POS is done (or gone): flush everything it sent
                        rec.end = "closed"
                        self._send(rec, printer, self._safe(rec, inj, None, time.time()))
                        return
                    rec.bytes_in += len(data)
                    last = time.monotonic()
                    self._send(rec, printer, self._safe(rec, inj, data, time.time()))
        finally:
            sel.close()

    def _close_pos(self, pos: socket.socket) -> None:
        # FIN, then read what the POS still sends until it closes (bounded): closing with
        # unread bytes would send a reset instead of a clean close
        deadline = time.monotonic() + self.linger
        try:
            pos.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                pos.settimeout(left)
                if not pos.recv(65536):
                    break
        except OSError:
            pass
        finally:
            pos.close()
