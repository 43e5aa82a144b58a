# CBOR for the link: cbor2 (C) on CPython, the shared pure codec on the device.
#
# Rules kept here:
# - dumps() is given maps already in deterministic key order (messages.to_wire builds them so),
#   so cbor2's plain encoder emits exactly the bytes of cbor.dumps; the tests check this;
# - loads() accepts exactly what cbor.loads accepts: cbor2's result is used only when it is in the
#   profile and re-encodes to the input byte for byte; otherwise the pure decoder decides, and its
#   error code is the one reported.

import sys

from . import cbor

pure_dumps = cbor.dumps

if sys.implementation.name != "micropython":  # the C codec (never loaded by the firmware)
    from .codec_fast import dumps, loads
else:
    dumps = cbor.dumps
    loads = cbor.loads
