"""The update mask on a short full-parameter fine-tune: the same job with and without it, one run.

    python bench/update_mask.py [--model DIR] [--steps 30] [--batch 16] [--eval 64] [--threads 0]

With bf16 compute, θ ± εz rounds back to θ for many coordinates (bench/precision.py); without the
mask (zo.UpdateMask) those coordinates still take lr·g·z each step: a random walk that the loss never
saw. Each row trains SmolLM2-135M-Instruct (unless --model) full-parameter with the default estimator,
loss, lr and ε on bench/sentiment_task.py for --steps steps from the same seed, then reports held-out
candidate CE and accuracy, the RMS weight change per tensor kind (how far the weights walked) and
the update seconds per step. The unmasked row is what every log before masks trained.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import log, machine_line, real_model, real_model_args, real_task, table

from zostream.engine import finetune, zo
from zostream.engine.config import StreamConfig, ZOConfig
from zostream.engine.store import WeightStore

TITLE = "Full-parameter fine-tune with and without the update mask"


def kind_of(name: str) -> str:
    n = name.lower()
    if "norm" in n:
        return "norms"
    if "embed" in n or "lm_head" in n:
        return "embeddings"
    return "matrices"


def weights(store: WeightStore) -> dict[str, torch.Tensor]:
    out = dict(store.outer())
    for i in range(store.num_layers):
        out.update({store.family.layer_prefix(i) + k: v for k, v in store.block(i).items()})
    return out


def rms_change(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per tensor kind: sqrt(mean (θ_N - θ_0)^2) over its coordinates."""
    acc: dict[str, list[float]] = {}
    for n, t in base.items():
        d = (tuned[n].float() - t.float()).double()
        a = acc.setdefault(kind_of(n), [0.0, 0])
        a[0] += float((d * d).sum())
        a[1] += d.numel()
    return {k: math.sqrt(s / max(c, 1)) for k, (s, c) in acc.items()}


def run(a: argparse.Namespace, model: Path, task: Path, masked: bool, root: Path) -> list[object]:
    t = real_task(model, task)
    store, held = t.store, t.held
    cfg = ZOConfig(method="full", steps=a.steps, batch_size=a.batch, seed=0, max_len=256)
    real = finetune.log_header
    if not masked:  # the header of a log from before masks: no update_mask entry, so none is applied

        def no_mask(cfg, store, master, rounding, compute_dtype=None):
            return real(cfg, store, master, rounding)

        finetune.log_header = no_mask
    try:
        tr = finetune.open_trainer(
            cfg,
            root / f"job-{masked}",
            store,
            t.train,
            t.pad,
            torch.device("cpu"),
            store.dtype,
            None,
            StreamConfig(gpu_memory_bytes=None),
        )
    finally:
        finetune.log_header = real
    assert ("update_mask" in tr.log.header.extra) == masked
    before = tr.evaluate(held)
    zo.NOISE.seconds = 0.0
    t0 = time.perf_counter()
    for _ in range(a.steps):
        tr.run_step()
    wall = (time.perf_counter() - t0) / a.steps
    noise_s = zo.NOISE.seconds / a.steps  # perturbation and the previous step's update
    after = tr.evaluate(held)  # flushes: every group carries all the steps
    moved = rms_change(weights(store), weights(tr.working_copy.store))
    tr.log.close()
    return [
        "masked" if masked else "unmasked",
        f"{before['candidate_loss']:.3f} -> {after['candidate_loss']:.3f}",
        f"{before['accuracy']:.3f} -> {after['accuracy']:.3f}",
        *(f"{moved.get(k, 0.0):.2e}" for k in ("matrices", "norms", "embeddings")),
        noise_s,
        wall,
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    real_model_args(p)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--eval", type=int, default=64)
    a = p.parse_args(argv)
    model = real_model(p, a)
    root = Path(tempfile.mkdtemp(prefix="zo-mask-"))
    try:
        task = root / "task"
        script = Path(__file__).resolve().parent / "sentiment_task.py"
        cmd = [sys.executable, str(script), str(task), "--train", str(a.train), "--eval", str(a.eval)]
        subprocess.run(cmd, check=True)
        rows = []
        for masked in (False, True):
            log("masked" if masked else "unmasked")
            rows.append(run(a, model, task, masked, root))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(machine_line(torch.device("cpu")))
    print(
        f"model {model.name}, full parameters, bf16, batch {a.batch}, {a.steps} steps, "
        "default lr / eps / estimator / loss"
    )
    head = ["update", "held-out CE", "held-out accuracy", "RMS Δθ matrices", "RMS Δθ norms", "RMS Δθ embed"]
    print(table(TITLE, [*head, "noise s/step", "wall s/step"], rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
