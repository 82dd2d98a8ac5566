"""Dispatch of zo.py's perturb and update to the fused kernels, where one exists for the tensor.

A kernel draws z for a counter and uses it at once (no z tensor); its results equal the torch
path of zo.py bit for bit (tests/engine/test_fused.py), so callers never see which one ran. CPU
tensors of float32 or bfloat16 go to engine/noise_cpu.py (numba); CUDA tensors of float32, bfloat16
or float16 go to engine/noise_triton.py where Triton is installed (imported on the first CUDA call,
so CPU runs never load it); everything else (CUDA without Triton, float64 masters, stochastic
rounding into float16 on CUDA) returns None / False and zo.py takes its chunked torch path.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from . import rng

if TYPE_CHECKING:
    from . import zo

try:  # numba is a pinned dependency; a platform without its wheels still trains, slower
    from . import noise_cpu
except ImportError:  # pragma: no cover - exercised only where numba is missing
    noise_cpu = None

_CPU_DTYPES = (torch.float32, torch.bfloat16)
_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_noise_triton: object | None = None  # engine/noise_triton.py once imported; False: Triton is missing
_SPLIT_MIN = 1 << 18  # elements below which one thread does the whole tensor (a wake-up costs more)
_pool: ThreadPoolExecutor | None = None


def _cpu_ready(*tensors: torch.Tensor) -> bool:
    return noise_cpu is not None and all(
        t.device.type == "cpu" and t.dtype in _CPU_DTYPES and t.is_contiguous() for t in tensors
    )


def _triton():
    """engine/noise_triton.py, or None where triton cannot be imported (checked once)."""
    global _noise_triton
    if _noise_triton is None:
        try:
            from . import noise_triton
        except ImportError:
            _noise_triton = False
        else:
            _noise_triton = noise_triton
    return _noise_triton or None


def triton_ready(*tensors: torch.Tensor) -> bool:
    """True when every tensor is a contiguous CUDA tensor of a Triton kernel dtype and Triton imports."""
    on_cuda = all(t.device.type == "cuda" and t.dtype in _CUDA_DTYPES and t.is_contiguous() for t in tensors)
    return on_cuda and _triton() is not None


def _array(t: torch.Tensor) -> np.ndarray:
    """A numpy view [numel] of a contiguous CPU tensor sharing its memory (bfloat16 as uint16 bits)."""
    flat = t.detach().reshape(-1)
    if t.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def _split(n: int, kernel: Callable[[int, int], None]) -> None:
    """kernel(lo, hi) over [0, n) in torch.get_num_threads() pieces (element ranges cut at multiples
    of 4, the counter size); the kernels release the GIL. Values do not depend on the split."""
    global _pool
    parts = min(torch.get_num_threads(), n // _SPLIT_MIN)
    if parts <= 1:
        kernel(0, n)
        return
    if _pool is None or _pool._max_workers < parts:  # noqa: SLF001 - grow the pool when threads grow
        _pool = ThreadPoolExecutor(max_workers=parts, thread_name_prefix="zostream-noise")
    step = ((n + parts - 1) // parts + 3) // 4 * 4  # a multiple of 4
    futures = [_pool.submit(kernel, lo, min(n, lo + step)) for lo in range(step, n, step)]
    kernel(0, min(n, step))
    for f in futures:
        f.result()


def perturb_pair(
    theta: torch.Tensor,
    kind: str,
    seed: int,
    name: str,
    scale: float,
    out_dtype: torch.dtype,
    pair: bool,
    out: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(θ + scale·z, θ - scale·z if pair) as [numel] tensors of out_dtype; None: no kernel here.
    out: CPU buffers (plus, minus or None) to write into instead of new tensors (zo.perturbed_pair)."""
    if out_dtype in _CUDA_DTYPES and triton_ready(theta):
        return _triton().perturb_pair(theta, kind, seed, name, scale, out_dtype, pair)
    if not (_cpu_ready(theta) and out_dtype in _CPU_DTYPES):
        return None
    n = theta.numel()
    if out is not None and _cpu_ready(*[t for t in out if t is not None]):
        plus, minus = out[0], (out[1] if pair else torch.empty(0, dtype=out_dtype))
    else:
        plus = torch.empty(n, dtype=out_dtype)
        minus = torch.empty(n if pair else 0, dtype=out_dtype)
    k0, k1 = rng.tensor_key(seed, name, 0)
    th, op, om, code, sc = (
        _array(theta),
        _array(plus),
        _array(minus),
        noise_cpu.KIND_CODES[kind],
        np.float32(scale),
    )
    _split(n, lambda lo, hi: noise_cpu.perturb_pair(th, code, k0, k1, sc, op, om, lo, hi))
    return plus, (minus if pair else None)


