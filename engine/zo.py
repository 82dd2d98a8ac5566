"""Pure zeroth-order math (MeZO SPSA): perturb, projected gradient, update, stochastic rounding.

    L± = loss(θ ± ε z),   g = (L+ - L-) / (2ε),   θ ← θ - η (mean_d g_d z_d + λ θ)

z comes from `rng.noise` chunk by chunk over the flattened tensor, so no whole-model z is ever
held and results do not depend on the chunk size. Scalars that the update log stores (g, η) are
float32 values and all tensor math runs in float32 with one rounding per op (no fused
multiply-add, no division by a host scalar, which CUDA turns into a reciprocal multiply), so the
same inputs give the same bits on every device (invariants 3-5).

Where engine/fused.py has a kernel for the tensor (CPU float32/bfloat16; CUDA
float32/bfloat16/float16 with Triton installed), they run there instead: z drawn per
Philox counter and used at once, never held, same bits as the chunked torch code below (which
stays the specification and the path for other devices and dtypes).
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass

import torch

from . import fused
from .rng import NOISE_KINDS, noise, uniform

ROUNDING_MODES = ("nearest", "stochastic")
_NO_DECAY_MARKERS = ("bias", "norm", "ln_", "layernorm", "layer_norm")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass
class NoiseStats:
    """Noise elements drawn by perturbed/perturbed_pair/apply_update in this process (z per direction,
    stochastic-rounding uniforms), and host seconds spent in those calls (on CUDA: launch time only).
    The one mutable thing here: bench/zo.py reads it to report noise per parameter and step."""

    elements: int = 0
    seconds: float = 0.0


NOISE = NoiseStats()


@dataclass(frozen=True)
class UpdateMask:
    """Which coordinates take a direction's update: those whose perturbed copies the forwards could tell
    apart. With bf16 compute, θ ± εz rounds back to θ for many coordinates (30 % of SmolLM2's matrix
    coordinates at ε 1e-3, bench/RESULTS.md): they play no part in L+ - L-, and giving them lr·g·z anyway
    is a random walk. A direction's term g_d z_d is 0 where

        one_sided False (mezo):  (θ + εz).to(dtype) == (θ - εz).to(dtype)
        one_sided True  (fzoo):  (θ + εz).to(dtype) == θ.to(dtype)          (its unperturbed pass)

    with θ the master before the update (what the step's forwards perturbed), εz in float32 as
    `perturbed` computes it, and == a comparison of numbers (a NaN copy differs from everything). A pure
    function of θ, ε, z and dtype: replay reproduces it. The log header records it (header_entry);
    logs without the entry were trained, and replay, without a mask."""

    eps: float
    dtype: torch.dtype  # the dtype of the perturbed copies (compute dtype; float32 for LoRA)
    one_sided: bool

    def header_entry(self) -> dict[str, str]:
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "copies": "one-sided" if self.one_sided else "pair",
        }

    @staticmethod
    def from_header(entry: dict | None, eps: float) -> UpdateMask | None:
        if entry is None:
            return None
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if entry.get("dtype") not in dtypes or entry.get("copies") not in ("pair", "one-sided"):
            raise ValueError(f"update_mask: unknown entry {entry!r} (a log from a newer build?)")
        return UpdateMask(eps, dtypes[entry["dtype"]], entry["copies"] == "one-sided")


def f32(x: float) -> float:
    """Round a Python float to the nearest float32 value (overflow → ±inf, nan stays nan)."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:  # |x| rounds past float32 max
        return math.copysign(math.inf, x)


def _check_chunk(chunk: int) -> None:
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 elements, got {chunk}")


def _check_kind(kind: str) -> None:
    if kind not in NOISE_KINDS:
        raise ValueError(f"noise kind must be one of {', '.join(NOISE_KINDS)}, got {kind!r}")


def _check_eps(eps: float) -> None:
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps}")


