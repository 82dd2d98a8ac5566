"""Generation at full width on the emulated device: batch 16, 2048-token contexts, inside a device budget.

    python bench/emu_generate.py [--shape opt-175b-width] [--layers 2] [--codec nf4] [--batch 16]
                                 [--context 2048] [--new-tokens 12] [--prefill-tokens 4096]
                                 [--budget-gb 12] [--root DIR] [--keep]

An Engine with `--device emu --gpu-memory 0 --kv-offload` on a random bf16 model dir of the shape:
every block streams through the slots and every layer's KV lives in host memory and travels with its
layer (kv_offload.py), which is the plan a 96-layer OPT-175B gets in 12 GB. --batch prompts of
--context minus --new-tokens random ids each are generated greedily to --new-tokens, so the last
passes decode all rows at once with contexts reaching --context (prefill passes are capped at
--prefill-tokens). Printed, all measured: the emulated allocator's peak (what the streamer placed,
what compute allocated, the sum) against the budget, the KV bytes moved each way, and the seconds
KV copies overlapped block compute in the copy-engine timeline. One line per pass goes to stderr, so
an interrupted run still shows the peak so far.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import TokenStandIn, default_root, log, machine_line, make_model

from zostream.engine.config import CodecConfig, EngineConfig, LimitsConfig, StreamConfig
from zostream.engine.emu import overlapped, overlapped_with_compute, shared_device
from zostream.engine.engine import Engine
from zostream.engine.generation import GenerateRequest, StopParams
from zostream.engine.sampling import SamplingParams

GB = 1e9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="opt-175b-width")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--codec", default="nf4", choices=["none", "int8", "nf4"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=2048, help="prompt + generated tokens per row")
    p.add_argument("--new-tokens", type=int, default=12)
    p.add_argument("--prefill-tokens", type=int, default=4096, help="prompt tokens per pass at most")
    p.add_argument("--budget-gb", type=float, default=12.0)
    p.add_argument("--root", default=None, help="model and codec cache dir (default: the bench cache)")
    p.add_argument("--keep", action="store_true", help="keep the model dir (default: delete after use)")
    return p.parse_args(argv)


def open_engine(model: Path, a: argparse.Namespace, root: Path) -> Engine:
    cfg = EngineConfig(
        str(model),
        device="emu",
        compute_dtype="bfloat16",
        stream=StreamConfig(gpu_memory_bytes=0),
        codec=CodecConfig(name=a.codec, cache_dir=str(root / "codecs")),
        limits=LimitsConfig(
            max_batch=a.batch,
            max_seq_len=a.context,
            max_new_tokens=a.new_tokens,
            max_prefill_tokens=a.prefill_tokens,
            kv_offload=True,
        ),
    )
    return Engine(cfg, tokenizer=TokenStandIn())


def run(eng: Engine, a: argparse.Namespace) -> dict[str, Any]:
    dev = shared_device()
    placed_at_start = dev.allocated
    g = torch.Generator().manual_seed(0)
    n_prompt = a.context - a.new_tokens
    for r in range(a.batch):
        ids = torch.randint(2, eng.spec.vocab, (n_prompt,), generator=g).tolist()
        stop = StopParams(max_new_tokens=a.new_tokens, ignore_eos=True)
        eng.submit(GenerateRequest(f"r{r}", ids, SamplingParams(), stop))
    t0 = time.perf_counter()
    passes, max_rows, max_ctx = 0, 0, 0
    kv_up = kv_down = 0
    while eng.has_work():
        s = eng.step()
        passes += 1
        kv_up += s.kv_bytes_h2d
        kv_down += s.kv_bytes_d2h
        if s.decode_tokens == a.batch:
            max_rows = a.batch
        max_ctx = max([max_ctx, *(ev.prompt_tokens + ev.completion_tokens for ev in s.finished)])
        log(
            f"pass {passes}: {s.seconds:.1f}s prefill {s.prefill_tokens} decode {s.decode_tokens} "
            f"device now {dev.allocated / GB:.3f} GB peak {dev.peak / GB:.3f} GB "
            f"(placed {dev.placed_peak / GB:.3f}, compute {dev.compute_peak / GB:.3f}); "
            f"KV h2d {s.kv_bytes_h2d / GB:.3f} GB d2h {s.kv_bytes_d2h / GB:.4f} GB"
        )
    seconds = time.perf_counter() - t0
    kv_busy = sum(r.end - r.start for r in dev.timeline if r.tag.startswith("kv "))
    up, up_c = overlapped_with_compute(dev.timeline, "h2d", "kv ")
    down, down_c = overlapped_with_compute(dev.timeline, "d2h", "kv ")
    return {
        "placed_at_start": placed_at_start,
        "placed": dev.placed_peak,
        "compute": dev.compute_peak,
        "peak": dev.peak,
        "kv_h2d": kv_up,
        "kv_d2h": kv_down,
        "kv_copy_s": kv_busy,
        "kv_overlap_s": overlapped(dev.timeline, "kernels", "h2d", "kv ")
        + overlapped(dev.timeline, "kernels", "d2h", "kv "),
        "kv_up_s": (up, up_c),
        "kv_down_s": (down, down_c),
        "passes": passes,
        "decode_all_rows": max_rows == a.batch,
        "max_context": max_ctx,
        "seconds": seconds,
        "violations": len(dev.violations),
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.new_tokens >= a.context:
        raise SystemExit("--new-tokens must be below --context (the prompt is the rest)")
    root = Path(a.root) if a.root else default_root()
    root.mkdir(parents=True, exist_ok=True)
    log(f"emu-generate: building {a.shape} with {a.layers} layer(s) under {root}")
    model = make_model(a.shape, a.layers, torch.bfloat16, root)
    try:
        eng = open_engine(model, a, root)
        plan = eng.streamer.plan
        log(f"emu-generate: streamed {len(plan.streamed)} of {eng.spec.num_layers}, kv {eng.kv_plan}")
        r = run(eng, a)
    finally:
        if not a.keep:
            shutil.rmtree(model, ignore_errors=True)
            shutil.rmtree(root / "codecs", ignore_errors=True)
    print(machine_line(torch.device("cpu")))
    print(
        f"\n{a.shape}, {a.layers} layer(s), codec {a.codec}, --device emu --gpu-memory 0 --kv-offload, "
        f"batch {a.batch}, prompts of {a.context - a.new_tokens} + {a.new_tokens} greedy tokens "
        f"(contexts up to {r['max_context']}), prefill <= {a.prefill_tokens} tokens per pass\n"
    )
    print("| measured on the emulated device | value |")
    print("|---|---|")
    print(f"| placed at start (outer, slots, KV staging) GB | {r['placed_at_start'] / GB:.3f} |")
    print(f"| placed peak (+ decoded block in flight) GB | {r['placed'] / GB:.3f} |")
    print(f"| compute peak (activations, scores, logits, gathered K/V) GB | {r['compute'] / GB:.3f} |")
    print(f"| device peak GB (budget {a.budget_gb:g}) | {r['peak'] / GB:.3f} |")
    print(f"| KV bytes h2d / d2h GB | {r['kv_h2d'] / GB:.3f} / {r['kv_d2h'] / GB:.4f} |")
    overlap = f"{r['kv_copy_s']:.3f} / {r['kv_overlap_s']:.3f}"
    print(f"| KV copy seconds / of them overlapping block compute | {overlap} |")
    (u, uc), (d, dc) = r["kv_up_s"], r["kv_down_s"]
    print(f"| KV h2d seconds / of them while the host computed (not waiting) | {u:.3f} / {uc:.3f} |")
    print(f"| KV d2h seconds / of them while the host computed (not waiting) | {d:.3f} / {dc:.3f} |")
    print(f"| passes / all {a.batch} rows decoded in one pass | {r['passes']} / {r['decode_all_rows']} |")
    print(f"| wall seconds | {r['seconds']:.0f} |")
    print(f"| ordering violations | {r['violations']} |")
    ok = r["peak"] <= a.budget_gb * GB and r["decode_all_rows"] and r["violations"] == 0
    print(f"\nwithin {a.budget_gb:g} GB at batch {a.batch} x {r['max_context']}: {'yes' if ok else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
