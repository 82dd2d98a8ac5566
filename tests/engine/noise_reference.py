"""An independent statement of the noise generator (version 2), for tests only.

Shares no code with zostream.engine: the key recipe, Philox4x32-10 and the float32 Gaussian
transform are written again here from the specification in numpy, with every float32 operation
rounded explicitly (numpy ufuncs on float32 arrays round each operation once and never contract
into an FMA; numpy's sqrt is the correctly rounded IEEE square root). The polynomial coefficients
are derived here from their definitions (2/k for atanh, ±1/n! for sin and cos), not read from the
engine.
"""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np

F = np.float32
U64 = np.uint64


def _key(seed: int, name: str, stream: int) -> tuple[int, int]:
    payload = struct.pack("<QI", seed, stream) + name.encode("utf-8")
    d = hashlib.blake2b(payload, digest_size=8, person=b"zostream.key.1").digest()
    return int.from_bytes(d[:4], "little"), int.from_bytes(d[4:], "little")


def philox_bits(seed: int, name: str, start: int, count: int, stream: int = 0) -> np.ndarray:
    """uint64 [count] of uint32 values: element e is lane e % 4 of Philox4x32-10 at counter
    (e // 4 low word, e // 4 high word, 0, 0)."""
    k0, k1 = _key(seed, name, stream)
    first, last = start // 4, (start + count - 1) // 4
    idx = np.arange(first, last + 1, dtype=U64)
    mask = U64(0xFFFFFFFF)
    c0, c1, c2, c3 = idx & mask, idx >> U64(32), np.zeros_like(idx), np.zeros_like(idx)
    for r in range(10):
        if r:
            k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
        p0, p1 = U64(0xD2511F53) * c0, U64(0xCD9E8D57) * c2  # < 2**64: exact in uint64
        c0, c1, c2, c3 = (p1 >> U64(32)) ^ c1 ^ U64(k0), p1 & mask, (p0 >> U64(32)) ^ c3 ^ U64(k1), p0 & mask
    flat = np.stack([c0, c1, c2, c3], axis=1).reshape(-1)
    off = start - 4 * first
    return flat[off : off + count]


def _horner(x: np.ndarray, coefs: list[np.float32]) -> np.ndarray:
    acc = np.full_like(x, coefs[0])
    for c in coefs[1:]:
        acc = acc * x + c  # two roundings: product, then sum
    return acc


def _neg2_log(bits: np.ndarray) -> np.ndarray:
    """-2 ln(u1), u1 = ((bits >> 8) + 1) / 2**24, by the version-2 recipe."""
    n = ((bits >> U64(8)) + U64(1)).astype(F)  # <= 2**24: exact
    fb = n.view(np.uint32).astype(np.int64)
    frac = fb & 0x7FFFFF
    big = frac > 0x3504F3
    expo = (fb >> 23) - 127 + big.astype(np.int64) - 24
    m = (frac | np.where(big, 0x3F000000, 0x3F800000)).astype(np.uint32).view(F)
    f = m - F(1)
    s = f / (f + F(2))
    w = s * s
    atanh = [F(2.0 / k) for k in (11, 9, 7, 5, 3)]
    log_m = s * F(2) + (s * w) * _horner(w, atanh)
    ln2_hi = F(0.693145751953125)  # 9 trailing zero bits: e * ln2_hi is exact
    ln2_lo = F(math.log(2) - 0.693145751953125)
    e = expo.astype(F)
    return np.maximum((e * ln2_hi + (log_m + e * ln2_lo)) * F(-2), F(0))


def _sincos(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sin, cos of 2 pi u2, u2 = (bits >> 8) / 2**24, reduced on the integer grid by octants."""
    j = (bits >> U64(8)).astype(np.int64)
    quad, r = j >> 22, j & 0x3FFFFF
    upper = r > (1 << 21)
    r = np.where(upper, (1 << 22) - r, r)
    phi = r.astype(F) * F(math.pi / 2**23)
    w = phi * phi
    sin_c = [F(((-1) ** ((n - 1) // 2)) / math.factorial(n)) for n in (9, 7, 5, 3)]
    cos_c = [F(((-1) ** (n // 2)) / math.factorial(n)) for n in (10, 8, 6, 4, 2)]
    sp = phi + (phi * w) * _horner(w, sin_c)
    cp = w * _horner(w, cos_c) + F(1)
    s1, c1 = np.where(upper, cp, sp), np.where(upper, sp, cp)
    odd = (quad & 1) == 1
    sm, cm = np.where(odd, c1, s1), np.where(odd, s1, c1)
    return np.where(quad >= 2, -sm, sm), np.where((quad == 1) | (quad == 2), -cm, cm)


def normal(seed: int, name: str, start: int, count: int) -> np.ndarray:
    """float32 [count] Gaussian noise of generator version 2 (Box-Muller on lane pairs)."""
    first = start // 4
    bits = philox_bits(seed, name, 4 * first, 4 * ((start + count - 1) // 4 - first + 1)).reshape(-1, 4)
    cols = []
    for a, b in ((0, 1), (2, 3)):
        radius = np.sqrt(_neg2_log(bits[:, a]))
        s, c = _sincos(bits[:, b])
        cols += [radius * c, radius * s]
    flat = np.stack(cols, axis=1).reshape(-1)
    off = start - 4 * first
    return flat[off : off + count]


def uniform(seed: int, name: str, start: int, count: int, stream: int = 1) -> np.ndarray:
    return (philox_bits(seed, name, start, count, stream) >> U64(8)).astype(F) * F(2.0**-24)


def rademacher(seed: int, name: str, start: int, count: int) -> np.ndarray:
    return np.where(philox_bits(seed, name, start, count) >> U64(31), F(-1), F(1))
