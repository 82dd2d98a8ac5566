"""Device memory of a streamed LoRA job on the emulated device, against the number of layers.

    python bench/emu_memory.py [--shape opt-175b-width] [--layers 1,2] [--codec int8]
                               [--batch 1] [--seq 512] [--root DIR] [--keep]

For each layer count: a random bf16 model dir of that shape, an Engine with `--device emu`,
`--gpu-memory 0` (every block streams) and the codec, a LoRA job on it, one ZO step at
--batch x --seq. The emulated device's allocator counts every device byte, measured, not estimated:
what the streamer places (slots, the decoded block in flight, outer tensors), the LoRA factors, and
everything compute allocates during the step's pass (activations, perturbed work copies, attention
scores, logits: emu.EmuDevice.track_compute). Its peak must not grow with the number of layers
(beyond the LoRA factors, a few MB per layer).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import default_root, log, machine_line, make_model

from zostream.engine import data as D
from zostream.engine.codec_cache import open_codec_cache
from zostream.engine.codecs import decode_block, get_codec
from zostream.engine.config import CodecConfig, StreamConfig, ZOConfig
from zostream.engine.emu import EmuDevice
from zostream.engine.finetune import open_trainer
from zostream.engine.store import WeightStore
from zostream.engine.streamer import LayerStreamer

CPU = torch.device("cpu")
GB = 1e9


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="opt-175b-width")
    p.add_argument("--layers", default="1,2", help="comma-separated layer counts")
    p.add_argument("--codec", default="int8", choices=["none", "int8", "nf4"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=512, help="tokens per example of the step")
    p.add_argument("--q", type=int, default=1)
    p.add_argument("--root", default=None, help="model and codec cache dir (default: the bench cache)")
    p.add_argument("--keep", action="store_true", help="keep the model dirs (default: delete after use)")
    return p.parse_args(argv)


def run(model: Path, a: argparse.Namespace, root: Path) -> dict[str, Any]:
    store = WeightStore(model)
    dev = EmuDevice()
    sc = StreamConfig(gpu_memory_bytes=0)
    if a.codec == "none":
        base = LayerStreamer(store, CPU, store.dtype, sc, emu=dev)
    else:
        ccfg = CodecConfig(name=a.codec, cache_dir=str(root / "codecs"))
        codec, cache = get_codec(ccfg), open_codec_cache(store, ccfg)
        assert cache is not None
        base = LayerStreamer(
            store,
            CPU,
            store.dtype,
            sc,
            source=cache.block,
            decoder=lambda packed, d, dt: decode_block(codec, packed, d, dt),
            emu=dev,
        )
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(1, store.spec.vocab, (a.batch * 2, a.seq), generator=g).tolist()
    ds = D.Dataset("text", [D.Example(tuple(r), (D.IGNORE, *r[1:])) for r in rows], [], "bench-random")
    cfg = ZOConfig(method="lora", steps=2, batch_size=a.batch, q=a.q, max_len=max(16, a.seq))
    job = Path(tempfile.mkdtemp(prefix="emu-mem-", dir=root))
    try:
        tr = open_trainer(cfg, job, store, ds, 0, CPU, store.dtype, base, sc, a.codec)
        # The adapter lives on the device with the job (fp32 factors: grows with layers, ~MB each).
        lora = sum(t.numel() * t.element_size() for t in tr.adapter.tensors.values())
        dev.account(lora)
        t0 = time.perf_counter()
        tr.run_step()
        seconds = time.perf_counter() - t0
        tr.log.close()
    finally:
        base.close()
        shutil.rmtree(job, ignore_errors=True)
    return {
        "layers": store.num_layers,
        "slot": base.plan.slot_bytes,
        "placed": dev.placed_peak,
        "lora": lora,
        "compute": dev.compute_peak,
        "peak": dev.peak,
        "h2d": dev.bytes_by_stream.get("h2d", 0),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    root = Path(a.root) if a.root else default_root()
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(x) for x in a.layers.split(",")]:
        log(f"emu-memory: building {a.shape} with {n} layer(s) under {root}")
        model = make_model(a.shape, n, torch.bfloat16, root)
        rows.append(run(model, a, root))
        gc.collect()  # the emulated device's buffers of this run are RAM: free them before the next
        log(f"emu-memory: {rows[-1]}")
        if not a.keep:
            shutil.rmtree(model, ignore_errors=True)
            shutil.rmtree(root / "codecs", ignore_errors=True)
    print(machine_line(CPU))
    print(
        f"\n{a.shape}, LoRA, codec {a.codec}, q={a.q}, --device emu --gpu-memory 0, "
        f"one ZO step at batch {a.batch} x {a.seq} tokens; every byte measured by the emulated allocator\n"
    )
    print(
        "| layers | slot GB | placed peak GB (slots, decoded block, outer, LoRA) | LoRA GB "
        "| compute peak GB (activations...) | device peak GB | step s |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['layers']} | {r['slot'] / GB:.2f} | {r['placed'] / GB:.3f} | {r['lora'] / GB:.4f} "
            f"| {r['compute'] / GB:.3f} | {r['peak'] / GB:.3f} | {r['seconds']:.1f} |"
        )
    peaks = [r["peak"] - r["lora"] for r in rows]
    flat = len(set(peaks)) == 1
    print(f"\ndevice peak less the LoRA factors, flat in layers: {'yes' if flat else 'no'} (bytes {peaks})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
