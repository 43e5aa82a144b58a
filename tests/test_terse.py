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
