# The host's side of the handshake (SPEC.md, "Handshake"): loaded only by a host Link.
#
# Rules kept here:
# - the device key comes from the keystore by kid; an unknown kid is `kid` and gets no answer;
# - a hello is answered with a welcome (new host nonce, highest common version) that is repeated
#   until a verified session frame from the device confirms the keys; a repeated hello of the
#   current session is not a new session;
# - a hello never ends a session or handshake by itself (SPEC §7.3, §14.2): while one is under
#   way, a new hello is answered but kept waiting beside it, and replaces it only when a session
#   frame from the device verifies under the waiting hello's keys, which only the device that
#   sent it can make. A replayed hello therefore costs a welcome, never the session; a device that
#   really restarted is back after one round trip, as before. At most CANDS_MAX hellos wait (the
#   oldest makes way), each for at most 4 * hello_max ms; one that makes way or runs out without
#   confirmation is counted as `hello_replay`;
# - a hello whose nonce opened a session that has ended (the last USED_MAX such nonces) is a
#   replay: rejected with `replay`, counted as `hello_replay`, never answered;
# - the hello chooses the session's alg among the host's; later frames must keep it;
# - a session frame with no session is answered, at most once per rto/4, by nack(no_session)
#   under the device key, so that a device talking to a restarted host says hello again; so is
#   the end of a session the host gives up on.

from . import codecs, messages
from .crypto import session_keys
from .errors import ProtocolError, number
from .frame import encode as frame_encode

IDLE, HANDSHAKE, OPEN = "idle", "handshake", "open"
CANDS_MAX = 4  # hellos waiting to replace a session at once
USED_MAX = 64  # nonces of ended sessions remembered (16 bytes each, host only)


class Waiting:
    """A verified hello answered while a session or handshake was under way."""

    __slots__ = ("alg", "expires", "host_nonce", "key", "kid", "nonce", "peer", "rx_key",
                 "sent", "tx_key", "version", "welcome")


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
    _used(link, link.kid, link.nonce)
    _nack(link, "no_session", link.device_key, link.kid, link.session_alg)


def _nack(link, code, key, kid, alg):
    # a nack in the handshake epoch, for a kid and alg that need not be the session's
    payload = codecs.encode({"type": "nack", "code": number(code)})
    link._write(frame_encode(codecs.mac0(key, alg, kid, 0, payload, link.aad)))


def _used(link, kid, nonce):
    # the nonce of a session that opened and has ended: its hello can only come back as a replay
    if nonce is None:
        return
    used = link._used_nonces
    used[(bytes(kid), bytes(nonce))] = True
    while len(used) > USED_MAX:
        del used[next(iter(used))]


def on_handshake(link, m, key, msg, now, events):
    if msg["type"] != "hello":  # a nack in the handshake epoch is the host's own word, echoed
        raise ProtocolError("unknown_type", "%s is not sent to the host before a session" % (
            msg["type"],))
    try:
        version = messages.common_version(link.versions, msg["versions"])
    except ProtocolError:
        _nack(link, "version", key, m.kid, m.alg)
        raise
    nonce = msg["nonce"]
    if m.kid == link.kid and nonce == link.nonce:
        link._count("duplicate")  # a repeated hello of the current session
        if link.state == HANDSHAKE and link._hs is not None:
            link._write(link._hs[0])
        return
    _expire(link, now)
    for w in link._cands:
        if w.kid == m.kid and w.nonce == nonce:  # the device repeats a hello that waits
            link._count("duplicate")
            if now - w.sent >= link.rto // 4:
                w.sent = now
                link._write(w.welcome)
            return
    if (bytes(m.kid), bytes(nonce)) in link._used_nonces:
        link._count("hello_replay")
        raise ProtocolError("replay", "hello of a session that has ended")
    host_nonce = link.entropy(16)
    rx_key, tx_key = session_keys(key, host_nonce, nonce)
    peer = {
        "version": version, "kid": m.kid, "firmware": msg["firmware"], "board": msg["board"],
        "reset_cause": msg.get("reset_cause", ""),
    }
    welcome = {
        "type": "welcome", "version": version, "host_nonce": host_nonce, "device_nonce": nonce,
    }
    # under the hello's kid and alg: not link._frame's, which are the running session's
    payload = codecs.encode(welcome)
    wire = frame_encode(codecs.mac0(key, m.alg, m.kid, 0, payload, link.aad))
    link._write(wire)
    if link.state != IDLE:
        # a session or handshake is under way: it stays until the device proves it holds the
        # keys of this hello (confirm()); a replayed hello never gets that far
        w = Waiting()
        w.kid, w.key, w.alg, w.version, w.nonce = m.kid, key, m.alg, version, nonce
        w.host_nonce, w.rx_key, w.tx_key, w.peer = host_nonce, rx_key, tx_key, peer
        w.welcome, w.sent, w.expires = wire, now, now + 4 * link.hello_max
        link._cands.append(w)
        if len(link._cands) > CANDS_MAX:
            link._cands.pop(0)
            link._count("hello_replay")  # the oldest never confirmed: a replay, most likely
        return
    _install(link, m.kid, key, m.alg, version, nonce, host_nonce, rx_key, tx_key, peer)
    link._hs = [wire, now + link.rto, 1]


def confirm(link, m, now, events):
    """A session frame (counter >= 1) while hellos wait: if it verifies under the keys of one,
    the device has them, and that hello's session replaces the current one (which ends with
    `new_hello`). Called by Link before it judges the frame; the frame is then judged as the
    first frame of the new handshake, which opens it."""
    _expire(link, now)
    for w in link._cands:
        if w.kid != m.kid or w.alg != m.alg:
            continue
        try:
            m.verify(w.rx_key, link.aad)
        except ProtocolError:
            continue
        link._cands.remove(w)
        if link.state == OPEN:
            _used(link, link.kid, link.nonce)
        link._hs = None
        link._close("new_hello", events)
        _install(link, w.kid, w.key, w.alg, w.version, w.nonce, w.host_nonce, w.rx_key,
                 w.tx_key, w.peer)
        return


def _install(link, kid, key, alg, version, nonce, host_nonce, rx_key, tx_key, peer):
    # the hello's handshake becomes the link's: it opens with the first verified session frame
    link.kid, link.device_key, link.session_alg, link.version = kid, key, alg, version
    link.nonce, link.host_nonce = nonce, host_nonce
    link.rx_key, link.tx_key = rx_key, tx_key
    link.peer = peer
    link.state = HANDSHAKE


def _expire(link, now):
    cands = link._cands
    if cands and any(now >= w.expires for w in cands):
        # a hello that waited beside a session and was never confirmed: a replay (or a device
        # that went away again); a real device that repeats it later gets a new welcome
        for w in [w for w in cands if now >= w.expires]:
            cands.remove(w)
            link._count("hello_replay")


DIRECTION = messages.D2H  # what a host receives