def perturbed(
    theta: torch.Tensor,
    kind: str,
    seed: int,
    name: str,
    eps: float,
    sign: int,
    out_dtype: torch.dtype,
    chunk: int = 1 << 22,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """A NEW tensor (theta.shape, out_dtype) = (theta.float() + sign * eps * z).to(out_dtype).

    theta is only read (invariant 2: the master is never perturbed). seed is the step seed.
    out: a flat contiguous [numel] out_dtype buffer the fused CPU kernel writes into instead of a new
    tensor (engine/workspace.py); other paths ignore it. Same values either way.
    """
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    _check_eps(eps)
    _check_kind(kind)
    _check_chunk(chunk)
    scale = f32(sign * f32(eps))  # exact: sign is ±1
    t0 = time.perf_counter()
    flat = theta.reshape(-1)  # [numel]; a view when contiguous, never written
    bufs = _check_out(flat, out_dtype, (out, None)) if out is not None else None
    fast = fused.perturb_pair(flat, kind, seed, name, scale, out_dtype, pair=False, out=bufs)
    res = (
        fast[0]
        if fast is not None
        else _perturbed_torch(flat, kind, seed, name, (scale,), out_dtype, chunk)[0]
    )
    NOISE.elements += flat.numel()
    NOISE.seconds += time.perf_counter() - t0
    return res.view(theta.shape)


def perturbed_pair(
    theta: torch.Tensor,
    kind: str,
    seed: int,
    name: str,
    eps: float,
    out_dtype: torch.dtype,
    chunk: int = 1 << 22,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(perturbed(..., +1, ...), perturbed(..., -1, ...)) from one draw of z and one read of theta.
    out: (plus, minus) buffers as `perturbed`'s out."""
    _check_eps(eps)
    _check_kind(kind)
    _check_chunk(chunk)
    scale = f32(eps)
    t0 = time.perf_counter()
    flat = theta.reshape(-1)
    bufs = _check_out(flat, out_dtype, out) if out is not None else None
    fast = fused.perturb_pair(flat, kind, seed, name, scale, out_dtype, pair=True, out=bufs)
    if fast is not None:
        plus, minus = fast
    else:
        plus, minus = _perturbed_torch(flat, kind, seed, name, (scale, -scale), out_dtype, chunk)
    NOISE.elements += flat.numel()
    NOISE.seconds += time.perf_counter() - t0
    return plus.view(theta.shape), minus.view(theta.shape)  # type: ignore[union-attr]


def perturbed_pairs(
    named: dict[str, torch.Tensor],
    kind: str,
    seed: int,
    eps: float,
    out_dtype: torch.dtype,
    pair: bool = True,
) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None:
    """{name: (θ + εz, θ - εz or None without pair)} for many tensors in one kernel launch, the values of
    perturbed_pair / perturbed tensor by tensor; None where no multi-tensor kernel runs (then call those
    per tensor). For LoRA's many small factors on CUDA, where launches, not elements, are the cost."""
    _check_eps(eps)
    _check_kind(kind)
    t0 = time.perf_counter()
    names = list(named)
    thetas = [named[n] for n in names]
    res = fused.perturb_pairs(thetas, kind, seed, names, f32(eps), out_dtype, pair)
    if res is None:
        return None
    NOISE.elements += sum(t.numel() for t in thetas)
    NOISE.seconds += time.perf_counter() - t0
    return {
        n: (p.view(t.shape), None if m is None else m.view(t.shape))
        for n, t, (p, m) in zip(names, thetas, res, strict=True)
    }


def _check_out(flat: torch.Tensor, dtype: torch.dtype, out: tuple) -> tuple:
    for t in out:
        if t is not None and not (
            t.dtype == dtype and t.dim() == 1 and t.numel() == flat.numel() and t.is_contiguous()
        ):
            raise ValueError(
                f"out: flat contiguous {dtype} buffers of {flat.numel()} elements, got {t.shape}"
            )
    return out


def _perturbed_torch(
    flat: torch.Tensor,
    kind: str,
    seed: int,
    name: str,
    scales: tuple[float, ...],
    out_dtype: torch.dtype,
    chunk: int,
) -> list[torch.Tensor]:
    """[(flat.float() + s * z).to(out_dtype) for s in scales], z drawn once per chunk."""
    n = flat.numel()
    outs = [torch.empty(n, dtype=out_dtype, device=flat.device) for _ in scales]
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        z = noise(kind, seed, name, n, start, count, device=flat.device)  # float32 [count]
        x = flat[start : start + count].float()
        for out, s in zip(outs, scales, strict=True):
            out[start : start + count] = (x + z * s).to(out_dtype)
    return outs


def projected_grad(loss_plus: float, loss_minus: float, eps: float) -> float:
    """(L+ - L-) / (2 eps) in float64, rounded to float32 (the log stores float32)."""
    _check_eps(eps)
    return f32((float(loss_plus) - float(loss_minus)) / (2.0 * float(eps)))


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, u: torch.Tensor) -> torch.Tensor:
    """Round float32 x to `dtype`, taking the upper neighbour with probability (x - lo) / (hi - lo).

    u: float32 uniforms in [0, 1), x's shape. Exact values stay exact, so E[result] = x (up to the
    2**-24 grid of u). Values beyond dtype's range saturate at its max; nan stays nan.
    """
    if x.dtype != torch.float32 or u.dtype != torch.float32:
        raise ValueError(f"stochastic_round takes float32 x and u, got {x.dtype} and {u.dtype}")
    if x.shape != u.shape:
        raise ValueError(f"x and u must have the same shape, got {list(x.shape)} and {list(u.shape)}")
    if dtype == torch.float32:
        return x.clone()
    if dtype not in _LOW_PRECISION:
        raise ValueError(f"stochastic rounding targets bfloat16, float16 or float32, got {dtype}")
    near = x.to(dtype)
    near32 = near.float()
    up = near32 < x  # nearest is the lower neighbour: the other one is above
    inf = torch.full((), math.inf, dtype=dtype, device=x.device)  # a fill, not a host -> device copy
    other = torch.nextafter(near, torch.where(up, inf, -inf))
    lo = torch.where(up, near, other)
    hi = torch.where(up, other, near)
    lo32 = lo.float()
    p_hi = (x - lo32) / (hi.float() - lo32)  # x - lo32 and hi - lo are exact (Sterbenz)
    out = torch.where(u < p_hi, hi, lo)
    return torch.where(near32 == x, near, out)  # exact values (and ±inf) stay


def apply_update(
    theta: torch.Tensor,
    name: str,
    directions: list[tuple[int, float]],
    lr: float,
    weight_decay: float,
    kind: str,
    *,
    decay: bool,
    rounding: str = "nearest",
    sr_seed: int | None = None,
    mask: UpdateMask | None = None,
    chunk: int = 1 << 22,
) -> None:
    """θ ← θ - lr (mean_d g_d z_d + wd θ [if decay]) IN PLACE, chunk by chunk.

    directions: (step seed, g) per perturbation, summed in list order in float32 and divided by
    their count. Math is float32 (float64 for a float64 master). Write-back: round to nearest, or
    for rounding="stochastic" into a bf16/fp16 master, stochastic rounding driven by
    uniform(sr_seed, name, ...) on stream 1, so a replay reproduces it (invariant 5).
    mask: g_d z_d counts only where the coordinate's perturbed copies differ (UpdateMask).
    """
    if not theta.is_floating_point():
        raise ValueError(f"{name}: apply_update needs a floating-point tensor, got {theta.dtype}")
    if not theta.is_contiguous():
        raise ValueError(f"{name}: apply_update writes in place and needs a contiguous tensor")
    if not directions:
        raise ValueError("directions must hold at least one (seed, g) pair")
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDING_MODES)}, got {rounding!r}")
    stochastic = rounding == "stochastic" and theta.dtype in _LOW_PRECISION
    if stochastic and sr_seed is None:
        raise ValueError("rounding='stochastic' needs sr_seed (the seed of the rounding uniforms)")
    _check_kind(kind)
    _check_chunk(chunk)
    lr32, wd32 = f32(lr), f32(weight_decay)
    coefs = [(seed, f32(g)) for seed, g in directions]
    t0 = time.perf_counter()
    NOISE.elements += theta.numel() * (len(coefs) + int(stochastic))
    if mask is not None:
        _check_eps(mask.eps)
    if not fused.update(theta, name, coefs, lr32, wd32 if decay else 0.0, kind, stochastic, sr_seed, mask):
        _update_torch(theta, name, coefs, lr32, wd32, kind, decay, stochastic, sr_seed, chunk, mask)
    NOISE.seconds += time.perf_counter() - t0


