# Ed25519 signature verification (RFC 8032, section 5.1.7) in pure Python, for MicroPython:
# the device checks a firmware bundle's signature itself (issue 14 item 3; app_update, fw_update).
#
# Rules kept here:
# - verification only: no secret ever reaches the device, so nothing here needs to be constant
#   time (every input is public: key, signature, message);
# - strict as RFC 8032 5.1.7 and OpenSSL: a non-canonical point encoding (y >= p), an x that
#   does not exist, "-0", or S >= L are refused; the check is cofactorless ([S]B == R + [k]A,
#   compared as encodings: the same verdicts as `cryptography`, tests hold them equal);
# - SHA-512 is here too (MicroPython's hashlib has none): streaming, so the message may be a
#   file read 128 bytes at a time and never held whole in a 64 KB heap;
# - an overlay: imported for one update and dropped (firmware.drop) after; its constants are
#   bytes, not lists of ints (640 B where 80 ints are ~2.5 KB of heap on a 32-bit board).

P = (1 << 255) - 19
L = (1 << 252) + 27742317777372353535851937790883648493
D = 37095705934669439343138083508754565189542113879843219016388785533085940283555
D2 = D * 2 % P
SQRTM1 = 19681161376707505956807079304988542015446066515923890162744021073123829784752  # sqrt(-1)
BY = 46316835694926478169428394003475163141307993866256225615783033603165251855960
BX = 15112221349535400772501151409588531511454012693041857206046113283949847762202
M64 = 0xFFFFFFFFFFFFFFFF
_K = (
    b'B\x8a/\x98\xd7(\xae"q7D\x91#\xefe\xcd\xb5\xc0\xfb\xcf\xecM;/'
    b'\xe9\xb5\xdb\xa5\x81\x89\xdb\xbc9V\xc2[\xf3H\xb58Y\xf1\x11\xf1\xb6\x05\xd0\x19'
    b'\x92?\x82\xa4\xaf\x19O\x9b\xab\x1c^\xd5\xdam\x81\x18\xd8\x07\xaa\x98\xa3\x03\x02B'
    b'\x12\x83[\x01Epo\xbe$1\x85\xbeN\xe4\xb2\x8cU\x0c}\xc3\xd5\xff\xb4\xe2'
    b'r\xbe]t\xf2{\x89o\x80\xde\xb1\xfe;\x16\x96\xb1\x9b\xdc\x06\xa7%\xc7\x125'
    b'\xc1\x9b\xf1t\xcfi&\x94\xe4\x9bi\xc1\x9e\xf1J\xd2\xef\xbeG\x868O%\xe3'
    b'\x0f\xc1\x9d\xc6\x8b\x8c\xd5\xb5$\x0c\xa1\xccw\xac\x9ce-\xe9,oY+\x02u'
    b'Jt\x84\xaan\xa6\xe4\x83\\\xb0\xa9\xdc\xbdA\xfb\xd4v\xf9\x88\xda\x83\x11S\xb5'
    b"\x98>QR\xeef\xdf\xab\xa81\xc6m-\xb42\x10\xb0\x03'\xc8\x98\xfb!?"
    b'\xbfY\x7f\xc7\xbe\xef\x0e\xe4\xc6\xe0\x0b\xf3=\xa8\x8f\xc2\xd5\xa7\x91G\x93\n\xa7%'
    b"\x06\xcacQ\xe0\x03\x82o\x14))g\n\x0enp'\xb7\n\x85F\xd2/\xfc"
    b'.\x1b!8\\&\xc9&M,m\xfcZ\xc4*\xedS8\r\x13\x9d\x95\xb3\xdf'
    b'e\nsT\x8b\xafc\xdevj\n\xbb<w\xb2\xa8\x81\xc2\xc9.G\xed\xae\xe6'
    b'\x92r,\x85\x14\x825;\xa2\xbf\xe8\xa1L\xf1\x03d\xa8\x1afK\xbcB0\x01'
    b'\xc2K\x8bp\xd0\xf8\x97\x91\xc7lQ\xa3\x06T\xbe0\xd1\x92\xe8\x19\xd6\xefR\x18'
    b'\xd6\x99\x06$Ue\xa9\x10\xf4\x0e5\x85Wq *\x10j\xa0p2\xbb\xd1\xb8'
    b"\x19\xa4\xc1\x16\xb8\xd2\xd0\xc8\x1e7l\x08QA\xabS'HwL\xdf\x8e\xeb\x99"
    b'4\xb0\xbc\xb5\xe1\x9bH\xa89\x1c\x0c\xb3\xc5\xc9ZcN\xd8\xaaJ\xe3A\x8a\xcb'
    b'[\x9c\xcaOwc\xe3sh.o\xf3\xd6\xb2\xb8\xa3t\x8f\x82\xee]\xef\xb2\xfc'
    b'x\xa5coC\x17/`\x84\xc8x\x14\xa1\xf0\xabr\x8c\xc7\x02\x08\x1ad9\xec'
    b'\x90\xbe\xff\xfa#c\x1e(\xa4Pl\xeb\xde\x82\xbd\xe9\xbe\xf9\xa3\xf7\xb2\xc6y\x15'
    b"\xc6qx\xf2\xe3rS+\xca'>\xce\xea&a\x9c\xd1\x86\xb8\xc7!\xc0\xc2\x07"
    b'\xea\xda}\xd6\xcd\xe0\xeb\x1e\xf5}O\x7f\xeen\xd1x\x06\xf0g\xaar\x17o\xba'
    b'\nc}\xc5\xa2\xc8\x98\xa6\x11?\x98\x04\xbe\xf9\r\xae\x1bq\x0b5\x13\x1cG\x1b'
    b'(\xdbw\xf5#\x04}\x842\xca\xab{@\xc7$\x93<\x9e\xbe\n\x15\xc9\xbe\xbc'
    b'C\x1dg\xc4\x9c\x10\rLL\xc5\xd4\xbe\xcb>B\xb6Y\x7f)\x9c\xfce~*'
    b'_\xcbo\xab:\xd6\xfa\xeclD\x19\x8cJGX\x17')
