# The host's fast paths for cose.py: building and MACing a frame with one join each, and reading
# the common, well-formed frame with a few slices. Chosen in codecs.py; never loaded by a device.
#
# Rules kept here:
# - mac0() produces exactly the bytes of cose.mac0();
# - parse_fast() accepts only what cose.parse() accepts, and returns None for anything else;
#   parse() then asks cose.parse(), which names the error; the tests check the two agree.

import hmac

from . import cose as _cose
from .cbor import head
from .cose import _MAC0_PREFIX, MAX_COUNTER, MAX_KID, TAG_LEN, Mac0, _piv_ok

_digest = hmac.digest
_HEADS = tuple(bytes((0x40 | n,)) for n in range(24))  # bstr heads of lengths 0..23
_ALGS = {alg: bytes((alg,)) for alg in TAG_LEN}
_prefix = {}  # (alg, kid) -> protected header up to the partial IV


def _bs(b):
    n = len(b)
    if n < 24:
        return _HEADS[n] + b
    if n < 256:
        return b"\x58" + bytes((n,)) + b
    return head(2, n) + b


def mac0(key, alg, kid, counter, payload, aad=b""):
    """Build a tagged COSE_Mac0 over `payload` (already CBOR-encoded bytes)."""
    a = _ALGS.get(alg)
    if a is None:
        raise ValueError("unsupported alg")
    if not 1 <= len(kid) <= MAX_KID:
        raise ValueError("kid must be 1..16 bytes")
    if not 0 <= counter <= MAX_COUNTER:
        raise ValueError("counter out of range")
    kid = bytes(kid)
    start = _prefix.get((alg, kid))
    if start is None:
        start = _prefix[(alg, kid)] = b"".join((b"\xa3\x01", a, b"\x04", _bs(kid), b"\x06"))
        if len(_prefix) > 64:  # a host has few devices; keep the cache small anyway
            _prefix.clear()
    piv = counter.to_bytes((counter.bit_length() + 7) >> 3 or 1, "big")
    prot = start + _HEADS[len(piv)] + piv
    bprot, bpay = _bs(prot), _bs(payload)
    tag = _digest(key, b"".join((_MAC0_PREFIX, bprot, _bs(aad), bpay)), "sha256")[: TAG_LEN[alg]]
    return b"".join((b"\xd1\x84", bprot, b"\xa0", bpay, _bs(tag)))


def parse(cose):
    """Structure of a frame's COSE bytes, or ProtocolError; does not verify the MAC."""
    m = parse_fast(cose)
    return _cose.parse(cose) if m is None else m


def parse_fast(cose):
    try:
        return _parse(cose)
    except IndexError:
        return None


def _bstr_at(data, pos):
    # fast path helper: a shortest-form bstr head (< 65536 bytes) at pos; None if anything else
    ib = data[pos]
    if 0x40 <= ib < 0x58:
        n, pos = ib - 0x40, pos + 1
    elif ib == 0x58 and data[pos + 1] >= 24:
        n, pos = data[pos + 1], pos + 2
    elif ib == 0x59 and data[pos + 1]:
        n, pos = (data[pos + 1] << 8) | data[pos + 2], pos + 3
    else:
        return None, pos
    out = data[pos : pos + n]
    return (out if len(out) == n else None), pos + n


def _parse(cose):
    if cose[0] != 0xD1 or cose[1] != 0x84:
        return None
    prot, pos = _bstr_at(cose, 2)
    if prot is None or cose[pos] != 0xA0:
        return None
    payload, pos = _bstr_at(cose, pos + 1)
    if payload is None:
        return None
    tag, pos = _bstr_at(cose, pos)
    if tag is None or pos != len(cose):
        return None
    # protected: a3 01 <alg> 04 <kid bstr> 06 <piv bstr>
    if prot[0] != 0xA3 or prot[1] != 0x01 or prot[3] != 0x04:
        return None
    alg = prot[2]
    kid, p = _bstr_at(prot, 4)
    if alg not in TAG_LEN or kid is None or not 1 <= len(kid) <= MAX_KID or prot[p] != 0x06:
        return None
    piv, p = _bstr_at(prot, p + 1)
    if piv is None or p != len(prot) or not _piv_ok(piv) or len(tag) != TAG_LEN[alg]:
        return None
    return Mac0(alg, kid, int.from_bytes(piv, "big"), prot, payload, tag)
