# The host's fast path for cose.parse(): the common, well-formed frame read with a few slices.
#
# Rules kept here:
# - it accepts only what the general parser accepts, and returns None for anything else (the
#   general parser then names the error); the tests check the two agree.

from .cose import MAX_KID, TAG_LEN, Mac0, _piv_ok


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