_H = (
    b'j\t\xe6g\xf3\xbc\xc9\x08\xbbg\xae\x85\x84\xca\xa7;<n\xf3r\xfe\x94\xf8+'
    b'\xa5O\xf5:_\x1d6\xf1Q\x0eR\x7f\xad\xe6\x82\xd1\x9b\x05h\x8c+>l\x1f'
    b'\x1f\x83\xd9\xab\xfbA\xbdk[\xe0\xcd\x19\x13~!y')


def _r(x, n):
    return ((x >> n) | (x << (64 - n))) & M64


class Sha512:
    """hashlib-style SHA-512 (FIPS 180-4): update(data), digest()."""

    def __init__(self):
        self.h = [int.from_bytes(_H[i : i + 8], "big") for i in range(0, 64, 8)]
        self.buf = bytearray()
        self.n = 0

    def update(self, data):
        # whole blocks straight from data; only a partial block is copied into self.buf
        self.n += len(data)
        m = memoryview(data)
        b = self.buf
        i = 0
        if b:
            i = min(128 - len(b), len(m))
            b.extend(m[:i])
            if len(b) < 128:
                return
            self._block(b, 0)
            self.buf = b = bytearray()
        while len(m) - i >= 128:
            self._block(m, i)
            i += 128
        b.extend(m[i:])

    def _block(self, b, at):
        w = [0] * 80  # allocated once: a growing list reallocates in a fragmented heap
        for i in range(16):
            w[i] = int.from_bytes(bytes(b[at + 8 * i : at + 8 * i + 8]), "big")
        for i in range(16, 80):
            x = w[i - 15]
            y = w[i - 2]
            w[i] = ((w[i - 16] + (_r(x, 1) ^ _r(x, 8) ^ (x >> 7)) + w[i - 7]
                     + (_r(y, 19) ^ _r(y, 61) ^ (y >> 6))) & M64)
        a, b2, c, d, e, f, g, h = self.h
        for i in range(80):
            t1 = (h + (_r(e, 14) ^ _r(e, 18) ^ _r(e, 41)) + ((e & f) ^ ((e ^ M64) & g))
                  + int.from_bytes(_K[8 * i : 8 * i + 8], "big") + w[i]) & M64
            t2 = ((_r(a, 28) ^ _r(a, 34) ^ _r(a, 39)) + ((a & b2) ^ (a & c) ^ (b2 & c))) & M64
            h = g
            g = f
            f = e
            e = (d + t1) & M64
            d = c
            c = b2
            b2 = a
            a = (t1 + t2) & M64
        s = self.h
        s[0] = (s[0] + a) & M64
        s[1] = (s[1] + b2) & M64
        s[2] = (s[2] + c) & M64
        s[3] = (s[3] + d) & M64
        s[4] = (s[4] + e) & M64
        s[5] = (s[5] + f) & M64
        s[6] = (s[6] + g) & M64
        s[7] = (s[7] + h) & M64

    def digest(self):
        n = self.n
        pad = bytearray(b"\x80")
        pad.extend(bytes((111 - n) % 128))
        pad.extend((n * 8).to_bytes(16, "big"))
        keep = (self.h[:], self.buf[:], n)
        self.update(pad)
        out = b"".join(x.to_bytes(8, "big") for x in self.h)
        self.h, self.buf, self.n = keep
        return out