def _update_torch(
    theta: torch.Tensor,
    name: str,
    coefs: list[tuple[int, float]],
    lr32: float,
    wd32: float,
    kind: str,
    decay: bool,
    stochastic: bool,
    sr_seed: int | None,
    chunk: int,
    mask: UpdateMask | None = None,
) -> None:
    """apply_update's chunked torch path (the specification of the fused kernel)."""
    work = torch.float64 if theta.dtype == torch.float64 else torch.float32
    # The direction count as a device tensor: a host scalar divisor becomes a reciprocal multiply on
    # CUDA, which would break CPU/GPU equality for q not a power of two.
    count_q = torch.full((), float(len(coefs)), dtype=torch.float32, device=theta.device)
    flat = theta.view(-1)  # [numel], shares storage with theta
    n = flat.numel()
    for start in range(0, n, chunk):
        count = min(chunk, n - start)
        upd = None  # float32 [count]
        x = flat[start : start + count].float() if mask is not None else None
        for seed, g in coefs:
            z = noise(kind, seed, name, n, start, count, device=theta.device)
            term = z * g
            if mask is not None:
                dz = z * f32(mask.eps)  # perturbed's ε z: θ + εz and θ + (-ε)z = θ - εz
                a = (x + dz).to(mask.dtype)
                b = x.to(mask.dtype) if mask.one_sided else (x - dz).to(mask.dtype)
                term = torch.where(a != b, term, torch.zeros_like(term))
            upd = term if upd is None else upd + term
        if len(coefs) > 1:
            upd = upd / count_q
        cur = flat[start : start + count].to(work)
        step = upd.to(work)
        if decay and wd32 != 0.0:
            step = step + cur * wd32
        new = cur - step * lr32
        if stochastic:
            u = uniform(sr_seed, name, start, count, theta.device, stream=1)
            new = stochastic_round(new, theta.dtype, u)
        flat[start : start + count].copy_(new)


def is_decayed(name: str) -> bool:
    """Weight decay applies to every tensor except biases and norm weights."""
    lowered = name.lower()
    return not any(marker in lowered for marker in _NO_DECAY_MARKERS)
