"""LoRA perturbation precision: how much of a ZO step's loss difference survives bf16 compute.

bench/precision.py counts weights whose θ + εz and θ - εz round to the same value. A LoRA job perturbs
fp32 factors, so none do; but the factors' effect on a bf16 forward is rounded at every activation
(the q/v outputs y + Δy, the attention scores, the residual stream, the logits), so the loss difference
L+ - L- that the step reads is the fp32 one plus rounding noise. This bench measures that noise where
it matters, in the coefficient the step is made of: for grzo (the LoRA default) each group's
Δ_d = L+_d - L-_d, at the same adapter, records and directions, computed once in float32 and once in
bfloat16 (the first step of --probes jobs, each its own --batch records and directions; no update).

Per ε, it reports the RMS of the fp32 Δ, the relative RMS error of the bf16 Δ against it, their
correlation, and the share of directions whose sign differs (a sign error turns that direction's step
round). A relative error r adds about r² to the variance of each Δ (the step normalises by their RMS).
--keep lifts some of the bf16 roundings (bench/mixed_forward.py: head, resid, lora) to find which carry it.

  python bench/lora_precision.py [--model DIR] [--task topic] [--eps 3e-3,1e-2,3e-2] [--probes 30] [--keep K]
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

import mixed_forward
import torch
from common import log, real_model, real_model_args, real_task, table

from zostream.engine import finetune
from zostream.engine.config import StreamConfig, ZOConfig
from zostream.engine.forward import run_pass
from zostream.engine.streamer import LayerStreamer

TITLE = "LoRA loss differences: bf16 compute against fp32"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def deltas(
    a: argparse.Namespace, model: Path, task: Path, eps: float, dtype: torch.dtype, root: Path
) -> list[float]:
    """Δ_d = L+_d - L-_d of every group of the first grzo step of --probes jobs (job seeds seed..seed +
    probes - 1: each its own records and directions), all at a fresh job's adapter; nothing is applied."""
    t = real_task(model, task)
    store = t.store
    sc = StreamConfig(gpu_memory_bytes=None)
    base = LayerStreamer(store, torch.device("cpu"), dtype, sc)  # the frozen base the adapter rides on
    out: list[float] = []
    for k in range(a.probes):
        cfg = ZOConfig(method="lora", steps=1, batch_size=a.batch, seed=a.seed + k, max_len=256, eps=eps)
        job = root / f"job-{eps:g}-{dtype}-{k}".replace("torch.", "")
        tr = finetune.open_trainer(cfg, job, store, t.train, t.pad, torch.device("cpu"), dtype, base, sc)
        try:
            wl = tr.workload()
            run_pass(tr.streamer, [wl])
            out += [lp - lm for lp, lm in wl.losses()]
        finally:
            tr.log.close()
        shutil.rmtree(job)
    return out


def compare(ref: list[float], low: list[float]) -> list[object]:
    n = len(ref)
    rms = math.sqrt(sum(x * x for x in ref) / n)
    err = math.sqrt(sum((x - y) ** 2 for x, y in zip(ref, low, strict=True)) / n)
    mr, ml = sum(ref) / n, sum(low) / n
    cov = sum((x - mr) * (y - ml) for x, y in zip(ref, low, strict=True))
    var = math.sqrt(sum((x - mr) ** 2 for x in ref) * sum((y - ml) ** 2 for y in low))
    flips = sum((x > 0) != (y > 0) for x, y in zip(ref, low, strict=True)) / n
    return [n, f"{rms:.4f}", f"{err / rms:.3f}", f"{cov / var:.3f}", f"{flips:.3f}"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    real_model_args(p)
    p.add_argument("--task", default="topic", choices=("sentiment", "topic"))
    p.add_argument("--eps", default="3e-3,1e-2,3e-2")
    p.add_argument("--probes", type=int, default=30, help="grzo steps probed per ε and dtype")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", default="", help="bf16 roundings to lift: a comma list of head,resid,lora")
    a = p.parse_args(argv)
    mixed_forward.patch(a.keep)  # fp32 weights run the same arithmetic patched or not
    model = real_model(p, a)
    root = Path(tempfile.mkdtemp(prefix="zo-lora-precision-"))
    rows = []
    try:
        task = root / "task"
        script = Path(__file__).resolve().parent / f"{a.task}_task.py"
        cmd = [sys.executable, str(script), str(task), "--train", "512", "--eval", "8"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # the tables alone on stdout
        for eps in (float(e) for e in a.eps.split(",")):
            got = {}
            for name, dt in DTYPES.items():
                t0 = time.monotonic()
                got[name] = deltas(a, model, task, eps, dt, root)
                log(f"eps {eps:g} {name}: {a.probes} probes in {time.monotonic() - t0:.0f} s")
            rows.append([f"{eps:g}", *compare(got["float32"], got["bfloat16"])])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    heads = ["ε", "Δ's", "RMS Δ (fp32)", "bf16 rel. RMS error", "correlation", "sign flips"]
    kept = f", bf16 keeps {a.keep} in fp32" if a.keep else ""
    print(table(f"{TITLE} ({a.task}, grzo, batch {a.batch}, {a.probes} probes{kept})", heads, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
