"""Which Ed25519 public keys are no keys at all: encodings of points of small order.

A point of order 1, 2, 4 or 8 (the identity, say) has a signature that verifies for
every message without any private key (R the point itself, S = 0): a certificate of
such a "key" is a bearer credential, usable by anyone who has seen the certificate,
and its holder can deny every use of it. An SSH trial had the CA certify the identity
point as a user's key and logged in to sshd as root with the certificate alone.
OpenSSL and OpenSSH verify such signatures, so the CA refuses the keys, as libsodium
does (`crypto_sign_verify_detached`: "has_small_order"). Encodings that are no point of
the curve, or not in canonical form (y >= p), are refused too: no signature of theirs
verifies anywhere, and a certificate of one is a mistake to say.

The arithmetic is RFC 8032's (section 5.1.3, decoding), then three doublings in
projective coordinates: a fraction of a millisecond.
"""

from __future__ import annotations

import functools

P = 2**255 - 19
D = -121665 * pow(121666, P - 2, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)


def decode(raw: bytes) -> tuple[int, int] | None:
    """The point a 32-byte public key encodes (RFC 8032 5.1.3); None when it encodes
    none, or not canonically."""
    if len(raw) != 32:
        return None
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    if y >= P:
        return None
    u, v = (y * y - 1) % P, (D * y * y + 1) % P
    x = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    if (v * x * x - u) % P:
        x = x * SQRT_M1 % P
        if (v * x * x - u) % P:
            return None  # no square root: not on the curve
    if x == 0 and sign:
        return None  # -0: a non-canonical encoding of x = 0
    if x & 1 != sign:
        x = P - x
    return x, y


def _times_eight_is_identity(x: int, y: int) -> bool:
    """Whether 8 times the point (x, y) is the identity: three doublings in projective
    coordinates (dbl-2008-bbjlp for a = -1, complete on this curve), without a modular
    inverse until the end's comparison, which needs none."""
    X, Y, Z = x, y, 1
    for _ in range(3):
        B, C, D_ = (X + Y) ** 2 % P, X * X % P, Y * Y % P
        E = -C
        F = (E + D_) % P
        J = (F - 2 * Z * Z) % P
        X, Y, Z = (B - C - D_) * J % P, F * (E - D_) % P, F * J % P
    return X == 0 and Y == Z


@functools.lru_cache(maxsize=4096)  # a renewal that keeps its key asks again: 0.1-0.2 ms
def weakness(raw: bytes) -> str | None:
    """Why the 32-byte Ed25519 public key `raw` is no key, in words for a refusal; None
    for a key of its own (of the large prime order, possibly with a small part)."""
    point = decode(raw)
    if point is None:
        return "is no point of the curve in canonical form (not an Ed25519 public key)"
    if _times_eight_is_identity(*point):  # times the cofactor 8
        return ("is a point of small order, for which anyone can make a signature without "
                "a private key (a certificate of it would work for whoever holds a copy)")
    return None
