# The hexiao link: one session between a device and the host over a byte stream (SPEC.md).
#
# Sans-I/O, in the style of h11: bytes and the current time (ms, monotonic) go in through
# receive() and poll(); events come back as lists of tuples; bytes to write are taken with
# data_to_send(); next_timeout() says when poll() is due. No I/O, clocks or randomness inside:
# entropy is a function given at construction.
#
# Rules kept here:
# - counter 0 is the handshake epoch: hello, welcome and nack only, MAC'd with the device key;
#   counters from 1 are the session epoch, MAC'd with the HKDF session key of each direction;
# - nothing is decoded before its MAC verifies, and nothing verified is delivered twice: a
#   counter already seen is re-acknowledged, never re-delivered;
# - every message but hello, ack and nack is reliable: stop-and-wait, one in flight per direction,
#   retransmitted with the same counter (and bytes) until acked, nacked or given up (EV_EXPIRED:
#   max_tries retransmissions without a verified frame from the peer, or give_up_ms in flight);
#   so reliable messages arrive once and in order: a reliable message is new only if its counter
#   is above the last reliable one's; acks and nacks are judged by the replay window;
# - a damaged frame (line noise) triggers an early retransmission and a counter-less nack that asks
#   the peer for the same, both at most once per rto/4;
# - every rejected frame is counted under its error code and reported as EV_REJECTED (line noise
#   once per call, with its number of frames: a flood's events stay few); no
#   ProtocolError escapes receive(); the work and memory of a call are bounded by its bytes, and
#   what it holds at once by the largest frame (the deframer hands frames over one at a time).

import sys

from . import cose as _cose
from . import messages
from .errors import ProtocolError, number
from .errors import name as error_name
from .frame import Deframer
from .frame import encode as frame_encode
from .replay import DUPLICATE, TOO_OLD, Window

DEVICE = "device"
HOST = "host"

EV_OPEN = "open"  # (EV_OPEN, {"version", "kid", "firmware", "board", "reset_cause"})
EV_MESSAGE = "message"  # (EV_MESSAGE, msg)
EV_ACKED = "acked"  # (EV_ACKED, msg)
EV_NACKED = "nacked"  # (EV_NACKED, msg, code name, detail)
EV_EXPIRED = "expired"  # (EV_EXPIRED, msg): not known to be delivered; the session is closing
EV_REJECTED = "rejected"  # (EV_REJECTED, code name, detail, frames): line noise is one per
# receive() call (the code and detail of its first frame, the number of noise frames of every
# NOISE code); anything else one per frame
EV_CLOSED = "closed"  # (EV_CLOSED, reason): a code that the device's log keeps, one of
# reconnect, rekey (the counter space is used up), unacked (a message expired), hs_timeout (the
# host's welcome was not confirmed), host_lost and rewelcome (link_device), new_hello (link_host)

IDLE = "idle"
HANDSHAKE = "handshake"
OPEN = "open"

NOISE = ("crc", "cobs", "truncated", "oversize")  # the deframer's codes: line noise, not tampering
_HOST = sys.implementation.name != "micropython"  # (tools/terse.py: False in device builds)

if sys.implementation.name != "micropython":  # the host: the fast paths codecs.py chooses
    from .check import verify_frame  # noqa: F401 (the receive path as one stateless function)
    from .codecs import decode, encode, mac0, parse
else:  # the device: the general code itself (codecs.py would be one more module in its heap)
    from .cose import mac0, parse
    from .messages import decode, encode


