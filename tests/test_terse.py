"""The terse device build (tools/terse.py): exception texts out, everything else kept."""

from __future__ import annotations

import ast

from hexiao.tools import micropython
from hexiao.tools.terse import terse

SRC = '''
def f(x, log):
    if x < 0:
        raise ProtocolError("cbor", "negative %d" % x)
    if x > 9:
        raise ValueError(f"{x} is over 9")
    if x == 5:
        raise ValueError("five")
    err = ProtocolError("crc", "CRC-32 mismatch")
    log("closed: %s" % "peer not acknowledging")
    return ProtocolError("mac", detail), KeyError("kept text"), err
'''


def test_only_exception_texts_are_left_out() -> None:
    out, n = terse(SRC)
    assert n == 4
    assert "negative" not in out and "is over 9" not in out and "five" not in out
    assert "CRC-32" not in out
    for kept in ('"cbor"', '"crc"', '"mac"', "detail", "kept text", "closed: %s",
                 "peer not acknowledging"):
        assert kept.replace('"', "'") in out or kept in out, kept
    assert ast.dump(ast.parse(terse(out)[0])) == ast.dump(ast.parse(out))  # idempotent
    assert terse(out)[1] == 0


def test_the_device_modules_build_terse_and_still_raise_their_codes(tmp_path) -> None:
    # every device module goes through the transform and mpy-cross; the staged cbor decoder
    # still names the error code, only without the sentence
    staged = micropython.stage(tmp_path / "st")
    script = tmp_path / "st" / "t.py"
    script.write_text(
        "from hexiao.protocol import cbor\n"
        "from hexiao.protocol.errors import ProtocolError\n"
        "try:\n    cbor.loads(b'\\x1c')\nexcept ProtocolError as e:\n"
        "    print(e.code, repr(e.detail))\n")
    import subprocess

    argv, env = micropython.command(script, staged)
    r = subprocess.run(argv, env=env, cwd=staged, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "cbor ''", r.stderr


HOST_ONLY = '''
import sys
_HOST = sys.implementation.name != "micropython"
_cache = {} if _HOST else None
if sys.implementation.name != "micropython":
    def host_table():
        return {"big": "table"}
else:
    DEVICE = 1
if sys.implementation.name == "micropython":
    ON_DEVICE = True
class Mac:
    __slots__ = ("alg", "kid")
    def f(self):
        if _HOST:
            return "host"
        return "device"
'''


def test_host_only_code_and_slots_are_left_out_of_device_builds() -> None:
    out, _ = terse(HOST_ONLY)
    ns: dict = {}
    exec(compile(out, "<device>", "exec"), ns)  # what the device runs, run here
    assert "host_table" not in out and "__slots__" not in out and '"host"' not in out
    assert ns["_cache"] is None and ns["DEVICE"] == 1 and ns["ON_DEVICE"] is True
    assert ns["Mac"]().f() == "device" and not hasattr(ns["Mac"], "__slots__")
    # the host's own run of the same source keeps all of it
    host: dict = {}
    exec(compile(HOST_ONLY, "<host>", "exec"), host)
    assert host["_cache"] == {} and host["host_table"]() and host["Mac"]().f() == "host"
    # a flag bound twice is not a constant; only the literal test is evaluated
    twice = HOST_ONLY + "_HOST = True\n"
    assert "if _HOST:" in terse(twice)[0]
