"""Noise bench: elements/s of the portable generator and the fused ZO kernels against torch.randn.

    python bench/noise.py [--n 16777216] [--threads 1] [--reps 3]

One run, one device (the CPU; the fused kernels are CPU kernels today). Rows, each the best of
--reps timed calls after a warm-up call (numba compiles on the first one), timed in process CPU
seconds (steady on a shared machine; with --threads > 1 it sums the threads' time):

  torch.randn              n float32 normals from torch's own generator (the peer's noise)
  rng.normal (torch ops)   the portable generator as elementwise torch ops (engine/rng.py)
  compiled generator       the same bits from engine/noise_cpu.py (fill_noise)
  fused perturb pair       bf16 θ -> bf16 θ + εz and θ - εz, one z (zo.perturbed_pair)
  randn perturb pair       the peer's equivalent: z = torch.randn, then θ + εz and θ - εz
  fused update q=1 SR      bf16 θ <- SR(θ - lr (g z + wd θ)) in place (zo.apply_update)
  ... masked               the same with the update mask (zo.UpdateMask: bf16 copies θ ± εz compared)
  randn update             the peer's equivalent: z = torch.randn, θ.add_(z, alpha=-lr g)

elements/s counts θ elements (n per call) per CPU second; "x randn" is the row's rate over
torch.randn's.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from common import machine_line, table

from zostream.engine import fused, rng, zo

TITLE = "Noise and fused ZO kernels, elements/s"


def best_seconds(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm-up (and numba compile)
    best = float("inf")
    for _ in range(reps):
        t0 = time.process_time()
        fn()
        best = min(best, time.process_time() - t0)
    return best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1 << 24, help="elements per call")
    p.add_argument("--threads", type=int, default=1, help="torch (and kernel) CPU threads")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    n, seed = a.n, rng.step_seed(1, 0)
    theta = torch.randn(n, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    eps, lr, g = 1e-3, 1e-6, 0.5

    def randn_pair() -> None:
        z = torch.randn(n)
        x = theta.float()
        (x + z * eps).bfloat16(), (x - z * eps).bfloat16()

    def randn_update() -> None:
        z = torch.randn(n)
        theta.copy_((theta.float() - z * (lr * g)).bfloat16())

    rows_spec: list[tuple[str, Callable[[], object]]] = [
        ("torch.randn", lambda: torch.randn(n)),
        ("rng.normal (torch ops)", lambda: rng.normal(seed, "w", 0, n, "cpu")),
        ("compiled generator", lambda: fused.noise("gaussian", seed, "w", 0, n)),
        ("fused perturb pair", lambda: zo.perturbed_pair(theta, "gaussian", seed, "w", eps, torch.bfloat16)),
        ("randn perturb pair", randn_pair),
        (
            "fused update q=1 SR",
            lambda: zo.apply_update(
                theta, "w", [(seed, g)], lr, 0.01, "gaussian", decay=True, rounding="stochastic", sr_seed=7
            ),
        ),
        (
            "fused update q=1 SR masked",
            lambda: zo.apply_update(
                theta,
                "w",
                [(seed, g)],
                lr,
                0.01,
                "gaussian",
                decay=True,
                rounding="stochastic",
                sr_seed=7,
                mask=zo.UpdateMask(eps, torch.bfloat16, one_sided=False),
            ),
        ),
        ("randn update", randn_update),
    ]
    if fused.noise_cpu is None:
        rows_spec = [r for r in rows_spec if r[0] != "compiled generator"]
    secs = {name: best_seconds(fn, a.reps) for name, fn in rows_spec}
    base = n / secs["torch.randn"]
    rows = [
        [name, f"{n / s / 1e6:.1f}M", f"{(n / s) / base:.2f}", f"{s * 1e3:.1f}"] for name, s in secs.items()
    ]
    print(machine_line(torch.device("cpu")))
    print(f"n={n} threads={a.threads} reps={a.reps} (best of)")
    print(table(TITLE, ["kernel", "elements/s", "x randn", "CPU ms/call"], rows))


if __name__ == "__main__":
    main()
