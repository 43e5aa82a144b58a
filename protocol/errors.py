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
)  # split when used: a list of 18 strings would live in the device's heap for good


# link counters (health "link"): the error codes under their numbers, and these from 64
_EVENTS = "rx_frames tx_frames retransmits duplicate sessions expired stray_acks host_lost"


def number(name):
    return _NAMES.split().index(name) + 1


def name(num):
    names = _NAMES.split()
    return names[num - 1] if 0 < num <= len(names) else "unknown"


def counter_number(counter):
    """The number of a link counter name (health messages key link counters by number)."""
    events = _EVENTS.split()
    if counter in events:
        return 64 + events.index(counter)
    return number(counter)


if sys.implementation.name != "micropython":  # for host code and tests

    def counter_name(num):
        """The name of a link counter number (the device sends numbers only)."""
        events = _EVENTS.split()
        if 64 <= num < 64 + len(events):
            return events[num - 64]
        return name(num)

    CODES = tuple((n, i + 1) for i, n in enumerate(_NAMES.split()))
    NUMBER = dict(CODES)
    NAME = {v: k for k, v in CODES}


class ProtocolError(Exception):
    """A frame or message was rejected; `code` is one of the error names."""

    def __init__(self, code, detail=""):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail
