# The device's side of the handshake (SPEC.md, "Handshake"): loaded only by a device Link, so the
# firmware's heap never holds the host's half.
#
# Rules kept here:
# - the device starts every session with a hello carrying a fresh nonce, repeated until a welcome
#   that echoes that nonce arrives; the welcome is acked under the new d2h key;
# - the device's own alg is the only one it accepts, and only frames for its own kid;
# - a verified nack(no_session) from the host ends the session and starts a new hello.

from . import messages
from .crypto import session_keys
from .errors import ProtocolError, number

OPEN = "open"


def connect(link, now):
    hello = {"type": "hello", "versions": list(link.versions), "nonce": link.nonce}
    hello.update(link.hello_info)
    wire = link._frame(hello, 0, link.device_key)
    link._write(b"\x00" + wire)  # the leading delimiter flushes a receiver's partial frame
    link._hs = [wire, now + link.rto, 1]


def key_for(link, kid):
    if kid != link.kid:
        raise ProtocolError("kid", "frame for another device")
    return link.device_key


def check_alg(link, m):
    if m.alg != link.alg:
        raise ProtocolError("alg", "alg %d not accepted" % m.alg)


def give_up(link, now):
    pass  # the device starts a new hello right after (Link.poll)


def no_session(link, m, now):
    pass  # the device cannot help a host that lost its session: it waits for nack(no_session)


def on_handshake(link, m, key, msg, now, events):
    # returns the counter to acknowledge (0: the welcome), or None
    if msg["type"] != "welcome":  # a nack in the handshake epoch
        code = msg["code"]
        if link.state == OPEN and code == number("no_session"):
            link._count("host_lost")
            link._close("host_lost", events)
            events.extend(link.connect(now))
        elif code == number("version"):
            raise ProtocolError("version", "host shares no protocol version")
        return None
    if link.nonce is None or msg["device_nonce"] != link.nonce:
        raise ProtocolError("handshake", "welcome for another hello")
    if link.state == OPEN and msg["host_nonce"] == link.host_nonce:
        link._count("duplicate")  # our ack of the welcome was lost: acknowledge again
        return 0
    if msg["version"] not in link.versions:
        raise ProtocolError("version", "host chose version %d" % msg["version"])
    if link.state == OPEN:
        # authentic and for our current hello, but with a new host nonce: the host lost our
        # session and answered a late copy of the hello; its new keys win
        nonce = link.nonce
        link._close("rewelcome", events)
        link.nonce = nonce
    link.version = msg["version"]
    link.host_nonce = msg["host_nonce"]
    link.tx_key, link.rx_key = session_keys(link.device_key, link.host_nonce, link.nonce)
    link._hs = None
    link._open({"version": link.version, "kid": link.kid}, events)
    return 0  # Link.receive sends the ack, then what is queued


DIRECTION = messages.H2D  # what a device receives
