# HMAC-SHA256 (RFC 2104), HKDF-SHA256 (RFC 5869) and a constant-time compare.
#
# Rules kept here:
# - CPython uses the standard library's hmac (OpenSSL, constant-time compare_digest);
# - hmac_sha256_parts() MACs the concatenation of its parts without building it on the device;
# - MicroPython has hashlib.sha256 but no hmac module: the pure versions below are used there;
# - compares of MACs never short-cut on the first differing byte;
# - the device needs hmac_sha256_parts, ct_equal and session_keys only: hmac_sha256 and the
#   general hkdf_sha256 are defined for host tools and tests (every function costs device heap).

import hashlib
import sys

try:
    import hmac as _hmac

    def hmac_sha256_parts(key, parts):
        return _hmac.digest(key, b"".join(parts), "sha256")

    ct_equal = _hmac.compare_digest
except ImportError:  # MicroPython

    def _block(key, pad):
        # the key, zero-padded to the SHA-256 block and XORed with the pad byte: one 64-byte
        # buffer, where pad constants, a padded key copy and a zip would cost several
        out = bytearray(64)
        out[: len(key)] = key
        for i in range(64):
            out[i] ^= pad
        return out

    def hmac_sha256_parts(key, parts):
        # fed piece by piece: a 1 KB frame's MAC input is never copied into one buffer; the
        # inner hash is finished before the outer one starts, so one hash object is alive at a time
        if len(key) > 64:
            key = hashlib.sha256(key).digest()
        h = hashlib.sha256(_block(key, 0x36))
        for part in parts:
            h.update(part)
        inner = h.digest()
        h = hashlib.sha256(_block(key, 0x5C))  # the inner hash object is garbage by now
        h.update(inner)
        return h.digest()

    def ct_equal(a, b):
        if len(a) != len(b):
            return False
        acc = 0
        for x, y in zip(a, b):
            acc |= x ^ y
        return acc == 0


def session_keys(device_key, host_nonce, device_nonce):
    """The key schedule of SPEC.md: returns (d2h_key, h2d_key).

    Both keys are HKDF-SHA256(device_key, salt = host_nonce || device_nonce, info, 32); with one
    32-byte block, HKDF-Expand is T(1) = HMAC(PRK, info || 0x01), and both share the extract
    step's PRK, so it is computed once (three HMACs instead of four, and a shallower call chain:
    the device runs this inside the receive path, where every frame costs heap)."""
    prk = hmac_sha256_parts(host_nonce + device_nonce, (device_key,))
    return (
        hmac_sha256_parts(prk, (b"hexiao/1 d2h\x01",)),
        hmac_sha256_parts(prk, (b"hexiao/1 h2d\x01",)),
    )


if sys.implementation.name != "micropython":  # host tools and tests; the device needs neither

    def hmac_sha256(key, msg):
        return hmac_sha256_parts(key, (msg,))

    def hkdf_sha256(ikm, salt, info, length):
        """HKDF-SHA256 in general (RFC 5869): session_keys() is tested against it."""
        if length > 255 * 32:
            raise ValueError("HKDF output too long")
        prk = hmac_sha256(salt if salt else bytes(32), ikm)
        out = b""
        block = b""
        i = 1
        while len(out) < length:
            block = hmac_sha256(prk, block + info + bytes((i,)))
            out += block
            i += 1
        return out[:length]
