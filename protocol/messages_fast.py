# The host's fast path for messages.encode()/decode(): the message table compiled once into one
# closure per spec, and cbor2's C codec. Chosen in codecs.py; never loaded by the firmware.
#
# Rules kept here:
# - it accepts a subset of what the table interpreter in messages.py accepts (exact built-in
#   types, lists not tuples); for anything else it steps aside and the interpreter decides, so
#   results and error codes are the interpreter's;
# - decode() trusts cbor2's result only if the schema accepts it, every map's keys are in
#   deterministic order, and cbor2 re-encodes it to the input byte for byte: with the schema
#   admitting only profile types, that is exactly the profile's deterministic encoding.

import cbor2

from . import messages

_dumps = cbor2.dumps
_loads = cbor2.loads


class _Reject(Exception):
    pass


def _text_order(k):
    # bytewise order of text keys' encodings = (length of UTF-8, UTF-8 bytes)
    b = k.encode()
    return len(b), b


def _compile(spec, to_wire):
    kind = spec[0]
    if kind == "u":
        hi = spec[1]

        def f(v):
            if type(v) is not int or v < 0 or v > hi:
                raise _Reject
            return v
    elif kind == "i":
        def f(v):
            if type(v) is not int or not -(1 << 63) <= v < (1 << 63):
                raise _Reject
            return v
    elif kind == "b":
        lo, hi = spec[1], spec[2]

        def f(v):
            if type(v) is not bytes or not lo <= len(v) <= hi:
                raise _Reject
            return v
    elif kind == "t":
        hi = spec[1]

        def f(v):
            if type(v) is not str or len(v.encode()) > hi:
                raise _Reject
            return v
    elif kind == "?":
        def f(v):
            if v is not True and v is not False:
                raise _Reject
            return v
    elif kind == "l":
        item, hi = _compile(spec[1], to_wire), spec[2]

        def f(v):
            if type(v) is not list or len(v) > hi:
                raise _Reject
            return [item(x) for x in v]
    elif kind == "a":
        items = tuple(_compile(s, to_wire) for s in spec[1])
        n = len(items)

        def f(v):
            if type(v) is not list or len(v) != n:
                raise _Reject
            return [g(x) for g, x in zip(items, v, strict=True)]
    elif kind == "s":
        f = _struct(spec[1], to_wire, 0)
    elif kind == "m":
        f = _map(spec, to_wire)
    else:  # "c"
        alts = tuple(_compile(s, to_wire) for s in spec[1])

        def f(v):
            for g in alts:
                try:
                    return g(v)
                except _Reject:
                    pass
            raise _Reject
    return f


def _uint_order(k):
    return k  # shortest-form uint encodings order like their values


def _map(spec, to_wire):
    # v1 open maps have text keys or uint keys; both orders are cheap to state exactly
    key, val, hi = _compile(spec[1], to_wire), _compile(spec[2], to_wire), spec[3]
    order = {"t": _text_order, "u": _uint_order}[spec[1][0]]
    if to_wire:
        def f(v):
            if type(v) is not dict or len(v) > hi:
                raise _Reject
            out = {key(k): val(x) for k, x in v.items()}
            return {k: out[k] for k in sorted(out, key=order)}
        return f
    scalar = spec[2][0] in "uibt?"  # values convert to themselves: check, don't copy

    def f(v):
        if type(v) is not dict or len(v) > hi:
            raise _Reject
        prev = None
        for k, x in v.items():
            key(k)
            o = order(k)
            if prev is not None and o <= prev:
                raise _Reject  # not in deterministic order
            prev = o
            if scalar:
                val(x)
        return v if scalar else {k: val(x) for k, x in v.items()}

    return f


def _struct(fields, to_wire, skip):
    compiled = tuple((k, n, _compile(s, to_wire), r) for k, n, s, r in fields)
    if to_wire:
        def f(v):
            if type(v) is not dict:
                raise _Reject
            out = {}
            for key, name, g, required in compiled:
                if name in v:
                    out[key] = g(v[name])
                elif required:
                    raise _Reject
            if len(out) + skip != len(v):
                raise _Reject
            return out
    else:
        def f(v):
            if type(v) is not dict:
                raise _Reject
            prev = -1
            for k in v:  # wire order must be ascending (deterministic encoding)
                if type(k) is not int or k <= prev:
                    raise _Reject
                prev = k
            out = {}
            for key, name, g, required in compiled:
                if key in v:
                    out[name] = g(v[key])
                elif required:
                    raise _Reject
            if len(out) + skip != len(v):
                raise _Reject
            return out
    return f


_TO_WIRE = {}
_FROM_WIRE = {}
for _name, _num in messages.NUMBER.items():
    _TO_WIRE[_name] = (_num, _struct(messages.fields(_num), True, 1))
    _FROM_WIRE[_num] = (_name, _struct(messages.fields(_num), False, 1))


def encode(msg):
    try:
        num, conv = _TO_WIRE[msg["type"]]
        w = {0: num}
        w.update(conv(msg))
        return _dumps(w)
    except Exception:  # anything unusual: the table interpreter raises ValueError, or agrees
        return messages.encode(msg)  # the interpreter: raises ValueError, or agrees


def decode(payload):
    try:
        w = _loads(payload)
        num = w[0]
        if type(num) is not int:  # True == 1 and 1.0 == 1 as dict keys: not a type number
            raise _Reject
        name, conv = _FROM_WIRE[num]
        msg = conv(w)
        if _dumps(w) == payload:
            msg["type"] = name
            return msg
    except Exception:  # anything unusual: the table interpreter names the exact error
        pass
    return messages.decode(payload)
