# The codec a side of the link uses: the one place that chooses between the protocol's general
# code (cose.py, messages.py: all of it runs on the device) and the host's fast paths
# (cose_fast.py, messages_fast.py: cbor2's C codec, one join per frame, compiled schema checks).
#
# Rules kept here:
# - both choices give the same bytes, results and error codes (the fast paths step aside to the
#   general code for anything unusual; test_cose and test_messages compare them);
# - the general modules never import the fast ones: they are whole on their own, and the device
#   loads nothing of the host's;
# - code that sends or receives frames (link_host.py, check.py, host tools) takes
#   mac0/parse/encode/decode from here; cose and messages keep the constants and the tables.
#   link.py does too on the host; on the device it imports the general functions directly, the
#   same choice without this module in the device's heap (192 B measured at boot).

import sys

if sys.implementation.name != "micropython":
    from .cose_fast import mac0, parse
    from .messages_fast import decode, encode
else:
    from .cose import mac0, parse
    from .messages import decode, encode

__all__ = ["decode", "encode", "mac0", "parse"]
