# The host's side of the handshake (SPEC.md, "Handshake"): loaded only by a host Link.
#
# Rules kept here:
# - the device key comes from the keystore by kid; an unknown kid is `kid` and gets no answer;
# - a hello is answered with a welcome (new host nonce, highest common version) that is repeated
#   until a verified session frame from the device confirms the keys; a repeated hello of the
#   current session is not a new session;
# - the hello chooses the session's alg among the host's; later frames must keep it;
# - a session frame with no session is answered, at most once per rto/4, by nack(no_session)
#   under the device key, so that a device talking to a restarted host says hello again; so is
#   the end of a session the host gives up on.

from . import cose, messages
from .crypto import session_keys
from .errors import ProtocolError, number
from .frame import encode as frame_encode

IDLE, HANDSHAKE = "idle", "handshake"


def key_for(link, kid):
    key = link.keystore(kid)
    if key is None or len(key) != 32:
        raise ProtocolError("kid", "unknown device %s, or its key is not 32 bytes" % kid.hex())
    return key


def check_alg(link, m):
    ok = (m.alg in link.algs) if m.counter == 0 else (m.alg == link.session_alg)
    if not ok:
        raise ProtocolError("alg", "alg %d not accepted" % m.alg)


def no_session(link, m, now):
    if m.alg not in link.algs or now - link._last_poke < link.rto // 4:
        return
    key = link.keystore(m.kid)
    if key is None or len(key) != 32:
        return
    link._last_poke = now
    _nack(link, "no_session", key, m.kid, m.alg)


def poke(link, kid, now):
    # a host that has just opened the port cannot know whether the device still holds a
    # session with a previous host (which would be silent until its next frame): the same
    # nack(no_session) that answers such a frame asks it to say hello now
    key = link.keystore(kid)
    if key is None or len(key) != 32:
        raise ValueError("no 32-byte key for device %s in the keystore" % bytes(kid).hex())
    if link.state != IDLE:
        return
    _nack(link, "no_session", key, kid, link.alg)


def give_up(link, now):
    # the session ends here: tell the device now rather than at its next frame
    _nack(link, "no_session", link.device_key, link.kid, link.session_alg)


def _nack(link, code, key, kid, alg):
    # a nack in the handshake epoch, for a kid and alg that need not be the session's
    payload = messages.encode({"type": "nack", "code": number(code)})
    link._write(frame_encode(cose.mac0(key, alg, kid, 0, payload, link.aad)))


def on_handshake(link, m, key, msg, now, events):
    if msg["type"] != "hello":  # a nack in the handshake epoch is the host's own word, echoed
        raise ProtocolError("unknown_type", "%s is not sent to the host before a session" % (
            msg["type"],))
    try:
        version = messages.common_version(link.versions, msg["versions"])
    except ProtocolError:
        _nack(link, "version", key, m.kid, m.alg)
        raise
    if m.kid == link.kid and msg["nonce"] == link.nonce:
        link._count("duplicate")  # a repeated hello of the current session
        if link.state == HANDSHAKE and link._hs is not None:
            link._write(link._hs[0])
        return
    if link.state != IDLE:
        link._close("new_hello", events)
    link.kid, link.device_key, link.session_alg, link.version = m.kid, key, m.alg, version
    link.nonce = msg["nonce"]
    link.host_nonce = link.entropy(16)
    link.rx_key, link.tx_key = session_keys(key, link.host_nonce, link.nonce)
    link.peer = {
        "version": version, "kid": m.kid, "firmware": msg["firmware"], "board": msg["board"],
        "reset_cause": msg.get("reset_cause", ""),
    }
    welcome = {
        "type": "welcome", "version": version, "host_nonce": link.host_nonce,
        "device_nonce": link.nonce,
    }
    wire = link._frame(welcome, 0, key)
    link._write(wire)
    link._hs = [wire, now + link.rto, 1]
    link.state = HANDSHAKE


DIRECTION = messages.D2H  # what a host receives
