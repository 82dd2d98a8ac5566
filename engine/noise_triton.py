"""The noise generator and the fused ± perturbation pair as Triton kernels for CUDA tensors.

Same bits as engine/rng.py (version 2) and engine/noise_cpu.py, element for element. One program
takes BLOCK Philox counters (counter c gives elements 4c .. 4c+3, as in rng.py), computes the four
words of each and turns them into four noise values with rng.normal's float32 operation sequence:

  fill:          out[i] = noise / uniform of element start + i of a tensor's stream
  perturb_pair:  out+ = (θ + εz).to(dt), out- = (θ - εz).to(dt)   one read of θ, z never stored
  update:        θ ← round(θ - lr (Σ_d g_d z_d [/ q] + wd θ))      one read-modify-write, all q
                 directions and the stochastic-rounding uniforms drawn per counter (zo.apply_update)

Why this keeps the bits: kernels are launched with enable_fp_fusion=False, so no a*b+c becomes an
FMA; division is tl.div_rn and the square root tl.sqrt_rn (both correctly rounded: Triton's plain
`/` and tl.sqrt may be approximate on NVIDIA GPUs); every constant is a float32 value, so float32
arithmetic stays float32; Philox runs on uint64 lanes holding uint32 values (products < 2**64,
masks as rng.py), so no overflow rule of either side matters. -2 ln u1 is clamped with a compare
and select (as noise_cpu), so u1 = 1 gives +0.0 everywhere.

Kernels read and write elements at stride 4 (one counter per lane of the program); the four loads
or stores of a program touch the same cache lines, so memory traffic stays one pass over θ.
"""

from __future__ import annotations

import struct
from typing import Any

import torch
import triton
import triton.language as tl

from . import rng


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


GAUSSIAN, RADEMACHER, UNIFORM = 0, 1, 2
KIND_CODES = {"gaussian": GAUSSIAN, "rademacher": RADEMACHER}
MASK_DT_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # update_kernel's MASK_DT
# θ and output dtypes the kernels read and write (widening to float32 is exact; narrowing rounds
# to nearest even, as torch's .to()).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK = 256  # counters per program: 1024 elements

# Constants of rng.py's transforms, rounded to float32 from their definitions (as rng.py rounds them).
_LN2_HI: tl.constexpr = tl.constexpr(0.693145751953125)
_LN2_LO: tl.constexpr = tl.constexpr(_f32(0.6931471805599453 - 0.693145751953125))
_A11: tl.constexpr = tl.constexpr(_f32(2.0 / 11))
_A9: tl.constexpr = tl.constexpr(_f32(2.0 / 9))
_A7: tl.constexpr = tl.constexpr(_f32(2.0 / 7))
_A5: tl.constexpr = tl.constexpr(_f32(2.0 / 5))
_A3: tl.constexpr = tl.constexpr(_f32(2.0 / 3))
_S9: tl.constexpr = tl.constexpr(_f32(1 / 362880))
_S7: tl.constexpr = tl.constexpr(_f32(-1 / 5040))
_S5: tl.constexpr = tl.constexpr(_f32(1 / 120))
_S3: tl.constexpr = tl.constexpr(_f32(-1 / 6))
_C10: tl.constexpr = tl.constexpr(_f32(-1 / 3628800))
_C8: tl.constexpr = tl.constexpr(_f32(1 / 40320))
_C6: tl.constexpr = tl.constexpr(_f32(-1 / 720))
_C4: tl.constexpr = tl.constexpr(_f32(1 / 24))
_C2: tl.constexpr = tl.constexpr(-0.5)
_PHI_STEP: tl.constexpr = tl.constexpr(_f32(3.141592653589793 / 2**23))
_TWO_M24: tl.constexpr = tl.constexpr(2.0**-24)


