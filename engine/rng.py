"""Portable counter-based noise: z = f(step seed, tensor name, element index).

Philox4x32-10 (Salmon et al., SC'11 "Parallel random numbers: as easy as 1, 2, 3") written with
plain torch int64 ops, so the same code runs on CPU and CUDA tensors and yields the same integers.
Element e of a tensor's stream uses counter e // 4 (words: low 32 bits, high 32 bits, 0, 0) and
lane e % 4, so any chunking of [0, numel) gives the same values (invariant 1).

The float transforms use only IEEE-exact operations (+ - * /, integer/bit ops, comparisons,
where), each its own kernel so nothing is contracted into an FMA: log and sin/cos are evaluated as
fixed polynomials instead of calling torch.log/cos/sin, whose results differ by an ulp between CPU
(SLEEF), CUDA (libdevice) and torch versions. Gaussian noise is then bitwise identical on every
device and torch version, which replay of an update log relies on.

Even torch.sqrt is not exact everywhere: on CPU builds with MKL it runs MKL's vector math library
(VML, "high accuracy" mode: within 1 ulp, not correctly rounded), and VML picks its code path by
CPU vendor. On an AMD EPYC 18 % of float32 torch.sqrt results differ from the correctly rounded
value; on an Intel Xeon they do not. `sqrt_rn` therefore corrects any approximation to the
correctly rounded square root with an exact float64 midpoint test.

Anything that changes an output value must bump GENERATOR_VERSION (it is recorded in the log).
Version history:
  1  Box-Muller radius from torch.sqrt: CPU-dependent on MKL builds (see above).
  2  the radius from `sqrt_rn`, correctly rounded; the integer streams (bits, uniforms, Rademacher)
     are unchanged from version 1, so Rademacher logs of version 1 still replay (`check_replayable`).
"""

from __future__ import annotations

import hashlib
import struct

import torch

GENERATOR_VERSION: int = 2
NOISE_KINDS = ("gaussian", "rademacher")

_MASK32 = 0xFFFFFFFF
_MASK64 = (1 << 64) - 1
# Philox4x32 multipliers and Weyl key increments (Random123, philox.h).
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
_TWO_M24 = 2.0**-24


def _f32(x: float) -> float:
    # Constants are float32 values up front, so float32 tensor-scalar ops round once on every path.
    return struct.unpack("<f", struct.pack("<f", x))[0]


# log: ln 2 split Cody-Waite style; _LN2_HI has 9 trailing zero bits so n * _LN2_HI is exact.
_LN2_HI = 0.693145751953125
_LN2_LO = _f32(0.6931471805599453 - _LN2_HI)
# 2 * atanh(s) = 2s + sum_k (2 / k) s^k, k = 3, 5, ..., 11 (|s| < 0.172 after the sqrt(2) reduction).
_ATANH_COEFS = tuple(_f32(2.0 / k) for k in (11, 9, 7, 5, 3))
# Taylor series of sin and cos on [0, pi/4], highest power first; error < 3e-8.
_SIN_COEFS = tuple(_f32(c) for c in (1 / 362880, -1 / 5040, 1 / 120, -1 / 6))  # phi^9 .. phi^3
_COS_COEFS = tuple(_f32(c) for c in (-1 / 3628800, 1 / 40320, -1 / 720, 1 / 24, -0.5))  # phi^10 .. phi^2
_PHI_STEP = _f32(3.141592653589793 / 2**23)  # angle of one step of the 22-bit position in a quadrant


def _check_u64(value: int, what: str) -> int:
    if not isinstance(value, int) or not 0 <= value <= _MASK64:
        raise ValueError(f"{what} must be an integer in [0, 2**64), got {value!r}")
    return value


def step_seed(job_seed: int, step: int, direction: int = 0) -> int:
    """64-bit seed of (job, step, direction): blake2b, so nearby inputs give unrelated seeds."""
    payload = struct.pack(
        "<QQQ",
        _check_u64(job_seed, "job_seed"),
        _check_u64(step, "step"),
        _check_u64(direction, "direction"),
    )
    digest = hashlib.blake2b(payload, digest_size=8, person=b"zostream.step.1").digest()
    return int.from_bytes(digest, "little")


