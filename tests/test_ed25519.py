"""The device's Ed25519 verifier (firmware/ed25519.py): RFC 8032's test vectors and
`cryptography`'s signatures on random messages, on CPython and under the real MicroPython."""

from __future__ import annotations

import hashlib
import json
import os
import random

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hexiao.firmware import ed25519 as E

# RFC 8032 section 7.1, TEST 1, 2, 3: (secret, public, message, signature)
RFC = [
    ("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
     "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a", "",
     "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701c"
     "f9b46bd25bf5f0595bbe24655141438e7a100b"),
    ("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
     "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c", "72",
     "92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0"
     "f11d8c387b2eaeb4302aeeb00d291612bb0c00"),
    ("c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
     "fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025", "af82",
     "6291d657deec24024827e69c3abe01a30ce548a284743a445e3680d7db5ac3ac18ff9b538d16f290ae67f76098"
     "4dc6594a7c15e9716ed28dc027beceea1ec40a"),
]
L = (1 << 252) + 27742317777372353535851937790883648493


def _raw(k: Ed25519PrivateKey) -> bytes:
    return k.public_key().public_bytes(serialization.Encoding.Raw,
                                       serialization.PublicFormat.Raw)


def cases(n: int, seed: int) -> list[tuple[str, str, str, bool]]:
    """(pub, sig, message, expected) hex: good signatures by `cryptography`, each one also
    with a flipped bit in the signature, the message or the key, and under another key."""
    rnd = random.Random(seed)
    out = [(pk, sig, m, True) for _, pk, m, sig in RFC]
    for i in range(n):
        k = Ed25519PrivateKey.from_private_bytes(rnd.randbytes(32))
        pub, msg = _raw(k), rnd.randbytes(rnd.choice((0, 1, 111, 112, 127, 128, 129, 300 + i)))
        sig = k.sign(msg)
        out.append((pub.hex(), sig.hex(), msg.hex(), True))
        bad = bytearray(sig)
        bad[rnd.randrange(64)] ^= 1 << rnd.randrange(8)
        out.append((pub.hex(), bad.hex(), msg.hex(), False))
        if msg:
            m2 = bytearray(msg)
            m2[rnd.randrange(len(m2))] ^= 1
            out.append((pub.hex(), sig.hex(), m2.hex(), False))
        other = _raw(Ed25519PrivateKey.from_private_bytes(rnd.randbytes(32)))
        out.append((other.hex(), sig.hex(), msg.hex(), False))
    # S >= L (the same point, S + L: accepted by a lax verifier, refused by RFC 8032 5.1.7)
    pk, sig = RFC[0][1], bytes.fromhex(RFC[0][3])
    s = int.from_bytes(sig[32:], "little") + L
    out.append((pk, (sig[:32] + s.to_bytes(32, "little")).hex(), "", False))
    # a y >= p encoding (non-canonical) as the key, and a truncated signature
    out.append(("ee" + "ff" * 30 + "7f", RFC[0][3], "", False))
    out.append((pk, RFC[0][3][:126], "", False))
    return out


def test_rfc8032_vectors_match_cryptography_and_verify() -> None:
    for sk, pk, m, sig in RFC:
        k = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(sk))
        assert _raw(k).hex() == pk and k.sign(bytes.fromhex(m)).hex() == sig
        assert E.verify(bytes.fromhex(pk), bytes.fromhex(sig), bytes.fromhex(m))


def test_sha512_matches_hashlib_across_block_edges() -> None:
    for n in (0, 1, 111, 112, 127, 128, 129, 255, 256, 1000):
        m = os.urandom(n)
        for cut in {0, n // 3, n}:
            h = E.Sha512()
            h.update(m[:cut])
            h.update(m[cut:])
            assert h.digest() == hashlib.sha512(m).digest(), (n, cut)


def test_verify_on_cpython() -> None:
    for pk, sig, m, want in cases(12, 1):
        assert E.verify(bytes.fromhex(pk), bytes.fromhex(sig), bytes.fromhex(m)) is want


def test_verify_reads_a_file(tmp_path) -> None:
    k = Ed25519PrivateKey.generate()
    msg = os.urandom(3000)
    (tmp_path / "m").write_bytes(msg)
    with (tmp_path / "m").open("rb") as f:
        assert E.verify(_raw(k), k.sign(msg), f)
    with (tmp_path / "m").open("rb") as f:
        assert not E.verify(_raw(k), k.sign(msg + b"x"), f)


RUNNER = """import sys
from binascii import unhexlify
from hexiao.firmware import ed25519
f = open(sys.argv[1])
n = bad = 0
for line in f:
    pk, sig, m, want = line.split()
    got = ed25519.verify(unhexlify(pk), unhexlify(sig), b"" if m == "-" else unhexlify(m))
    n += 1
    if got != (want == "1"):
        bad += 1
        print("MISMATCH", n)
print("checked", n, "wrong", bad)
"""


def test_verify_under_micropython(run_mpy, tmp_path) -> None:
    cs = cases(8, 2)
    (tmp_path / "cases.txt").write_text(
        "".join(f"{pk} {sig} {m or '-'} {int(w)}\n" for pk, sig, m, w in cs))
    (tmp_path / "run.py").write_text(RUNNER)
    r = run_mpy(tmp_path / "run.py", tmp_path / "cases.txt")
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().split() == ["checked", str(len(cs)), "wrong", "0"]


def test_bench_figures_are_real() -> None:
    from hexiao.tools.bench import ed25519 as bench

    out = bench.run(size=1024, runs=1)
    assert out["verify_ms"] > 0 and 8 <= out["min_heap_kb"] <= 64
    json.dumps(out)