@triton.jit
def _philox(c, k0, k1):
    """Philox4x32-10 of counters c (uint64 [BLOCK], counter (low word, high word, 0, 0)), key (k0, k1)."""
    mask = 0xFFFFFFFF
    c0 = c & mask
    c1 = c >> 32
    c2 = c0 * 0
    c3 = c0 * 0
    k0 = k0.to(tl.uint64) & mask
    k1 = k1.to(tl.uint64) & mask
    for _ in tl.static_range(10):
        p0 = c0 * 0xD2511F53  # < 2**64: exact
        p1 = c2 * 0xCD9E8D57
        n0 = (p1 >> 32) ^ c1 ^ k0
        n2 = (p0 >> 32) ^ c3 ^ k1
        c1 = p1 & mask
        c3 = p0 & mask
        c0 = n0
        c2 = n2
        k0 = (k0 + 0x9E3779B9) & mask
        k1 = (k1 + 0xBB67AE85) & mask
    return c0, c1, c2, c3


@triton.jit
def _radius(bits):
    """sqrt(-2 ln u1), u1 = ((bits >> 8) + 1) 2**-24: rng._neg2_log_u1, then a correctly rounded sqrt."""
    n = ((bits >> 8) + 1).to(tl.float32)  # <= 2**24: exact
    fb = n.to(tl.uint32, bitcast=True).to(tl.int64)
    frac = fb & 0x7FFFFF
    big = frac > 0x3504F3
    expo = (fb >> 23) - 127 + big.to(tl.int64) - 24
    m = (frac | tl.where(big, 0x3F000000, 0x3F800000)).to(tl.uint32).to(tl.float32, bitcast=True)
    f = m - 1.0
    s = tl.div_rn(f, f + 2.0)
    w = s * s
    acc = w * _A11 + _A9
    acc = acc * w + _A7
    acc = acc * w + _A5
    acc = acc * w + _A3
    log_m = s * 2.0 + (s * w) * acc
    e = expo.to(tl.float32)
    v = (e * _LN2_HI + (log_m + e * _LN2_LO)) * -2.0
    v = tl.where(v > 0.0, v, 0.0)
    return tl.sqrt_rn(v)


@triton.jit
def _sincos(bits):
    """(sin, cos) of 2 pi (bits >> 8) 2**-24 as rng._sincos_2pi computes them."""
    j = (bits >> 8).to(tl.int64)
    quadrant = j >> 22
    r = j & 0x3FFFFF
    upper = r > (1 << 21)
    r = tl.where(upper, (1 << 22) - r, r)
    phi = r.to(tl.float32) * _PHI_STEP
    w = phi * phi
    acc = w * _S9 + _S7
    acc = acc * w + _S5
    acc = acc * w + _S3
    sin_phi = phi + (phi * w) * acc
    acc = w * _C10 + _C8
    acc = acc * w + _C6
    acc = acc * w + _C4
    acc = acc * w + _C2
    cos_phi = w * acc + 1.0
    sin_psi = tl.where(upper, cos_phi, sin_phi)
    cos_psi = tl.where(upper, sin_phi, cos_phi)
    odd = (quadrant & 1) == 1
    sin_mag = tl.where(odd, cos_psi, sin_psi)
    cos_mag = tl.where(odd, sin_psi, cos_psi)
    sin_t = tl.where(quadrant >= 2, -sin_mag, sin_mag)
    cos_t = tl.where((quadrant == 1) | (quadrant == 2), -cos_mag, cos_mag)
    return sin_t, cos_t


@triton.jit
def _rademacher(bits):
    return 1.0 - 2.0 * (bits >> 31).to(tl.float32)


@triton.jit
def _uniform(bits):
    return (bits >> 8).to(tl.float32) * _TWO_M24


@triton.jit
def _four(c, k0, k1, KIND: tl.constexpr):
    """The four float32 [BLOCK] values of counters c (elements 4c .. 4c+3)."""
    b0, b1, b2, b3 = _philox(c, k0, k1)
    if KIND == 0:  # GAUSSIAN: Box-Muller on lane pairs (0, 1) and (2, 3)
        ra = _radius(b0)
        sa, ca = _sincos(b1)
        rb = _radius(b2)
        sb, cb = _sincos(b3)
        return ra * ca, ra * sa, rb * cb, rb * sb
    elif KIND == 1:  # RADEMACHER
        return _rademacher(b0), _rademacher(b1), _rademacher(b2), _rademacher(b3)
    else:  # UNIFORM
        return _uniform(b0), _uniform(b1), _uniform(b2), _uniform(b3)


