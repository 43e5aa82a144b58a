# Error codes of the hexiao link protocol (SPEC.md, "Error codes").
#
# Rules kept here:
# - every rejection has exactly one code, with a stable name (used in vectors, logs and counters)
#   and a stable number (used on the wire in nack messages);
# - numbers are never reused; new codes are appended.

CODES = (
    # name, number
    ("crc", 1),  # CRC-32 mismatch: line noise
    ("cobs", 2),  # COBS decoding failed: line noise
    ("oversize", 3),  # frame longer than MAX_FRAME before its delimiter
    ("truncated", 4),  # frame or CBOR item ends early
    ("cbor", 5),  # not well-formed CBOR, or CBOR outside the profile (floats, tags, ...)
    ("non_canonical", 6),  # well-formed but not the deterministic encoding
    ("cose", 7),  # not a tagged COSE_Mac0 of the profile's shape
    ("alg", 8),  # MAC algorithm not the session's
    ("header", 9),  # protected header missing/extra/wrongly typed parameters
    ("kid", 10),  # unknown or unexpected device id (unpaired device)
    ("mac", 11),  # MAC verification failed: forgery or wrong key
    ("replay", 12),  # counter already seen or older than the window
    ("no_session", 13),  # session frame with no session, or session message in the handshake epoch
    ("version", 14),  # no common protocol version
    ("unknown_type", 15),  # message type not defined in this version
    ("schema", 16),  # message fields missing, unknown or of the wrong type
    ("handshake", 17),  # handshake out of order or with a stale nonce
    ("rejected", 18),  # verified and well-formed, but refused by the application
)

NUMBER = {}
NAME = {}
for _name, _num in CODES:
    NUMBER[_name] = _num
    NAME[_num] = _name


class ProtocolError(Exception):
    """A frame or message was rejected; `code` is one of CODES' names."""

    def __init__(self, code, detail=""):
        super().__init__(code, detail)
        self.code = code
        self.detail = detail
