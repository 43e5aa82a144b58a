# The COSE_Mac0 profile (RFC 9052 §6.2) of the hexiao link (SPEC.md, "COSE profile").
#
# Rules kept here:
# - cose = tag 17 [protected: bstr .cbor {1: alg, 4: kid, 6: partial IV}, unprotected: {},
#   payload: bstr, tag: bstr], all in deterministic encoding, nothing else;
# - alg 5 (HMAC 256/256, 32-byte tag) or 4 (HMAC 256/64, the first 8 bytes);
# - kid: 1..16 bytes; partial IV: the frame counter, big-endian, shortest form (0 is one zero byte),
#   at most 4 bytes;
# - the MAC is HMAC-SHA256(key, MAC_structure ["MAC0", protected, external_aad, payload]);
# - parse() only reads structure; nothing in the payload is looked at before verify() succeeds.
# This is the general code, and all of it the device loads. The host's fast paths are in
# cose_fast.py, which asks parse() here about anything it does not recognise; codecs.py is the one
# place that chooses between the two (this module never imports cose_fast).

import sys

from . import cbor
from .crypto import ct_equal, hmac_sha256_parts
from .errors import ProtocolError

TAG_MAC0 = 17
ALG_HMAC256 = 5
ALG_HMAC64 = 4
TAG_LEN = {ALG_HMAC256: 32, ALG_HMAC64: 8}
MAX_COUNTER = 0xFFFFFFFF
MAX_KID = 16
# the most a COSE_Mac0 adds to its payload: kid 16, counter 4 bytes, payload >= 256 bytes, tag 32
MAX_OVERHEAD = 69
MAX_PAYLOAD = 1024 - 4 - MAX_OVERHEAD  # frame.MAX_FRAME less the CRC: 951 bytes

_MAC0_PREFIX = b"\x84\x64MAC0"  # array of 4, then the text "MAC0"
_bhead = cbor.head


def piv_bytes(counter):
    if counter < 0 or counter > MAX_COUNTER:
        raise ValueError("counter out of range")
    n = 1
    while counter >> (8 * n):
        n += 1
    return counter.to_bytes(n, "big")


def protected_header(alg, kid, counter):
    piv = piv_bytes(counter)
    return (
        b"\xa3\x01" + bytes((alg,)) + b"\x04" + _bhead(2, len(kid)) + kid
        + b"\x06" + _bhead(2, len(piv)) + piv
    )


def _mac(key, protected, payload, aad):
    # HMAC of the MAC_structure ["MAC0", protected, external_aad, payload], fed in pieces (none
    # copied); mac_structure() builds the same bytes in one piece, for the host's tools
    return hmac_sha256_parts(key, (
        _MAC0_PREFIX, _bhead(2, len(protected)), protected, _bhead(2, len(aad)), aad,
        _bhead(2, len(payload)), payload,
    ))


def mac0(key, alg, kid, counter, payload, aad=b""):
    """Build a tagged COSE_Mac0 over `payload` (already CBOR-encoded bytes)."""
    if alg not in TAG_LEN:
        raise ValueError("unsupported alg")
    if not 1 <= len(kid) <= MAX_KID:
        raise ValueError("kid must be 1..16 bytes")
    prot = protected_header(alg, kid, counter)
    tag = _mac(key, prot, payload, aad)[: TAG_LEN[alg]]
    return b"".join((  # one allocation for the whole frame
        b"\xd1\x84", _bhead(2, len(prot)), prot, b"\xa0",
        _bhead(2, len(payload)), payload, _bhead(2, len(tag)), tag,
    ))


class Mac0:
    __slots__ = ("alg", "counter", "kid", "payload", "protected", "tag")

    def __init__(self, alg, kid, counter, protected, payload, tag):
        self.alg = alg
        self.kid = kid
        self.counter = counter
        self.protected = protected
        self.payload = payload
        self.tag = tag

    def verify(self, key, aad=b""):
        want = _mac(key, self.protected, self.payload, aad)
        if not ct_equal(want[: TAG_LEN[self.alg]], self.tag):
            raise ProtocolError("mac", "MAC verification failed")


def _piv_ok(piv):
    return 1 <= len(piv) <= 4 and (len(piv) == 1 or piv[0] != 0)


def parse(cose):
    """Structure of a frame's COSE bytes, or ProtocolError; does not verify the MAC."""
    if len(cose) < 2:
        raise ProtocolError("truncated", "COSE shorter than its tag")
    if cose[0] != 0xD1:
        if cose[0] == 0xD8 and cose[1] == TAG_MAC0:
            raise ProtocolError("non_canonical", "tag 17 not in its shortest form")
        raise ProtocolError("cose", "not a tagged COSE_Mac0 (tag 17)")
    arr = cbor.loads(memoryview(cose)[1:])  # no copy of a frame that may be 1 KB
    if not isinstance(arr, list) or len(arr) != 4:
        raise ProtocolError("cose", "COSE_Mac0 must be an array of 4")
    prot, unprot, payload, tag = arr
    if not (isinstance(prot, bytes) and isinstance(unprot, dict)):
        raise ProtocolError("cose", "protected must be bstr, unprotected a map")
    if not (isinstance(payload, bytes) and isinstance(tag, bytes)):
        raise ProtocolError("cose", "payload and tag must be bstr (detached payloads not allowed)")
    if unprot:
        raise ProtocolError("header", "unprotected header must be empty")
    if not prot:  # valid COSE ("no protected parameters"), but the profile needs alg/kid/PIV
        raise ProtocolError("header", "empty protected header")
    hdr = cbor.loads(prot)
    if not isinstance(hdr, dict):
        raise ProtocolError("header", "protected header must be a map")
    if len(hdr) != 3 or 1 not in hdr or 4 not in hdr or 6 not in hdr:
        raise ProtocolError("header", "protected header must hold exactly alg, kid, partial IV")
    alg, kid, piv = hdr[1], hdr[4], hdr[6]
    if not isinstance(alg, int) or alg is True or alg is False or alg not in TAG_LEN:
        raise ProtocolError("alg", "unsupported alg %r" % (alg,))
    if not isinstance(kid, bytes) or not 1 <= len(kid) <= MAX_KID:
        raise ProtocolError("header", "kid must be a bstr of 1..16 bytes")
    if not isinstance(piv, bytes) or not _piv_ok(piv):
        raise ProtocolError("header", "partial IV must be a shortest-form bstr of 1..4 bytes")
    if len(tag) != TAG_LEN[alg]:
        raise ProtocolError("cose", "tag length does not match alg")
    return Mac0(alg, kid, int.from_bytes(piv, "big"), prot, payload, tag)


if sys.implementation.name != "micropython":  # host tools and tests; not in device builds

    def mac_structure(protected, payload, aad=b""):
        """The MAC_structure that _mac() feeds to HMAC in pieces, as one CBOR item."""
        return b"".join((_MAC0_PREFIX, _bhead(2, len(protected)), protected,
                         _bhead(2, len(aad)), aad, _bhead(2, len(payload)), payload))
