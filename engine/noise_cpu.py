"""The noise generator and the fused ZO kernels compiled for the CPU (numba, no fastmath).

Same bits as engine/rng.py (version 2) and engine/zo.py, element for element: each kernel walks
the Philox counters of a tensor's stream (counter c gives elements 4c..4c+3), turns the four words
into four noise values with the same float32 operation sequence as rng.normal, and uses them at
once, so z is never materialised:

  perturb_pair:  out+ = (θ + εz).to(dt), out- = (θ - εz).to(dt)   one read of θ, one z
  update:        θ ← round(θ - lr (Σ_d g_d z_d [/ q] + wd θ))      one read-modify-write, all q
                 directions and the stochastic-rounding uniforms drawn in the same counter loop

Why this keeps the bits: numba compiles without fastmath, so LLVM never contracts a*b+c into an
FMA nor reassociates; every constant is a float32 global, so float32 arithmetic stays float32 (a
Python float constant would promote the expression to float64); sqrt is the IEEE sqrt instruction,
correctly rounded. tests/engine/test_noise_cpu.py checks all of it against the independent numpy
reference and the torch generator. bfloat16 tensors travel as their uint16 bit patterns (numba has
no bfloat16): widening is a shift, narrowing is round-to-nearest-even on the bits (as torch does).

The counter loop is split into `_THREAD_BLOCK` pieces run by numba's parallel range: every element
is computed independently, so the thread count never changes a value.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_U = np.uint64
_MASK = _U(0xFFFFFFFF)
_SH8, _SH16, _SH23, _SH31, _SH32 = _U(8), _U(16), _U(23), _U(31), _U(32)
_M0, _M1 = _U(0xD2511F53), _U(0xCD9E8D57)
_W0, _W1 = _U(0x9E3779B9), _U(0xBB67AE85)
_F = np.float32
_ZERO, _ONE, _TWO, _NEG2 = _F(0.0), _F(1.0), _F(2.0), _F(-2.0)
_TWO_M24 = _F(2.0**-24)
# Constants of rng.py's transforms, rounded to float32 from their definitions (as rng.py rounds them).
_LN2_HI = _F(0.693145751953125)
_LN2_LO = _F(0.6931471805599453 - 0.693145751953125)
_A11, _A9, _A7, _A5, _A3 = (_F(2.0 / k) for k in (11, 9, 7, 5, 3))
_S9, _S7, _S5, _S3 = (_F(c) for c in (1 / 362880, -1 / 5040, 1 / 120, -1 / 6))
_C10, _C8, _C6, _C4, _C2 = (_F(c) for c in (-1 / 3628800, 1 / 40320, -1 / 720, 1 / 24, -0.5))
_PHI_STEP = _F(3.141592653589793 / 2**23)
_THREAD_BLOCK = 1 << 14  # counters per parallel piece (64 Ki elements)

GAUSSIAN, RADEMACHER = 0, 1
KIND_CODES = {"gaussian": GAUSSIAN, "rademacher": RADEMACHER}
# Tensor dtypes the kernels read and write; anything else takes the torch path in zo.py.
BF16, F32 = 0, 1


# ---- bit casts (LLVM bitcast: no memory round trip, vectorisable) ------------------------------------


@intrinsic
def _f32_bits(typingctx, x):  # noqa: ARG001 (numba intrinsic signature)
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.uint64(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, x):  # noqa: ARG001
    if x != types.uint64:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

    return types.float32(types.uint64), codegen


@nb.njit(inline="always")
def _bf16_to_f32(h):
    return _bits_f32(_U(h) << _SH16)


@nb.njit(inline="always")
def _f32_to_bf16(x):
    """Round to nearest even on the bits (c10::BFloat16). Every NaN becomes the quiet 0x7FC0: NaN
    payloads are not part of the contract (torch itself writes 0x7FC0 or 0xFFFF)."""
    if x != x:
        return np.uint16(0x7FC0)
    b = _f32_bits(x)
    return np.uint16((b + _U(0x7FFF) + ((b >> _SH16) & _U(1))) >> _SH16)


def _load(a, i):  # numba overload below: element i of a tensor as float32
    raise NotImplementedError


@overload(_load)
def _load_impl(a, i):
    if a.dtype == types.uint16:
        return lambda a, i: _bf16_to_f32(a[i])
    if a.dtype == types.float32:
        return lambda a, i: a[i]
    return None


def _store(a, i, x):  # numba overload below: float32 x into element i, rounded to nearest
    raise NotImplementedError


@overload(_store)
def _store_impl(a, i, x):
    if a.dtype == types.uint16:

        def impl(a, i, x):
            a[i] = _f32_to_bf16(x)

        return impl
    if a.dtype == types.float32:

        def impl(a, i, x):
            a[i] = x

        return impl
    return None


# ---- the generator ---------------------------------------------------------------------------------


@nb.njit(inline="always")
def _philox(c, k0, k1):
    """Philox4x32-10 of counter (c low word, c high word, 0, 0) under key (k0, k1)."""
    c0, c1, c2, c3 = c & _MASK, c >> _SH32, _U(0), _U(0)
    for _ in range(10):
        p0, p1 = c0 * _M0, c2 * _M1  # < 2**64: exact
        c0, c1, c2, c3 = ((p1 >> _SH32) ^ c1 ^ k0), p1 & _MASK, ((p0 >> _SH32) ^ c3 ^ k1), p0 & _MASK
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return c0, c1, c2, c3


@nb.njit(inline="always")
def _radius(bits):
    """sqrt(-2 ln u1), u1 = ((bits >> 8) + 1) 2**-24: rng._neg2_log_u1 then a correctly rounded sqrt."""
    n = _F((bits >> _SH8) + _U(1))
    fb = _f32_bits(n)
    frac = fb & _U(0x7FFFFF)
    big = frac > _U(0x3504F3)
    expo = np.int64(fb >> _SH23) - 127 + np.int64(big) - 24
    m = _bits_f32(frac | (_U(0x3F000000) if big else _U(0x3F800000)))
    f = m - _ONE
    s = f / (f + _TWO)
    w = s * s
    acc = _A11
    acc = acc * w + _A9
    acc = acc * w + _A7
    acc = acc * w + _A5
    acc = acc * w + _A3
    log_m = s * _TWO + (s * w) * acc
    e = _F(expo)
    v = (e * _LN2_HI + (log_m + e * _LN2_LO)) * _NEG2
    v = v if v > _ZERO else _ZERO  # clamp_min(0): u1 = 1 gives -0.0 * -2 ... = +0.0 here and in torch
    return np.sqrt(v)


@nb.njit(inline="always")
def _sincos(bits):
    """(sin, cos) of 2 pi (bits >> 8) 2**-24 as rng._sincos_2pi computes them."""
    j = np.int64(bits >> _SH8)
    quadrant = j >> 22
    r = j & 0x3FFFFF
    upper = r > (1 << 21)
    if upper:
        r = (1 << 22) - r
    phi = _F(r) * _PHI_STEP
    w = phi * phi
    acc = _S9
    acc = acc * w + _S7
    acc = acc * w + _S5
    acc = acc * w + _S3
    sin_phi = phi + (phi * w) * acc
    acc = _C10
    acc = acc * w + _C8
    acc = acc * w + _C6
    acc = acc * w + _C4
    acc = acc * w + _C2
    cos_phi = w * acc + _ONE
    sin_psi, cos_psi = (cos_phi, sin_phi) if upper else (sin_phi, cos_phi)
    sin_mag, cos_mag = (cos_psi, sin_psi) if (quadrant & 1) == 1 else (sin_psi, cos_psi)
    sin_t = -sin_mag if quadrant >= 2 else sin_mag
    cos_t = -cos_mag if (quadrant == 1 or quadrant == 2) else cos_mag
    return sin_t, cos_t


@nb.njit(inline="always")
def _four(kind, c, k0, k1):
    """The four noise values of counter c (elements 4c .. 4c+3), float32."""
    b0, b1, b2, b3 = _philox(_U(c), k0, k1)
    if kind == RADEMACHER:
        return (
            _ONE - _TWO * _F(b0 >> _SH31),
            _ONE - _TWO * _F(b1 >> _SH31),
            _ONE - _TWO * _F(b2 >> _SH31),
            _ONE - _TWO * _F(b3 >> _SH31),
        )
    ra, rb = _radius(b0), _radius(b2)
    sa, ca = _sincos(b1)
    sb, cb = _sincos(b3)
    return ra * ca, ra * sa, rb * cb, rb * sb


@nb.njit(inline="always")
def _pick(v0, v1, v2, v3, lane):
    if lane == 0:
        return v0
    if lane == 1:
        return v1
    return v2 if lane == 2 else v3


@nb.njit(parallel=True, cache=True)
def fill_noise(kind, k0, k1, start, out):
    """out[i] = noise of element start + i (kind GAUSSIAN / RADEMACHER, key (k0, k1), stream's key)."""
    n = out.shape[0]
    if n == 0:
        return
    first, last = start // 4, (start + n - 1) // 4
    k0, k1 = _U(k0) & _MASK, _U(k1) & _MASK
    pieces = (last - first) // _THREAD_BLOCK + 1
    for p in nb.prange(pieces):
        lo = first + p * _THREAD_BLOCK
        hi = min(last + 1, lo + _THREAD_BLOCK)
        for c in range(lo, hi):
            v0, v1, v2, v3 = _four(kind, c, k0, k1)
            for lane in range(4):
                i = 4 * c + lane - start
                if 0 <= i < n:
                    out[i] = _pick(v0, v1, v2, v3, lane)


@nb.njit(parallel=True, cache=True)
def fill_uniform(k0, k1, start, out):
    """out[i] = (bits >> 8) * 2**-24 of element start + i (rng.uniform)."""
    n = out.shape[0]
    if n == 0:
        return
    first, last = start // 4, (start + n - 1) // 4
    k0, k1 = _U(k0) & _MASK, _U(k1) & _MASK
    pieces = (last - first) // _THREAD_BLOCK + 1
    for p in nb.prange(pieces):
        lo = first + p * _THREAD_BLOCK
        hi = min(last + 1, lo + _THREAD_BLOCK)
        for c in range(lo, hi):
            b0, b1, b2, b3 = _philox(_U(c), k0, k1)
            for lane in range(4):
                i = 4 * c + lane - start
                if 0 <= i < n:
                    out[i] = _F(_pick(b0, b1, b2, b3, lane) >> _SH8) * _TWO_M24


# ---- fused ZO kernels ------------------------------------------------------------------------------


@nb.njit(parallel=True, cache=True)
def perturb_pair(theta, kind, k0, k1, scale, out_plus, out_minus):
    """out± = (θ ± scale·z) rounded to the outputs' dtype; θ [n] (bf16 bits or float32), read once.

    scale is ε as a float32; θ - scale·z equals zo.perturbed's θ + (-scale)·z (negation is exact).
    An empty out_minus asks for out+ alone."""
    n = theta.shape[0]
    if n == 0:
        return
    if out_plus.shape[0] != n or out_minus.shape[0] not in (0, n):
        raise ValueError("perturb_pair: outputs must have theta's length (out_minus: or 0)")
    pair = out_minus.shape[0] == n
    k0, k1 = _U(k0) & _MASK, _U(k1) & _MASK
    sc = _F(scale)
    last = (n - 1) // 4
    pieces = last // _THREAD_BLOCK + 1
    for p in nb.prange(pieces):
        lo = p * _THREAD_BLOCK
        hi = min(last + 1, lo + _THREAD_BLOCK)
        for c in range(lo, hi):
            v0, v1, v2, v3 = _four(kind, c, k0, k1)
            for lane in range(4):
                i = 4 * c + lane
                if i < n:
                    x = _load(theta, i)
                    dz = _pick(v0, v1, v2, v3, lane) * sc
                    _store(out_plus, i, x + dz)
                    if pair:
                        _store(out_minus, i, x - dz)


@nb.njit(inline="always")
def _stochastic_bf16(x, u):
    """zo.stochastic_round of one float32 to bf16 bits: the upper neighbour with probability
    (x - lo) / (hi - lo), exact values (and ±inf) kept, saturation at the largest finite value."""
    near = _f32_to_bf16(x)
    if x != x:
        return near
    near32 = _bf16_to_f32(near)
    if near32 == x:
        return near
    up = near32 < x
    # nextafter in bf16 toward ±inf: one step up in magnitude when moving away from zero.
    negative = (near & np.uint16(0x8000)) != 0
    other = np.uint16(near - 1) if up == negative else np.uint16(near + 1)
    lo, hi = (near, other) if up else (other, near)
    lo32 = _bf16_to_f32(lo)
    p_hi = (x - lo32) / (_bf16_to_f32(hi) - lo32)
    return hi if u < p_hi else lo


def _store_stochastic(a, i, x, u):  # numba overload below: stochastic rounding into bf16 bits
    raise NotImplementedError


@overload(_store_stochastic)
def _store_stochastic_impl(a, i, x, u):
    if a.dtype == types.uint16:

        def impl(a, i, x, u):
            a[i] = _stochastic_bf16(x, u)

        return impl
    if a.dtype == types.float32:  # a float32 master rounds to nearest (zo.apply_update)

        def impl(a, i, x, u):
            a[i] = x

        return impl
    return None


@nb.njit(parallel=True, cache=True)
def update(theta, kind, keys, gs, lr, wd, stochastic, sr_k0, sr_k1):
    """θ ← θ - lr (mean_d g_d z_d + wd θ) in place, then round (nearest, or stochastic for bf16 bits).

    keys: uint64 [q, 2] Philox keys of the directions' z; gs: float32 [q]; wd = 0 means no decay.
    Per element, in zo.apply_update's order: u = g_0 z_0, u = u + g_d z_d, u = u / q (q > 1),
    u = u + θ wd (wd != 0), new = θ - u lr."""
    n = theta.shape[0]
    q = keys.shape[0]
    if n == 0:
        return
    lr32, wd32, qf = _F(lr), _F(wd), _F(q)
    sk0, sk1 = _U(sr_k0) & _MASK, _U(sr_k1) & _MASK
    last = (n - 1) // 4
    pieces = last // _THREAD_BLOCK + 1
    for p in nb.prange(pieces):
        lo = p * _THREAD_BLOCK
        hi = min(last + 1, lo + _THREAD_BLOCK)
        for c in range(lo, hi):
            u0, u1, u2, u3 = _four(kind, c, keys[0, 0] & _MASK, keys[0, 1] & _MASK)
            g = gs[0]
            u0, u1, u2, u3 = u0 * g, u1 * g, u2 * g, u3 * g
            for d in range(1, q):
                z0, z1, z2, z3 = _four(kind, c, keys[d, 0] & _MASK, keys[d, 1] & _MASK)
                g = gs[d]
                u0, u1, u2, u3 = u0 + z0 * g, u1 + z1 * g, u2 + z2 * g, u3 + z3 * g
            if q > 1:
                u0, u1, u2, u3 = u0 / qf, u1 / qf, u2 / qf, u3 / qf
            if stochastic:
                r0, r1, r2, r3 = _philox(_U(c), sk0, sk1)
            else:
                r0 = r1 = r2 = r3 = _U(0)
            for lane in range(4):
                i = 4 * c + lane
                if i < n:
                    x = _load(theta, i)
                    step = _pick(u0, u1, u2, u3, lane)
                    if wd32 != _ZERO:
                        step = step + x * wd32
                    new = x - step * lr32
                    if stochastic:
                        _store_stochastic(theta, i, new, _F(_pick(r0, r1, r2, r3, lane) >> _SH8) * _TWO_M24)
                    else:
                        _store(theta, i, new)