# points in extended coordinates (X, Y, Z, T), x = X/Z, y = Y/Z, x*y = T/Z (a = -1)


def _add(p, q):
    a = (p[1] - p[0]) * (q[1] - q[0]) % P
    b = (p[1] + p[0]) * (q[1] + q[0]) % P
    c = p[3] * D2 * q[3] % P
    d = p[2] * 2 * q[2] % P
    e = b - a
    f = d - c
    g = d + c
    h = b + a
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _double(p):
    a = p[0] * p[0] % P
    b = p[1] * p[1] % P
    c = 2 * p[2] * p[2] % P
    h = a + b
    e = h - (p[0] + p[1]) * (p[0] + p[1])
    g = a - b
    f = c + g
    return (e * f % P, g * h % P, f * g % P, e * h % P)


def _decode(s):
    # RFC 8032 5.1.3; None if s is not a point's canonical encoding
    y = int.from_bytes(s, "little")
    sign = y >> 255
    y &= (1 << 255) - 1
    if y >= P:
        return None
    u = (y * y - 1) % P
    v = (D * y * y + 1) % P
    x = u * pow(v, P - 2, P) % P  # x^2
    r = pow(x, (P + 3) // 8, P)
    if (r * r - x) % P:
        r = r * SQRTM1 % P
        if (r * r - x) % P:
            return None
    if r == 0 and sign:
        return None
    if r & 1 != sign:
        r = P - r
    return (r, y, 1, r * y % P)


def _encode(p):
    zi = pow(p[2], P - 2, P)
    x = p[0] * zi % P
    return (p[1] * zi % P | (x & 1) << 255).to_bytes(32, "little")


def verify(pub, sig, msg, n=-1):
    """True if sig (64 bytes) is pub's (32 bytes) Ed25519 signature of msg: bytes, or a file
    opened "rb" (its next n bytes, or to its end if n < 0, read 128 at a time). False for
    any malformed input."""
    if len(pub) != 32 or len(sig) != 64:
        return False
    a = _decode(pub)
    s = int.from_bytes(sig[32:], "little")
    if a is None or s >= L or _decode(sig[:32]) is None:
        return False
    h = Sha512()
    h.update(sig[:32])
    h.update(pub)
    if isinstance(msg, (bytes, bytearray, memoryview)):
        h.update(msg)
    else:
        buf = bytearray(128)
        while n:
            k = msg.readinto(buf if n < 0 or n >= 128 else memoryview(buf)[:n])
            if not k:
                break
            h.update(memoryview(buf)[:k])
            n -= k if n > 0 else 0
    k = int.from_bytes(h.digest(), "little") % L
    h = None
    # [S]B + [k](-A), one shared chain of doublings (Straus): its encoding must be R's
    na = (P - a[0], a[1], 1, (P - a[3]) % P)
    b = (BX, BY, 1, BX * BY % P)
    both = _add(b, na)
    q = (0, 1, 1, 0)
    i = 253
    while i >= 0:
        q = _double(q)
        m = (s >> i) & 1 | ((k >> i) & 1) << 1
        if m:
            q = _add(q, b if m == 1 else na if m == 2 else both)
        i -= 1
    return _encode(q) == bytes(sig[:32])
