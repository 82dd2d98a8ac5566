"""Matrix-product rates per dtype on this CPU, and the compute dtype `--dtype auto` picks here.

    OMP_NUM_THREADS=2 python bench/cpu_dtype.py [--threads 2] [--tokens 1024] [--reps 20]

The shapes are SmolLM2-135M's projections (hidden 576, MLP 1536) on `--tokens` rows, a batch of 16
records of 64 tokens by default. `--dtype auto` computes in float32 on a CPU for which torch has no
bf16 matrix kernels (engine/engine_setup.py): this shows what that costs or saves here. The rates are
measured, never asserted; the probe's answer is printed beside the CPU's own flags.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from zostream.engine import engine_setup as setup

SHAPES = [(576, 576), (576, 1536), (1536, 576)]  # (in, out): q/o, gate/up, down


def rate(tokens: int, dtype: torch.dtype, reps: int) -> float:
    """GFLOP/s of x @ W over SHAPES, x: [tokens, in], W: [in, out], after two warm-up rounds."""
    mats = [(torch.randn(tokens, i).to(dtype), torch.randn(i, o).to(dtype)) for i, o in SHAPES]
    for _ in range(2):
        for x, w in mats:
            x @ w
    t0 = time.perf_counter()
    for _ in range(reps):
        for x, w in mats:
            x @ w
    flops = reps * sum(2 * tokens * i * o for i, o in SHAPES)
    return flops / (time.perf_counter() - t0) / 1e9


def cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                keep = ("avx2", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "avx512_fp16")
                return " ".join(f for f in line.split(":", 1)[1].split() if f in keep) or "(none of them)"
    except OSError:
        pass
    return "(unknown)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {a.threads} threads")
    print(f"cpu flags: {cpu_flags()}; torch capability {torch.backends.cpu.get_cpu_capability()}")
    print("\n| dtype | fast kernels (probe) | GFLOP/s | vs float32 |\n|---|---|---|---|")
    base = rate(a.tokens, torch.float32, a.reps)
    print(f"| float32 | - | {base:.1f} | 1.00 |")
    for dt in (torch.bfloat16, torch.float16):
        r = rate(a.tokens, dt, max(1, a.reps // 4))
        name = str(dt).removeprefix("torch.")
        print(f"| {name} | {setup.cpu_has_fast_kernels(dt)} | {r:.1f} | {r / base:.2f} |")
    auto = setup.compute_dtype("auto", torch.bfloat16, "cpu", num_params=134_515_008)
    print(f"\n--dtype auto for a bf16 base of SmolLM2-135M's size on --device cpu: {auto}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