def perturb_pairs(
    thetas: list[torch.Tensor], kind: str, seed: int, names: list[str], scale: float, out_dtype, pair: bool
) -> list[tuple[torch.Tensor, torch.Tensor | None]] | None:
    """perturb_pair of many tensors in one launch (Triton, CUDA): [numel] results per tensor, the same
    values as one call each; None where there is no multi-tensor kernel (CPU: one call per tensor costs
    the kernels nothing there) or the tensors do not share a dtype."""
    if not thetas or out_dtype not in _CUDA_DTYPES or len({t.dtype for t in thetas}) != 1:
        return None
    if len({t.device for t in thetas}) != 1 or not triton_ready(*thetas):
        return None
    keys = [rng.tensor_key(seed, name, 0) for name in names]
    return _triton().perturb_pairs(thetas, kind, keys, scale, out_dtype, pair)


def update(
    theta: torch.Tensor,
    name: str,
    coefs: list[tuple[int, float]],
    lr: float,
    wd: float,
    kind: str,
    stochastic: bool,
    sr_seed: int | None,
    mask: zo.UpdateMask | None = None,
) -> bool:
    """θ ← round(θ - lr (mean_d g_d z_d + wd θ)) in place (wd 0: no decay; mask: zo.UpdateMask);
    False: no kernel here."""
    if triton_ready(theta) and not (stochastic and theta.dtype == torch.float16):
        _triton().update(
            theta, name, coefs, lr, wd, kind, stochastic and theta.dtype == torch.bfloat16, sr_seed, mask
        )
        return True
    if not _cpu_ready(theta) or (mask is not None and mask.dtype not in _CPU_DTYPES):
        return False
    mode, mask_dt, eps = noise_cpu.MASK_NONE, noise_cpu.F32, 1.0
    if mask is not None:
        mode = noise_cpu.MASK_ONE_SIDED if mask.one_sided else noise_cpu.MASK_PAIR
        mask_dt, eps = (noise_cpu.BF16 if mask.dtype == torch.bfloat16 else noise_cpu.F32), mask.eps
    keys = np.array([rng.tensor_key(s, name, 0) for s, _ in coefs], dtype=np.uint64)
    gs = np.array([g for _, g in coefs], dtype=np.float32)
    stochastic = stochastic and theta.dtype == torch.bfloat16  # a float32 master rounds to nearest
    sr = rng.tensor_key(sr_seed, name, 1) if stochastic and sr_seed is not None else (0, 0)
    th, code, lr32, wd32 = _array(theta), noise_cpu.KIND_CODES[kind], np.float32(lr), np.float32(wd)
    eps32 = np.float32(eps)

    def kernel(lo: int, hi: int) -> None:
        noise_cpu.update(
            th, code, keys, gs, lr32, wd32, stochastic, sr[0], sr[1], lo, hi, mode, mask_dt, eps32
        )

    _split(theta.numel(), kernel)
    return True


def noise(kind: str, seed: int, name: str, start: int, count: int) -> torch.Tensor | None:
    """float32 [count] = rng.noise(kind, seed, name, ...) on the CPU from the compiled generator."""
    if noise_cpu is None:
        return None
    out = torch.empty(count, dtype=torch.float32)
    k0, k1 = rng.tensor_key(seed, name, 0)
    noise_cpu.fill_noise(noise_cpu.KIND_CODES[kind], k0, k1, start, out.numpy())
    return out
