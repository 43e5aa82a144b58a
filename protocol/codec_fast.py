# The host's CBOR fast path (messages.py encodes and decodes with it on CPython): cbor2's C
# codec, checked against the profile.
#
# Rules kept here:
# - dumps() is given maps already in deterministic key order, so cbor2's plain encoder emits the
#   bytes of cbor.dumps;
# - loads() returns cbor2's result only when it is in the profile and re-encodes to the input byte
#   for byte; otherwise the pure decoder decides, and its error code is the one reported.

import cbor2

from . import cbor

_fast_dumps = cbor2.dumps
_fast_loads = cbor2.loads


def dumps(obj):
    return _fast_dumps(obj)


def _in_profile(obj, depth):
    t = type(obj)
    if t is int:
        return -(1 << 64) <= obj < (1 << 64)
    if t is bytes or t is str or obj is None or t is bool:
        return True
    if depth >= cbor.MAX_DEPTH:
        return False
    if t is list:
        return all(_in_profile(x, depth + 1) for x in obj)
    if t is dict:
        prev = None
        for k, v in obj.items():
            tk = type(k)
            if tk is int and 0 <= k < 24:
                kb = k  # one-byte keys order like their values
                if prev is not None and (type(prev) is not int or kb <= prev):
                    return False
            elif (tk is int and -(1 << 64) <= k < (1 << 64)) or tk is str:
                kb = _fast_dumps(k)
                if type(prev) is int:
                    prev = bytes((prev,))
                if prev is not None and kb <= prev:
                    return False
            else:
                return False
            prev = kb
            if not _in_profile(v, depth + 1):
                return False
        return True
    return False


def loads(data):
    try:
        obj = _fast_loads(data)
    except Exception:
        return cbor.loads(data)
    if _in_profile(obj, 0) and _fast_dumps(obj) == data:
        return obj
    return cbor.loads(data)