def tensor_key(seed: int, name: str, stream: int = 0) -> tuple[int, int]:
    """Two uint32 Philox key words for (seed, tensor name, stream).

    stream 0 is the perturbation z, stream 1 the stochastic-rounding uniforms.
    """
    if not isinstance(stream, int) or not 0 <= stream <= _MASK32:
        raise ValueError(f"stream must be an integer in [0, 2**32), got {stream!r}")
    payload = struct.pack("<QI", _check_u64(seed, "seed"), stream) + name.encode("utf-8")
    digest = hashlib.blake2b(payload, digest_size=8, person=b"zostream.key.1").digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _mulhilo(x: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    # x < 2**32 and m < 2**32, so x * m < 2**64: the int64 product holds its low 64 bits in two's
    # complement (torch wraps on CPU and CUDA; the KAT tests check it per device).
    p = x * m
    return (p >> 32) & _MASK32, p & _MASK32


def _philox_lanes(
    c: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], key: tuple[int, int], rounds: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox4x32-R on four int64 [N] lanes holding uint32 values."""
    c0, c1, c2, c3 = c
    k0, k1 = key
    for r in range(rounds):
        rk0, rk1 = (k0 + r * _W0) & _MASK32, (k1 + r * _W1) & _MASK32  # key bumped before rounds 2..R
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ rk0, lo1, hi0 ^ c3 ^ rk1, lo0
    return c0, c1, c2, c3


def philox4x32(counter: torch.Tensor, key: tuple[int, int], rounds: int = 10) -> torch.Tensor:
    """Philox4x32-R of int64 counters [N, 4] (uint32 values) under key (k0, k1) → int64 [N, 4]."""
    if counter.dtype != torch.int64 or counter.dim() != 2 or counter.shape[1] != 4:
        raise ValueError(f"counter must be an int64 tensor [N, 4], got {counter.dtype} {list(counter.shape)}")
    if len(key) != 2 or not all(isinstance(k, int) and 0 <= k <= _MASK32 for k in key):
        raise ValueError(f"key must be two integers in [0, 2**32), got {key!r}")
    lanes = _philox_lanes(tuple(counter.unbind(1)), key, rounds)  # type: ignore[arg-type]
    return torch.stack(lanes, dim=1)


def _check_range(start: int, count: int) -> None:
    if start < 0 or count < 0:
        raise ValueError(f"start and count must be >= 0, got start={start} count={count}")


def _counter_lanes(
    seed: int, name: str, stream: int, start: int, count: int, device: torch.device | str
) -> tuple[tuple[torch.Tensor, ...], int]:
    """Philox lanes for every counter touching elements [start, start+count); and the offset of
    element `start` in the flattened [n_counters * 4] block."""
    first, last = start // 4, (start + count - 1) // 4
    idx = torch.arange(first, last + 1, dtype=torch.int64, device=device)
    zero = torch.zeros_like(idx)
    lanes = _philox_lanes((idx & _MASK32, idx >> 32, zero, zero), tensor_key(seed, name, stream), 10)
    return lanes, start - 4 * first


def _take(lanes: tuple[torch.Tensor, ...], offset: int, count: int) -> torch.Tensor:
    # [n, 4] row-major flattening puts element 4c + lane at position 4c + lane.
    return torch.stack(lanes, dim=1).reshape(-1)[offset : offset + count]


def random_bits(
    seed: int, name: str, start: int, count: int, device: torch.device | str, stream: int = 0
) -> torch.Tensor:
    """int64 [count] of uint32 values: elements [start, start+count) of this tensor's stream."""
    _check_range(start, count)
    if count == 0:
        return torch.empty(0, dtype=torch.int64, device=device)
    lanes, offset = _counter_lanes(seed, name, stream, start, count, device)
    return _take(lanes, offset, count)


def _unit(bits: torch.Tensor) -> torch.Tensor:
    """Top 24 bits → float32 k * 2**-24 in [0, 1) (exact)."""
    return (bits >> 8).to(torch.float32) * _TWO_M24


def uniform(
    seed: int, name: str, start: int, count: int, device: torch.device | str, stream: int = 1
) -> torch.Tensor:
    """float32 [count] uniforms in [0, 1) on the grid k * 2**-24."""
    return _unit(random_bits(seed, name, start, count, device, stream))


def _horner(x: torch.Tensor, coefs: tuple[float, ...]) -> torch.Tensor:
    # Separate mul and add kernels: no fused multiply-add, so every device rounds identically.
    acc = torch.full_like(x, coefs[0])
    for c in coefs[1:]:
        acc = acc * x + c
    return acc


def _neg2_log_u1(bits: torch.Tensor) -> torch.Tensor:
    """-2 ln(u1) for u1 = ((bits >> 8) + 1) * 2**-24 in (0, 1], float32, IEEE-exact ops only."""
    n = ((bits >> 8) + 1).to(torch.float32)  # integer in [1, 2**24]: exact
    fbits = n.view(torch.int32).to(torch.int64)
    frac = fbits & 0x7FFFFF
    big = frac > 0x3504F3  # mantissa > sqrt(2): use m / 2 in [0.707, 1) so |ln m| stays small
    expo = (fbits >> 23) - 127 + big.to(torch.int64) - 24  # u1 = m * 2**expo
    m = (frac | torch.where(big, 0x3F000000, 0x3F800000)).to(torch.int32).view(torch.float32)
    f = m - 1.0  # exact (Sterbenz)
    s = f / (f + 2.0)
    w = s * s
    log_m = s * 2.0 + (s * w) * _horner(w, _ATANH_COEFS)
    e = expo.to(torch.float32)
    log_u1 = e * _LN2_HI + (log_m + e * _LN2_LO)
    return (log_u1 * -2.0).clamp_min(0.0)


def _sincos_2pi(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sin, cos) of 2*pi*u2 for u2 = (bits >> 8) * 2**-24, reduced exactly on the integer grid."""
    j = bits >> 8  # [0, 2**24): quadrant = top 2 bits, position inside it = low 22 bits
    quadrant = j >> 22
    r = j & 0x3FFFFF
    upper = r > (1 << 21)  # past the octant: use the complementary angle and swap sin/cos
    r = torch.where(upper, (1 << 22) - r, r)
    phi = r.to(torch.float32) * _PHI_STEP  # [0, pi/4]
    w = phi * phi
    sin_phi = phi + (phi * w) * _horner(w, _SIN_COEFS)
    cos_phi = w * _horner(w, _COS_COEFS) + 1.0
    sin_psi = torch.where(upper, cos_phi, sin_phi)
    cos_psi = torch.where(upper, sin_phi, cos_phi)
    odd = (quadrant & 1) == 1  # rotation by q * pi/2
    sin_mag = torch.where(odd, cos_psi, sin_psi)
    cos_mag = torch.where(odd, sin_psi, cos_psi)
    sin_t = torch.where(quadrant >= 2, -sin_mag, sin_mag)
    cos_t = torch.where((quadrant == 1) | (quadrant == 2), -cos_mag, cos_mag)
    return sin_t, cos_t


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt of x >= 0 on every device and CPU.

    y0 = torch.sqrt(x) is within an ulp (VML's accuracy bound), then moved to the neighbour whose
    rounding interval holds sqrt(x): y is right iff (y - ulp/2)^2 <= x <= (y + ulp/2)^2. A midpoint
    of two float32 values has 25 significant bits, so its square (50 bits) and the comparison are
    exact in float64; x is never exactly a midpoint's square, so there are no ties. Two rounds
    cover an initial error of two ulps."""
    y = torch.sqrt(x)
    x64 = x.double()
    inf, zero = torch.full((), float("inf"), device=x.device), torch.zeros((), device=x.device)
    for _ in range(2):
        y64 = y.double()
        up, down = torch.nextafter(y, inf), torch.nextafter(y, zero)
        mid_up, mid_down = (y64 + up.double()) * 0.5, (y64 + down.double()) * 0.5
        y = torch.where(x64 > mid_up * mid_up, up, torch.where(x64 < mid_down * mid_down, down, y))
    return y


def check_replayable(generator_version: int, noise_kind: str) -> None:
    """Raise ValueError when a log's noise cannot be regenerated bitwise by this generator."""
    if generator_version == GENERATOR_VERSION or (generator_version == 1 and noise_kind == "rademacher"):
        return
    if generator_version == 1:
        raise ValueError(
            "the log was written by noise generator version 1, whose Gaussian noise depended on the "
            "CPU (torch.sqrt through MKL is not correctly rounded on some CPUs); this build "
            f"(generator version {GENERATOR_VERSION}) cannot regenerate it bitwise. Replay it with "
            "zostream 0.1 on the machine that wrote it, or train the job again"
        )
    raise ValueError(
        f"the log was written by noise generator version {generator_version}; this build has "
        f"version {GENERATOR_VERSION}: use the zostream release that wrote it"
    )


def normal(seed: int, name: str, start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """float32 [count] standard normals (stream 0), Box-Muller on lane pairs of each counter:
    lanes (0, 1) → elements (4c, 4c+1) = R cos T, R sin T; lanes (2, 3) → (4c+2, 4c+3);
    R = sqrt(-2 ln u1) from the first lane of the pair (u1 in (0, 1]), T = 2 pi u2 from the second."""
    _check_range(start, count)
    if count == 0:
        return torch.empty(0, dtype=torch.float32, device=device)
    (b0, b1, b2, b3), offset = _counter_lanes(seed, name, 0, start, count, device)
    out = []
    for bu, bt in ((b0, b1), (b2, b3)):
        radius = sqrt_rn(_neg2_log_u1(bu))
        sin_t, cos_t = _sincos_2pi(bt)
        out += [radius * cos_t, radius * sin_t]
    return _take(tuple(out), offset, count)


def rademacher(seed: int, name: str, start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """float32 [count] of ±1 (stream 0): +1 where bit 31 of the element's word is 0."""
    bits = random_bits(seed, name, start, count, device, 0)
    return (1 - 2 * (bits >> 31)).to(torch.float32)


def noise(
    kind: str,
    seed: int,
    name: str,
    numel: int,
    start: int = 0,
    count: int | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """float32 [count] perturbation for elements [start, start+count) of a tensor of numel elements."""
    if count is None:
        count = numel - start
    if start < 0 or count < 0 or start + count > numel:
        raise ValueError(f"elements [{start}, {start}+{count}) are outside a tensor of {numel} elements")
    if kind == "gaussian":
        return normal(seed, name, start, count, device)
    if kind == "rademacher":
        return rademacher(seed, name, start, count, device)
    raise ValueError(f"noise kind must be one of {', '.join(NOISE_KINDS)}, got {kind!r}")
