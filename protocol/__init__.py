# hexiao link protocol: sans-I/O, shared verbatim by the host (CPython) and the firmware
# (MicroPython). Nothing here does I/O, sleeps, reads clocks or draws random numbers: bytes, time
# and entropy come in as arguments; bytes and events go out. See SPEC.md.
