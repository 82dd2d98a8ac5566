"""The noise generator and the fused ZO kernels compiled for the CPU (numba, no fastmath).

Same bits as engine/rng.py (version 2) and engine/zo.py, element for element: each kernel walks
the Philox counters of a tensor's stream (counter c gives elements 4c..4c+3), turns the four words
into four noise values with the same float32 operation sequence as rng.normal, and uses them at
once, so z is never materialised:

  perturb_pair:  out+ = (θ + εz).to(dt), out- = (θ - εz).to(dt)   one read of θ, one z
  update:        θ ← round(θ - lr (Σ_d g_d z_d [/ q] + wd θ))      one read-modify-write, all q
                 directions and the stochastic-rounding uniforms drawn in the same counter loop;
                 with a mask, g_d z_d only where θ's perturbed copies differ (zo.UpdateMask)

Why this keeps the bits: numba compiles without fastmath, so LLVM never contracts a*b+c into an
FMA nor reassociates; error_model="numpy" makes x/0 IEEE (inf/nan, as torch) instead of a raised
ZeroDivisionError, whose check would also stop LLVM from vectorising the loops; every constant is
a float32 global, so float32 arithmetic stays float32 (a Python float constant would promote the
expression to float64); sqrt is the IEEE sqrt instruction, correctly rounded. The code is
compiled for the CPU it runs on (AVX-512, AVX2, ...): IEEE operations round the same at every
vector width. tests/engine/test_fused.py checks all of it against the independent numpy
reference and the torch generator. bfloat16 tensors travel as their uint16 bit patterns (numba has
no bfloat16): widening is a shift, narrowing is round-to-nearest-even on the bits (as torch does).

Each kernel fills an L1-sized buffer with the noise of `_BLOCK` elements (a flat loop over
counters that LLVM vectorises), then runs its element loop over it. Kernels release the GIL and
take an element range, so engine/fused.py splits big tensors over a few Python threads (numba's
own parallel layers share OpenMP with torch and change its thread count). Every element is
computed independently, so neither the blocking nor the split changes a value.
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
_BLOCK = 1024  # elements per noise buffer: z of one block stays in L1

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


@nb.njit(inline="always", error_model="numpy")
def _bf16_to_f32(h):
    return _bits_f32(_U(h) << _SH16)


@nb.njit(inline="always", error_model="numpy")
def _f32_to_bf16(x):
    """Round to nearest even on the bits (c10::BFloat16). Every NaN becomes the quiet 0x7FC0: NaN
    payloads are not part of the contract (torch itself writes 0x7FC0 or 0xFFFF)."""
    b = _f32_bits(x)
    r = np.uint16((b + _U(0x7FFF) + ((b >> _SH16) & _U(1))) >> _SH16)
    return np.uint16(0x7FC0) if x != x else r


def _load(a, i):  # numba overload below: element i of a tensor as float32
    raise NotImplementedError


@overload(_load, jit_options={"error_model": "numpy"})
def _load_impl(a, i):
    if a.dtype == types.uint16:
        return lambda a, i: _bf16_to_f32(a[i])
    if a.dtype == types.float32:
        return lambda a, i: a[i]
    return None


def _store(a, i, x):  # numba overload below: float32 x into element i, rounded to nearest
    raise NotImplementedError


@overload(_store, jit_options={"error_model": "numpy"})
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


@nb.njit(inline="always", error_model="numpy")
def _philox(c, k0, k1):
    """Philox4x32-10 of counter (c low word, c high word, 0, 0) under key (k0, k1)."""
    c0, c1, c2, c3 = c & _MASK, c >> _SH32, _U(0), _U(0)
    for _ in range(10):
        p0, p1 = c0 * _M0, c2 * _M1  # < 2**64: exact
        c0, c1, c2, c3 = ((p1 >> _SH32) ^ c1 ^ k0), p1 & _MASK, ((p0 >> _SH32) ^ c3 ^ k1), p0 & _MASK
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return c0, c1, c2, c3


@nb.njit(inline="always", error_model="numpy")
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


@nb.njit(inline="always", error_model="numpy")
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


@nb.njit(inline="always", error_model="numpy")
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


@nb.njit(inline="always", error_model="numpy")
def _gen(kind, c0, ncount, k0, k1, buf):
    """buf[4j + lane] = noise of element 4 (c0 + j) + lane, j < ncount (a flat loop LLVM vectorises)."""
    for j in range(ncount):
        v0, v1, v2, v3 = _four(kind, c0 + j, k0, k1)
        buf[4 * j] = v0
        buf[4 * j + 1] = v1
        buf[4 * j + 2] = v2
        buf[4 * j + 3] = v3


@nb.njit(inline="always", error_model="numpy")
def _gen_uniform(c0, ncount, k0, k1, buf):
    """buf[4j + lane] = (bits >> 8) 2**-24 of element 4 (c0 + j) + lane (rng.uniform)."""
    for j in range(ncount):
        b0, b1, b2, b3 = _philox(_U(c0 + j), k0, k1)
        buf[4 * j] = _F(b0 >> _SH8) * _TWO_M24
        buf[4 * j + 1] = _F(b1 >> _SH8) * _TWO_M24
        buf[4 * j + 2] = _F(b2 >> _SH8) * _TWO_M24
        buf[4 * j + 3] = _F(b3 >> _SH8) * _TWO_M24


@nb.njit(nogil=True, cache=True, error_model="numpy")
def fill_noise(kind, k0, k1, start, out):
    """out[i] = noise of element start + i (kind GAUSSIAN / RADEMACHER, key (k0, k1), stream's key)."""
    _fill(kind, False, k0, k1, start, out)


@nb.njit(nogil=True, cache=True, error_model="numpy")
def fill_uniform(k0, k1, start, out):
    """out[i] = (bits >> 8) * 2**-24 of element start + i (rng.uniform; key of stream 1)."""
    _fill(GAUSSIAN, True, k0, k1, start, out)


@nb.njit(inline="always", error_model="numpy")
def _fill(kind, uniform, k0, k1, start, out):
    n = out.shape[0]
    if n == 0:
        return
    k0, k1 = _U(k0) & _MASK, _U(k1) & _MASK
    first = start // 4
    span = start + n - 4 * first  # elements from counter `first` on
    buf = np.empty(_BLOCK, np.float32)
    for b in range(0, span, _BLOCK):
        m = min(_BLOCK, span - b)
        if uniform:
            _gen_uniform(first + b // 4, (m + 3) // 4, k0, k1, buf)
        else:
            _gen(kind, first + b // 4, (m + 3) // 4, k0, k1, buf)
        off = 4 * first + b - start  # out index of buf[0]
        for j in range(max(0, -off), m):
            out[off + j] = buf[j]


# ---- fused ZO kernels ------------------------------------------------------------------------------


@nb.njit(nogil=True, cache=True, error_model="numpy")
def perturb_pair(theta, kind, k0, k1, scale, out_plus, out_minus, lo, hi):
    """out± = (θ ± scale·z) rounded to the outputs' dtype; θ [n] (bf16 bits or float32), read once.

    scale is ε as a float32; θ - scale·z equals zo.perturbed's θ + (-scale)·z (negation is exact).
    An empty out_minus asks for out+ alone. Only elements [lo, hi) are written (lo a multiple of 4):
    threads split a tensor this way (engine/fused.py). z lives only in an L1-sized buffer."""
    n = theta.shape[0]
    if n == 0:
        return
    if out_plus.shape[0] != n or out_minus.shape[0] not in (0, n):
        raise ValueError("perturb_pair: outputs must have theta's length (out_minus: or 0)")
    pair = out_minus.shape[0] == n
    k0, k1 = _U(k0) & _MASK, _U(k1) & _MASK
    sc = _F(scale)
    hi = min(hi, n)
    z = np.empty(_BLOCK, np.float32)
    for b in range(lo, hi, _BLOCK):
        m = min(_BLOCK, hi - b)
        _gen(kind, b // 4, (m + 3) // 4, k0, k1, z)
        th, op = theta[b : b + m], out_plus[b : b + m]  # index from 0 (see _write_stochastic)
        if pair:
            om = out_minus[b : b + m]
            for j in range(m):
                x = _load(th, j)
                dz = z[j] * sc
                _store(op, j, x + dz)
                _store(om, j, x - dz)
        else:
            for j in range(m):
                _store(op, j, _load(th, j) + z[j] * sc)


@nb.njit(inline="always", error_model="numpy")
def _stochastic_bf16(x, u):
    """zo.stochastic_round of one float32 to bf16 bits: the upper neighbour with probability
    (x - lo) / (hi - lo), exact values (and ±inf) kept, saturation at the largest finite value.
    Branch-free (selects), so the loop around it vectorises."""
    b = _f32_bits(x)
    near = (b + _U(0x7FFF) + ((b >> _SH16) & _U(1))) >> _SH16  # bf16 bits, held in uint64 lanes
    near32 = _bits_f32(near << _SH16)
    up = near32 < x
    # nextafter in bf16 toward ±inf: one step up in magnitude when moving away from zero.
    negative = (near >> _U(15)) & _U(1)
    other = near - _U(1) if up == (negative == _U(1)) else near + _U(1)
    lo = near if up else other
    hi = other if up else near
    lo32 = _bits_f32(lo << _SH16)
    p_hi = (x - lo32) / (_bits_f32(hi << _SH16) - lo32)
    out = hi if u < p_hi else lo
    out = near if near32 == x else out
    return np.uint16(0x7FC0) if x != x else np.uint16(out & _U(0xFFFF))


# Update masks (zo.UpdateMask): which perturbed copies a coordinate must tell apart to take a direction's
# update. MASK_NONE: every coordinate (logs written before masks); MASK_PAIR: θ+εz vs θ-εz (mezo);
# MASK_ONE_SIDED: θ+εz vs θ itself (fzoo's unperturbed pass), all rounded to the compute dtype.
MASK_NONE, MASK_PAIR, MASK_ONE_SIDED = 0, 1, 2


@nb.njit(inline="always", error_model="numpy")
def _as_computed(dt, v):
    """float32 v as the forwards saw it: rounded to the compute dtype (BF16 or F32) and widened back."""
    return _bf16_to_f32(_f32_to_bf16(v)) if dt == BF16 else v


@nb.njit(nogil=True, error_model="numpy")
def _add_direction(th, m, z, g, upd, first, mask, mask_dt, eps32):
    """upd[j] (= if first) += z[j] g where coordinate j's perturbed copies differ (all j without a mask).
    A separate function, compiled on its own, like the write-back loops below."""
    if mask == MASK_NONE:
        if first:
            for j in range(m):
                upd[j] = z[j] * g
        else:
            for j in range(m):
                upd[j] = upd[j] + z[j] * g
        return
    for j in range(m):
        x = _load(th, j)
        dz = z[j] * eps32
        a = _as_computed(mask_dt, x + dz)
        b = _as_computed(mask_dt, x - dz) if mask == MASK_PAIR else _as_computed(mask_dt, x)
        term = z[j] * g if a != b else _ZERO  # a NaN copy differs from everything: kept
        upd[j] = term if first else upd[j] + term


@nb.njit(nogil=True, cache=True, error_model="numpy")
def update(theta, kind, keys, gs, lr, wd, stochastic, sr_k0, sr_k1, lo, hi, mask, mask_dt, eps):
    """θ ← θ - lr (mean_d g_d z_d + wd θ) in place, then round (nearest, or stochastic for bf16 bits).

    keys: uint64 [q, 2] Philox keys of the directions' z; gs: float32 [q]; wd = 0 means no decay;
    stochastic only for a bfloat16 θ (uint16 bits). mask (MASK_*), mask_dt (BF16/F32), eps: a direction's
    term is 0 where the coordinate's perturbed copies (θ ± eps z, computed from this θ before the update)
    round to the same value in mask_dt.
    Per element, in zo.apply_update's order: u = g_0 z_0, u = u + g_d z_d, u = u / q (q > 1),
    u = u + θ wd (wd != 0), new = θ - u lr. Only elements [lo, hi) (lo a multiple of 4)."""
    n = theta.shape[0]
    q = keys.shape[0]
    if n == 0:
        return
    lr32, wd32, qf, eps32 = _F(lr), _F(wd), _F(q), _F(eps)
    sk0, sk1 = _U(sr_k0) & _MASK, _U(sr_k1) & _MASK
    hi = min(hi, n)
    upd = np.empty(_BLOCK, np.float32)
    z = np.empty(_BLOCK, np.float32)
    uni = np.empty(_BLOCK, np.float32)
    for b in range(lo, hi, _BLOCK):
        m = min(_BLOCK, hi - b)
        c0, nc = b // 4, (m + 3) // 4
        th = theta[b : b + m]
        for d in range(q):
            _gen(kind, c0, nc, keys[d, 0] & _MASK, keys[d, 1] & _MASK, z)
            _add_direction(th, m, z, gs[d], upd, d == 0, mask, mask_dt, eps32)
        if q > 1:
            for j in range(m):
                upd[j] = upd[j] / qf
        if stochastic:
            _gen_uniform(c0, nc, sk0, sk1, uni)
            _write_stochastic(theta, b, m, upd, uni, wd32, lr32)
        else:
            _write_nearest(theta, b, m, upd, wd32, lr32)


# The write-back loops are separate functions (not inlined into update): compiled on their own they
# vectorise; inlined into the kernel with the noise loops, the stochastic one ran 4x slower.
@nb.njit(nogil=True, error_model="numpy")
def _write_stochastic(theta, b, m, upd, uni, wd32, lr32):
    th = theta[b : b + m]  # index from 0: a base + j index gets numba's negative-index check, no SIMD
    for j in range(m):
        x = _load(th, j)
        step = upd[j] + x * wd32 if wd32 != _ZERO else upd[j]
        th[j] = _stochastic_bf16(x - step * lr32, uni[j])  # bf16 bits only


@nb.njit(nogil=True, error_model="numpy")
def _write_nearest(theta, b, m, upd, wd32, lr32):
    th = theta[b : b + m]
    for j in range(m):
        x = _load(th, j)
        step = upd[j] + x * wd32 if wd32 != _ZERO else upd[j]
        _store(th, j, x - step * lr32)
