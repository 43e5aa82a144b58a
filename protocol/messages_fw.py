# The firmware-update messages (SPEC 6.8), the continuation of messages._TABLE in the same
# format: a module of their own so that the device loads their text (~0.5 KB of its 64 KB
# heap) only when an update's first message arrives (messages._head); it resets after one.

TABLE = """
19 fw_offer h2d session reliable
 1! digest bstr32
 2! size u32
 3! manifest_size u16
 4! signature bstr64
 5! board tstr16
 6! version tstr16
 7! counter u32
20 fw_chunk h2d session reliable
 1! seq u32
 2! offset u32
 3! data bstr1..768
21 fw_query h2d session reliable
22 fw_status d2h session reliable
 1! state 0..7
 2! offset u32
 3 digest bstr32
 4 version tstr16
 5 why tstr64
23 fw_commit h2d session reliable
 1! digest bstr32
24 fw_result d2h session reliable
 1! ok bool
 2! why tstr64
"""
