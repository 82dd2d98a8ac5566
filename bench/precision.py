"""Perturbation precision: the share of coordinates where θ + εz and θ - εz round to the same value.

A coordinate whose two perturbed copies are equal in the compute dtype takes no part in L+ - L-, yet
receives the full update lr·g·z: a random walk. Per compute dtype (bf16, fp16, fp32) and ε, over the
model's weights grouped by kind (matrices, norm weights, embeddings), with zostream's perturbation
(zo.perturbed: θ.float() + sign·ε·z, rounded once to the compute dtype). Also the share for an fp32 work
copy of the LoRA factors (what LoRA jobs perturb).

  python bench/precision.py --model DIR [--eps 1e-4,1e-3,1e-2] [--max-numel 2000000]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def kind_of(name: str) -> str:
    n = name.lower()
    if "norm" in n:
        return "norm weights"
    if "embed" in n or "lm_head" in n:
        return "embeddings"
    return "matrices"


def main() -> None:
    from zostream.engine import rng, zo
    from zostream.engine.store import WeightStore

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--eps", default="1e-4,1e-3,1e-2")
    ap.add_argument(
        "--max-numel", type=int, default=2_000_000, help="coordinates sampled per tensor (prefix)"
    )
    a = ap.parse_args()
    eps_list = [float(e) for e in a.eps.split(",")]
    store = WeightStore(a.model)
    tensors = dict(store.outer())
    for i in range(store.num_layers):
        tensors.update({store.family.layer_prefix(i) + k: v for k, v in store.block(i).items()})
    t0 = time.monotonic()
    # (dtype, eps, kind) -> [equal, total]
    counts: dict[tuple[str, float, str], list[int]] = {}
    seed = rng.step_seed(0, 0, 0)
    for name, t in tensors.items():
        flat = t.reshape(-1)[: a.max_numel]
        for dname, dt in DTYPES.items():
            for eps in eps_list:
                plus = zo.perturbed(flat, "gaussian", seed, name, eps, 1, dt)
                minus = zo.perturbed(flat, "gaussian", seed, name, eps, -1, dt)
                c = counts.setdefault((dname, eps, kind_of(name)), [0, 0])
                c[0] += int((plus == minus).sum())
                c[1] += flat.numel()
    kinds = sorted({k for _, _, k in counts})
    print(f"model {a.model}, stored {store.dtype}")
    print("| compute dtype | eps | " + " | ".join(f"θ+ = θ- ({k})" for k in kinds) + " |")
    print("|---|---|" + "---|" * len(kinds))
    for dname in DTYPES:
        for eps in eps_list:
            cells = []
            for k in kinds:
                eq, tot = counts.get((dname, eps, k), [0, 0])
                cells.append(f"{100 * eq / max(tot, 1):.1f} %")
            print(f"| {dname} | {eps:g} | " + " | ".join(cells) + " |")
    print(f"({time.monotonic() - t0:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