class Link:
    # the options are given by keyword; not keyword-only (`*`) because MicroPython would keep
    # their defaults in a dict for good (~220 B more of the device's heap than a tuple)
    def __init__(
        self, role, entropy, device_id=None, device_key=None, keystore=None, alg=5,
        algs=(5, 4), versions=messages.VERSIONS, hello=None, rto_ms=200, max_tries=8,
        give_up_ms=20000, hello_max_ms=2000, queue_max=16, aad=b"",
    ):
        if role == DEVICE:
            if not (device_id and device_key and len(device_key) == 32):
                raise ValueError("a device link needs its id and a 32-byte device key")
            from . import link_device as role_module
        elif role == HOST:
            if keystore is None:
                raise ValueError("a host link needs a keystore: kid -> 32-byte key or None")
            from . import link_host as role_module
        else:
            raise ValueError("role must be device or host")
        self.role = role
        self._role = role_module
        self.entropy = entropy
        self.keystore = keystore
        self.alg = alg
        self.algs = algs
        self.versions = versions
        self.hello_info = hello or {"firmware": "unknown", "board": "unknown"}
        self.rto = rto_ms
        self.max_tries = max_tries  # retransmissions in a row without a word from the peer
        self.give_up_ms = give_up_ms  # and a message's whole time in flight
        self.hello_max = hello_max_ms
        self.queue_max = queue_max
        self.aad = aad
        self.counters = {}
        self._deframer = Deframer()
        self._out = bytearray()
        self._queue = []
        self._inflight = None  # [counter, wire, msg, deadline, tries since heard, first sent]
        self._hs = None  # handshake frame being repeated: [wire, deadline, tries]
        self._last_fast = -(1 << 30)
        self._last_poke = -(1 << 30)
        if _HOST:  # link_host: hellos waiting to replace the session; nonces of ended sessions
            self._cands = []
            self._used_nonces = {}
        self.state = IDLE
        self.kid = device_id
        self.device_key = device_key
        self.peer = None
        self._reset_session()

    # -- inputs -----------------------------------------------------------------------------

    def connect(self, now):
        """Device: start (or restart) the handshake with a fresh nonce."""
        if self.role != DEVICE:
            raise ValueError("only the device starts a handshake")
        events = []
        if self.state != IDLE:
            self._close("reconnect", events)
        self._reset_session()
        self.nonce = self.entropy(16)
        self.state = HANDSHAKE
        self._role.connect(self, now)
        return events

    if sys.implementation.name != "micropython":  # the host's alone; not in device builds

        def poke(self, kid, now):
            """Host: ask device `kid` to say hello now (an unsolicited nack(no_session) under its
            key), for a host that opens a port the device may still hold a session on. No-op
            once a session is under way. ValueError if the keystore has no key for kid."""
            if self.role != HOST:
                raise ValueError("only the host pokes")
            self._role.poke(self, kid, now)

    def send(self, msg, now):
        """Queue an application message; False if the queue is full. Raises ValueError if the
        message is invalid or one the link sends itself."""
        if not isinstance(msg, dict):
            raise ValueError("a message is a dict")
        payload = encode(msg)
        _, _, epoch, reliable = messages.info(msg["type"])
        if epoch != messages.SESSION or not reliable:  # hello, welcome, ack, nack
            raise ValueError("%s is sent by the link itself" % msg["type"])
        if len(payload) > _cose.MAX_PAYLOAD:
            raise ValueError("message of %d bytes does not fit one frame" % len(payload))
        if len(self._queue) >= self.queue_max:
            return False
        self._queue.append((msg, payload))
        self._pump(now)
        return True

    def receive(self, data, now):
        events = []
        noise = -1  # the index in events of this call's one EV_REJECTED for line noise
        d = self._deframer
        d.push(data)
        while True:
            item = d.take()  # one at a time: a flood of bad frames is never held all at once
            if item is None:
                break
            if isinstance(item, ProtocolError):  # the deframer's: line noise
                self._count(item.code)
                self._on_noise(now)
                if noise < 0:
                    noise = len(events)
                    events.append((EV_REJECTED, item.code, item.detail, 1))
                else:  # counted above under its own code; reported once, with the frames
                    e = events[noise]
                    events[noise] = (EV_REJECTED, e[1], e[2], e[3] + 1)
                continue
            self._count("rx_frames")
            try:
                m = parse(item)
                if m.counter == 0:
                    ack = self._on_handshake_frame(m, now, events)
                else:
                    ack = self._on_session_frame(m, now, events)
            except ProtocolError as e:
                self._count(e.code)
                events.append((EV_REJECTED, e.code, e.detail, 1))
                continue
            # the answer is built up here, not at the bottom of the call chain that took the
            # frame apart: on the device every frame of a deep chain takes heap
            if ack is not None:
                self._send_now({"type": "ack", "counter": ack})
            self._pump(now)
        return events

    def poll(self, now):
        events = []
        if self.state == OPEN and self.tx_counter >= _cose.MAX_COUNTER:
            self._close("rekey", events)
        hs = self._hs
        if hs is not None and now >= hs[1]:
            if self.role == HOST and hs[2] >= self.max_tries:
                self._hs = None
                self._close("hs_timeout", events)
            else:
                self._write(hs[0])
                self._count("retransmits")
                hs[2] += 1
                hs[1] = now + min(self.rto << min(hs[2], 8), self.hello_max)
        f = self._inflight
        if f is not None and now >= f[3]:
            if f[4] >= self.max_tries or now - f[5] >= self.give_up_ms:
                self._count("expired")
                self._role.give_up(self, now)
                self._close("unacked", events)
            else:
                self._write(f[1])
                self._count("retransmits")
                f[4] += 1
                f[3] = now + min(self.rto << (f[4] - 1), 4 * self.rto)
        if events and self.role == DEVICE:  # its session ended: the device starts the next one
            events.extend(self.connect(now))
        return events

    # -- outputs ----------------------------------------------------------------------------

    def data_to_send(self):
        out = bytes(self._out)
        self._out = bytearray()
        return out

    def next_timeout(self):
        if self.state == OPEN and self.tx_counter >= _cose.MAX_COUNTER:
            return 0
        ts = []
        if self._hs is not None:
            ts.append(self._hs[1])
        if self._inflight is not None:
            ts.append(self._inflight[3])
        return min(ts) if ts else None

    def is_open(self):
        return self.state == OPEN

    def pending(self):
        return len(self._queue) + (1 if self._inflight else 0)

    # -- internals --------------------------------------------------------------------------

    def _reset_session(self):
        self.tx_key = self.rx_key = None
        self.window = Window()
        self.last_reliable = 0
        self.tx_counter = 0
        self.nonce = self.host_nonce = None
        self.session_alg = self.alg
        self.version = None

    def _count(self, name):
        self.counters[name] = self.counters.get(name, 0) + 1

    def _write(self, wire):
        self._out.extend(wire)
        self._count("tx_frames")

    def _frame(self, msg, counter, key):
        payload = encode(msg)
        return frame_encode(mac0(key, self.session_alg, self.kid, counter, payload, self.aad))

    # Every session frame takes a fresh counter; once the counter space is used up nothing more
    # is sent, and poll() ends the session (SPEC: rekey).

    def _send_now(self, msg):
        # unreliable session message (ack, nack): written once
        if self.tx_counter < _cose.MAX_COUNTER:
            self.tx_counter += 1
            self._write(self._frame(msg, self.tx_counter, self.tx_key))

    def _pump(self, now):
        if (self.state != OPEN or self._inflight is not None or not self._queue
                or self.tx_counter >= _cose.MAX_COUNTER):
            return
        self.tx_counter += 1
        msg, payload = self._queue.pop(0)
        wire = frame_encode(
            mac0(self.tx_key, self.session_alg, self.kid, self.tx_counter, payload, self.aad)
        )
        self._write(wire)
        self._inflight = [self.tx_counter, wire, msg, now + self.rto, 1, now]

    def _on_noise(self, now):
        if self.state != OPEN or now - self._last_fast < self.rto // 4:
            return
        self._last_fast = now
        if self._inflight is not None:
            self._write(self._inflight[1])
            self._count("retransmits")
        if now - self._last_poke >= self.rto // 4:
            self._last_poke = now
            self._send_now({"type": "nack", "code": number("crc")})

    def _close(self, reason, events):
        if self._inflight is not None:
            events.append((EV_EXPIRED, self._inflight[2]))
        for msg, _ in self._queue:
            events.append((EV_EXPIRED, msg))
        self._inflight = None
        self._queue = []
        was = self.state
        self.state = IDLE
        self._reset_session()
        if was != IDLE:
            events.append((EV_CLOSED, reason))

    # _on_handshake_frame and _on_session_frame return the counter to acknowledge, or None

    def _on_handshake_frame(self, m, now, events):
        role = self._role
        role.check_alg(self, m)
        key = role.key_for(self, m.kid)
        m.verify(key, self.aad)
        return role.on_handshake(self, m, key, self._decode(m), now, events)

    def _decode(self, m):
        # the verified payload: a valid message of its counter's epoch, sent in our direction
        msg = decode(m.payload)
        messages.check_epoch(m.counter, msg)
        d = messages.info(msg["type"])[1]
        if d != messages.BOTH and d != self._role.DIRECTION:
            raise ProtocolError("unknown_type", "%s is not sent in this direction" % msg["type"])
        return msg

    def _open(self, peer, events):
        self.state = OPEN
        self.peer = peer
        self._count("sessions")
        events.append((EV_OPEN, peer))

    def _on_session_frame(self, m, now, events):
        if _HOST:  # noqa: SIM102 (a constant: device builds drop the block, tools/terse.py)
            if self._cands:  # a hello waits to replace the session: this frame may confirm it
                self._role.confirm(self, m, now, events)
        if self.tx_key is None:
            self._role.no_session(self, m, now)
            raise ProtocolError("no_session", "session frame with no session")
        if m.kid != self.kid:
            raise ProtocolError("kid", "frame for another device")
        self._role.check_alg(self, m)
        m.verify(self.rx_key, self.aad)
        c = m.counter
        try:
            msg = self._decode(m)
        except ProtocolError as e:
            if c > self.last_reliable:  # verified but invalid: it takes a reliable slot
                self.last_reliable = c
                self.window.mark(c)
            if self.state == OPEN:
                self._send_now({"type": "nack", "counter": c, "code": number(e.code)})
            raise
        if self._inflight is not None:  # the peer is alive: noise on the line costs no retries
            self._inflight[4] = 1
        reliable = messages.info(msg["type"])[3]
        if reliable:  # stop-and-wait: each new reliable message has a higher counter than the last
            if c == self.last_reliable:
                self._count("duplicate")
                return c  # acknowledged again
            if c < self.last_reliable:
                raise ProtocolError("replay", "counter %d is older than the last message" % c)
            self.last_reliable = c
        else:
            seen = self.window.check(c)
            if seen == DUPLICATE:
                self._count("duplicate")
                return None
            if seen == TOO_OLD:
                raise ProtocolError("replay", "counter %d is older than the window" % c)
        self.window.mark(c)
        if self.state == HANDSHAKE:  # host: the first verified session frame confirms the keys
            self._hs = None
            self._open(self.peer, events)
        t = msg["type"]
        if t != "ack" and t != "nack":
            events.append((EV_MESSAGE, msg))
            return c if reliable else None
        # the peer's answer to our message in flight
        f = self._inflight
        counter = msg.get("counter")
        if counter is None:  # a nack for line noise: repeat what we have in flight
            if f is not None and now - self._last_fast >= self.rto // 4:
                self._last_fast = now
                self._write(f[1])
                self._count("retransmits")
        elif f is not None and f[0] == counter:
            self._inflight = None
            if t == "ack":
                events.append((EV_ACKED, f[2]))
            else:
                events.append((EV_NACKED, f[2], error_name(msg["code"]), msg.get("detail", "")))
        elif t == "ack" and counter != 0:  # an ack of the welcome (0) confirmed the session
            self._count("stray_acks")
        return None
