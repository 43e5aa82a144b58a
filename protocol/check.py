# The receive path of a Link as one stateless function, for the golden vectors (SPEC.md,
# "Golden vectors"). Loaded by vector runners and tools, never by the firmware.

from . import codecs, messages
from .errors import ProtocolError
from .frame import Deframer
from .replay import NEW, Window


def verify_frame(wire, key, alg, aad=b"", seen=(), versions=messages.VERSIONS):
    """Check one complete wire frame as a receiver holding `key` would, statelessly except for the
    counters already `seen` in the session. Returns (Mac0, message) or raises ProtocolError.
    Errors come in the order of the spec: deframe, COSE structure, alg, MAC, replay, payload,
    epoch, version."""
    d = Deframer()
    d.push(wire)
    item = d.take()
    if item is None or not wire.endswith(b"\x00"):
        raise ProtocolError("truncated", "no complete frame")
    if d.take() is not None:
        raise ProtocolError("cobs", "more than one frame")
    if isinstance(item, ProtocolError):
        raise item
    m = codecs.parse(item)
    if m.alg != alg:
        raise ProtocolError("alg", "alg %d, expected %d" % (m.alg, alg))
    m.verify(key, aad)
    if m.counter:
        w = Window()
        for c in seen:
            w.mark(c)
        if w.check(m.counter) != NEW:
            raise ProtocolError("replay", "counter %d already seen or too old" % m.counter)
    msg = codecs.decode(m.payload)
    messages.check_epoch(m.counter, msg)
    if msg["type"] == "hello":
        messages.common_version(versions, msg["versions"])
    elif msg["type"] == "welcome" and msg["version"] not in versions:
        raise ProtocolError("version", "welcome chose version %d" % msg["version"])
    return m, msg