@triton.jit
def _counters(start, count, BLOCK: tl.constexpr):
    """Counters of this program (uint64 [BLOCK]) and the element index 4c (int64 [BLOCK])."""
    first = start // 4
    idx = first + tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return idx.to(tl.uint64), idx * 4


@triton.jit
def fill_kernel(out, start, count, k0, k1, KIND: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] = value of element start + i (float32 [count]) of the stream with key (k0, k1)."""
    c, e = _counters(start, count, BLOCK)
    v0, v1, v2, v3 = _four(c, k0, k1, KIND)
    i = e - start  # out index of lane 0
    tl.store(out + i, v0, mask=(i >= 0) & (i < count))
    tl.store(out + i + 1, v1, mask=(i + 1 >= 0) & (i + 1 < count))
    tl.store(out + i + 2, v2, mask=(i + 2 >= 0) & (i + 2 < count))
    tl.store(out + i + 3, v3, mask=(i + 3 < count))


@triton.jit
def _widen(x):
    """float32 of a loaded value; bfloat16 by its bits (a shift: exact, as torch)."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _narrow(x, dtype: tl.constexpr):
    """float32 x rounded to nearest even into dtype. bfloat16 on the bits (c10::BFloat16's rule; the
    same as the GPU's cvt.rn.bf16.f32 except NaN payloads: every NaN becomes 0x7FC0), because the
    interpreter's own bfloat16 cast does not round to nearest even."""
    if dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(x != x, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def _pair_lane(theta, out_p, out_m, i, n, z, scale, PAIR: tl.constexpr):
    m = i < n
    x = _widen(tl.load(theta + i, mask=m))
    dz = z * scale
    tl.store(out_p + i, _narrow(x + dz, out_p.dtype.element_ty), mask=m)
    if PAIR:
        tl.store(out_m + i, _narrow(x - dz, out_m.dtype.element_ty), mask=m)


@triton.jit
def perturb_pair_kernel(
    theta, out_p, out_m, n, k0, k1, scale, KIND: tl.constexpr, PAIR: tl.constexpr, BLOCK: tl.constexpr
):
    """out± = (θ ± scale·z).to(out dtype) over θ [n]; θ read once, z never stored. PAIR=False: out+
    alone (out_m unused). θ - scale·z equals zo.perturbed's θ + (-scale)·z: negation is exact."""
    c, i = _counters(0, n, BLOCK)
    z0, z1, z2, z3 = _four(c, k0, k1, KIND)
    _pair_lane(theta, out_p, out_m, i, n, z0, scale, PAIR)
    _pair_lane(theta, out_p, out_m, i + 1, n, z1, scale, PAIR)
    _pair_lane(theta, out_p, out_m, i + 2, n, z2, scale, PAIR)
    _pair_lane(theta, out_p, out_m, i + 3, n, z3, scale, PAIR)


@triton.jit
def perturb_pairs_kernel(
    theta, out_p, out_m, tensors, programs, scale, KIND: tl.constexpr, PAIR: tl.constexpr, BLOCK: tl.constexpr
):
    """perturb_pair_kernel over many tensors in one launch (LoRA's factors: hundreds of small tensors).
    θ, out+ and out- hold the tensors packed one after another; tensors int64 [T, 4] = (offset, n, k0,
    k1) per tensor; programs int64 [P, 2] = (tensor, first counter) per program. Each tensor keeps its
    own stream: element j of tensor t is value j of key (k0, k1), as a launch of its own gives it."""
    pid = tl.program_id(0).to(tl.int64)
    t = tl.load(programs + 2 * pid)
    first = tl.load(programs + 2 * pid + 1)
    off = tl.load(tensors + 4 * t)
    n = tl.load(tensors + 4 * t + 1)
    k0 = tl.load(tensors + 4 * t + 2)
    k1 = tl.load(tensors + 4 * t + 3)
    idx = first + tl.arange(0, BLOCK).to(tl.int64)
    i = idx * 4  # element of lane 0 within the tensor
    z0, z1, z2, z3 = _four(idx.to(tl.uint64), k0, k1, KIND)
    th, op, om = theta + off, out_p + off, out_m + off
    _pair_lane(th, op, om, i, n, z0, scale, PAIR)
    _pair_lane(th, op, om, i + 1, n, z1, scale, PAIR)
    _pair_lane(th, op, om, i + 2, n, z2, scale, PAIR)
    _pair_lane(th, op, om, i + 3, n, z3, scale, PAIR)


@triton.jit
def _stochastic_bf16(x, u):
    """zo.stochastic_round of float32 x to bfloat16 with uniforms u, on the bits (noise_cpu's
    _stochastic_bf16): the upper neighbour with probability (x - lo) / (hi - lo), exact values and
    ±inf kept, saturation at the largest finite value, every NaN as 0x7FC0."""
    b = x.to(tl.uint32, bitcast=True)
    near = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    near32 = (near << 16).to(tl.float32, bitcast=True)
    up = near32 < x
    negative = ((near >> 15) & 1) == 1
    other = tl.where(up == negative, near - 1, near + 1)  # one step away from zero when moving outward
    lo = tl.where(up, near, other)
    hi = tl.where(up, other, near)
    lo32 = (lo << 16).to(tl.float32, bitcast=True)
    p_hi = tl.div_rn(x - lo32, (hi << 16).to(tl.float32, bitcast=True) - lo32)
    out = tl.where(u < p_hi, hi, lo)
    out = tl.where(near32 == x, near, out)
    out = tl.where(x != x, 0x7FC0, out)
    return out.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _update_lane(theta, i, n, upd, u, lr, wd, DECAY: tl.constexpr, STOCHASTIC: tl.constexpr):
    m = i < n
    x = _widen(tl.load(theta + i, mask=m))
    step = upd
    if DECAY:
        step = upd + x * wd
    new = x - step * lr
    if STOCHASTIC:
        tl.store(theta + i, _stochastic_bf16(new, u), mask=m)
    else:
        tl.store(theta + i, _narrow(new, theta.dtype.element_ty), mask=m)


@triton.jit
def _as_computed(x, DT: tl.constexpr):
    """float32 x rounded to the compute dtype (MASK_DT_CODES) and widened back."""
    if DT == 1:
        return _widen(_narrow(x, tl.bfloat16))
    elif DT == 2:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _term(x, z, g, eps, MASK: tl.constexpr, MASK_DT: tl.constexpr):
    """g z, or +0 where the coordinate's perturbed copies are equal in the compute dtype (zo.UpdateMask;
    MASK 1: θ+εz vs θ-εz, 2: θ+εz vs θ)."""
    t = z * g
    if MASK != 0:
        dz = z * eps
        a = _as_computed(x + dz, MASK_DT)
        b = _as_computed(x - dz, MASK_DT) if MASK == 1 else _as_computed(x, MASK_DT)
        t = tl.where(a != b, t, 0.0)
    return t


@triton.jit
def update_kernel(
    theta,
    keys,
    gs,
    q,
    n,
    lr,
    wd,
    sk0,
    sk1,
    eps,
    KIND: tl.constexpr,
    DECAY: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    MASK: tl.constexpr,
    MASK_DT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """θ ← round(θ - lr (mean_d g_d z_d + wd θ)) in place over θ [n], in zo._update_torch's order:
    u = g_0 z_0, u = u + g_d z_d, u = u / q (q > 1), step = u + θ wd (DECAY), new = θ - step lr.
    keys: int64 [q, 2] Philox keys of the directions' z; gs: float32 [q]; (sk0, sk1): key of the
    stochastic-rounding uniforms (stream 1), used when STOCHASTIC (bfloat16 θ only). MASK (0 none,
    1 pair, 2 one-sided), MASK_DT (0 float32, 1 bfloat16, 2 float16), eps: zo.UpdateMask."""
    c, i = _counters(0, n, BLOCK)
    g = tl.load(gs)
    z0, z1, z2, z3 = _four(c, tl.load(keys), tl.load(keys + 1), KIND)
    x0, x1, x2, x3 = z0, z1, z2, z3  # θ before the update, read only with a mask
    if MASK != 0:
        x0 = _widen(tl.load(theta + i, mask=i < n, other=0.0))
        x1 = _widen(tl.load(theta + i + 1, mask=i + 1 < n, other=0.0))
        x2 = _widen(tl.load(theta + i + 2, mask=i + 2 < n, other=0.0))
        x3 = _widen(tl.load(theta + i + 3, mask=i + 3 < n, other=0.0))
    u0 = _term(x0, z0, g, eps, MASK, MASK_DT)
    u1 = _term(x1, z1, g, eps, MASK, MASK_DT)
    u2 = _term(x2, z2, g, eps, MASK, MASK_DT)
    u3 = _term(x3, z3, g, eps, MASK, MASK_DT)
    for d in range(1, q):
        g = tl.load(gs + d)
        z0, z1, z2, z3 = _four(c, tl.load(keys + 2 * d), tl.load(keys + 2 * d + 1), KIND)
        u0 = u0 + _term(x0, z0, g, eps, MASK, MASK_DT)
        u1 = u1 + _term(x1, z1, g, eps, MASK, MASK_DT)
        u2 = u2 + _term(x2, z2, g, eps, MASK, MASK_DT)
        u3 = u3 + _term(x3, z3, g, eps, MASK, MASK_DT)
    if q > 1:
        qf = q.to(tl.float32)  # exact for any realistic direction count (< 2**24)
        u0, u1, u2, u3 = tl.div_rn(u0, qf), tl.div_rn(u1, qf), tl.div_rn(u2, qf), tl.div_rn(u3, qf)
    r0, r1, r2, r3 = u0, u1, u2, u3  # unused unless STOCHASTIC
    if STOCHASTIC:
        r0, r1, r2, r3 = _four(c, sk0, sk1, 2)
    _update_lane(theta, i, n, u0, r0, lr, wd, DECAY, STOCHASTIC)
    _update_lane(theta, i + 1, n, u1, r1, lr, wd, DECAY, STOCHASTIC)
    _update_lane(theta, i + 2, n, u2, r2, lr, wd, DECAY, STOCHASTIC)
    _update_lane(theta, i + 3, n, u3, r3, lr, wd, DECAY, STOCHASTIC)


def _grid(start: int, count: int) -> tuple[int]:
    counters = (start + count - 1) // 4 - start // 4 + 1
    return (triton.cdiv(counters, BLOCK),)


def _fill(
    code: int, key: tuple[int, int], start: int, count: int, device: torch.device | str
) -> torch.Tensor:
    rng._check_range(start, count)  # noqa: SLF001 - the same error as rng's functions
    out = torch.empty(count, dtype=torch.float32, device=device)
    if count:
        fill_kernel[_grid(start, count)](
            out, start, count, key[0], key[1], KIND=code, BLOCK=BLOCK, enable_fp_fusion=False
        )
    return out


def noise(
    kind: str, seed: int, name: str, start: int, count: int, device: torch.device | str
) -> torch.Tensor:
    """float32 [count] = rng.normal / rng.rademacher (kind) of elements [start, start+count)."""
    return _fill(KIND_CODES[kind], rng.tensor_key(seed, name, 0), start, count, device)


def uniform(
    seed: int, name: str, start: int, count: int, device: torch.device | str, stream: int = 1
) -> torch.Tensor:
    """float32 [count] = rng.uniform(seed, name, start, count, device, stream)."""
    return _fill(UNIFORM, rng.tensor_key(seed, name, stream), start, count, device)


def perturb_pair(
    theta: torch.Tensor, kind: str, seed: int, name: str, scale: float, out_dtype: torch.dtype, pair: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(θ + scale·z, θ - scale·z if pair) as new [numel] tensors of out_dtype; θ contiguous, of DTYPES.

    scale must be a float32 value (zo.f32)."""
    n = theta.numel()
    flat = theta.reshape(-1)
    plus = torch.empty(n, dtype=out_dtype, device=theta.device)
    minus = torch.empty(n if pair else 0, dtype=out_dtype, device=theta.device)
    if n:
        k0, k1 = rng.tensor_key(seed, name, 0)
        perturb_pair_kernel[_grid(0, n)](
            flat,
            plus,
            minus if pair else plus,
            n,
            k0,
            k1,
            scale,
            KIND=KIND_CODES[kind],
            PAIR=pair,
            BLOCK=BLOCK,
            enable_fp_fusion=False,
        )
    return plus, (minus if pair else None)


def perturb_pairs(
    thetas: list[torch.Tensor],
    kind: str,
    keys: list[tuple[int, int]],
    scale: float,
    out_dtype: torch.dtype,
    pair: bool,
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """perturb_pair of every tensor (its stream key from rng.tensor_key) in one kernel launch: per
    tensor (θ + scale·z, θ - scale·z if pair) as [numel] views of two packed buffers. θs: contiguous,
    of one dtype of DTYPES, on one device; scale a float32 value (zo.f32)."""
    flats = [t.reshape(-1) for t in thetas]
    sizes = [f.numel() for f in flats]
    offsets = [sum(sizes[:j]) for j in range(len(sizes))]
    total = sum(sizes)
    device = thetas[0].device
    packed = torch.cat(flats) if len(flats) > 1 else flats[0]  # one copy kernel for all of them
    plus = torch.empty(total, dtype=out_dtype, device=device)
    minus = torch.empty(total if pair else 0, dtype=out_dtype, device=device)
    table = [[o, n, k0, k1] for o, n, (k0, k1) in zip(offsets, sizes, keys, strict=True)]
    programs = [
        [t, b * BLOCK] for t, n in enumerate(sizes) for b in range(triton.cdiv(triton.cdiv(n, 4), BLOCK))
    ]
    if programs:
        # Built on the host and sent asynchronously (torch.tensor(..., device=cuda) would synchronise).
        tensors_t = torch.tensor(table, dtype=torch.int64).to(device, non_blocking=True)
        programs_t = torch.tensor(programs, dtype=torch.int64).to(device, non_blocking=True)
        perturb_pairs_kernel[(len(programs),)](
            packed,
            plus,
            minus if pair else plus,
            tensors_t,
            programs_t,
            scale,
            KIND=KIND_CODES[kind],
            PAIR=pair,
            BLOCK=BLOCK,
            enable_fp_fusion=False,
        )
    return [
        (plus[o : o + n], minus[o : o + n] if pair else None) for o, n in zip(offsets, sizes, strict=True)
    ]


def update(
    theta: torch.Tensor,
    name: str,
    coefs: list[tuple[int, float]],
    lr: float,
    wd: float,
    kind: str,
    stochastic: bool,
    sr_seed: int | None,
    mask: Any = None,
) -> None:
    """θ ← round(θ - lr (mean_d g_d z_d + wd θ)) in place (wd 0: no decay) for a contiguous θ of
    DTYPES; stochastic rounding only for bfloat16 (engine/fused.py sends float16 to the torch path).
    coefs: (step seed, g) with g, lr and wd float32 values (zo.f32); mask: a zo.UpdateMask or None."""
    n = theta.numel()
    if n == 0:
        return
    keys = torch.tensor(
        [rng.tensor_key(s, name, 0) for s, _ in coefs], dtype=torch.int64, device=theta.device
    )
    gs = torch.tensor([g for _, g in coefs], dtype=torch.float32, device=theta.device)
    sk0, sk1 = rng.tensor_key(sr_seed, name, 1) if stochastic and sr_seed is not None else (0, 0)
    update_kernel[_grid(0, n)](
        theta.view(-1),
        keys,
        gs,
        len(coefs),
        n,
        lr,
        wd,
        sk0,
        sk1,
        _f32(mask.eps) if mask is not None else 1.0,
        KIND=KIND_CODES[kind],
        DECAY=wd != 0.0,
        STOCHASTIC=stochastic,
        MASK=0 if mask is None else (2 if mask.one_sided else 1),
        MASK_DT=0 if mask is None else MASK_DT_CODES[mask.dtype],
        BLOCK=BLOCK,
        enable_fp_fusion=False,
    )
