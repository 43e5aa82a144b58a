# Error codes of the hexiao link protocol (SPEC.md, "Error codes").
#
# Rules kept here:
# - every rejection has exactly one code, with a stable name (used in vectors, logs and counters)
#   and a stable number, its position in _NAMES counting from 1 (used on the wire in nacks);
# - numbers are never reused; new codes are appended.
# One string instead of tables: on the device every object costs heap.

import sys

_NAMES = (
    "crc cobs oversize truncated cbor non_canonical cose alg header kid mac replay no_session"
    " version unknown_type schema handshake rejected"
).split()


def number(name):
    return _NAMES.index(name) + 1


def name(num):
    return _NAMES[num - 1] if 0 < num <= len(_NAMES) else "unknown"


if sys.implementation.name != "micropython":  # lookup tables for host code and tests
    CODES = tuple((n, i + 1) for i, n in enumerate(_NAMES))
    NUMBER = dict(CODES)
    NAME = {v: k for k, v in CODES}


class ProtocolError(Exception):
    """A frame or message was rejected; `code` is one of the error names."""

    def __init__(self, code, detail=""):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail
