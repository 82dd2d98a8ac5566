"""ZO step bench: one MeZO/ZO2 step streamed vs all-resident, against the physical floor.

    python bench/zo.py [--shape llama3-8b,opt-13b] [--layers 8] [--methods full,lora]
                       [--codecs none,int8,nf4] [--batch 8] [--seq 256] [--q 1] [--device auto]
                       [--steps 3] [--quick]

For each (shape, method, codec): a trainer from finetune.open_trainer over a random-token text
dataset, `trainer.run_step()` timed after one warm-up step, streamed (gpu_memory 0) and
all-resident (gpu_memory None). The floor of a step is

    Σ_blocks max(2q · forward(block), H2D(block) / link_h2d, D2H(block) / link_d2h,
                 (H2D + D2H)(block) / link_both)

with the forward of each block timed on the resident run (one unperturbed forward of the same
batch, CUDA events per block), the link rates measured in this run and the bytes the streamer
actually moved per step (its stats). Full-parameter jobs through a lossy codec are refused by
the engine (the master crosses in its own dtype): those rows say so. The resident run is
measured once per method with codec none (a resident base is decoded once: same forward cost).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean
from typing import Any

import torch
from common import (
    LinkRates,
    Timer,
    default_root,
    log,
    machine_line,
    make_model,
    mb,
    measure_link,
    peak_bytes,
    ratio,
    release,
    reset_peak,
    resolve_device,
    split_list,
    table,
    zo_step_floor,
)

from zostream.engine import data as D
from zostream.engine.codec_cache import open_codec_cache
from zostream.engine.codecs import decode_block, get_codec
from zostream.engine.config import CodecConfig, StreamConfig, ZOConfig
from zostream.engine.errors import PreconditionError
from zostream.engine.finetune import open_trainer
from zostream.engine.forward import run_pass
from zostream.engine.store import WeightStore
from zostream.engine.streamer import LayerStreamer
from zostream.engine.trainer import ZOTrainer
from zostream.engine.workloads import LossWorkload
from zostream.engine.zo import NOISE

TITLE = "ZO step seconds (streamed vs resident vs floor)"
NOISE_TITLE = "ZO step noise (resident run): z and rounding uniforms drawn, seconds in perturb + update"
NOISE_HEADERS = ["shape", "method", "trainable params", "noise elements/param/step", "noise s/step", "step s"]
REFUSED = "n/a (refused: lossless master)"
QUICK = dict(shape="tiny", layers=2, codecs="none,nf4", batch=2, seq=32, steps=1, link_mb=16, threads=1)
LINK_HEADERS = ["link", "H2D GB/s", "D2H GB/s", "both ways GB/s"]
HEADERS = (
    "shape|method|codec|streamed s/step|resident s/step|floor s/step|streamed/floor|streamed/resident"
    "|H2D MB/step|D2H MB/step|peak MB streamed|peak MB resident"
)
PAD = 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama3-8b,opt-13b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--methods", default="full,lora")
    p.add_argument("--codecs", default="none,int8,nf4")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--q", type=int, default=1)
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    p.add_argument("--link-mb", type=int, default=1024, help="bytes per raw link copy (CPU: 64)")
    p.add_argument("--cache", default=None, help="model + codec cache dir (default: the zostream cache)")
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default; --quick: 1)"
    )
    p.add_argument("--quick", action="store_true", help="tiny shape, 2 layers, batch 2, seq 32, 1 step")
    a = p.parse_args(argv)
    if a.quick:  # smaller defaults; flags given explicitly still win
        p.set_defaults(**QUICK)
        a = p.parse_args(argv)
    if a.seq < 2 or a.steps < 1:
        p.error("--seq must be >= 2 and --steps >= 1")
    return a


def random_dataset(vocab: int, n: int, seq: int, seed: int = 0) -> D.Dataset:
    """n rows of `seq` random token ids (no pad id); loss on every token after the first."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(1, vocab, (n, seq), generator=g).tolist()
    return D.Dataset("text", [D.Example(tuple(r), (D.IGNORE, *r[1:])) for r in rows], [], "bench-random")


def base_streamer(
    store: WeightStore, device: torch.device, sc: StreamConfig, codec: str, root: Path
) -> LayerStreamer:
    """The frozen base a LoRA job reads, built as engine_setup.base_streamer builds it."""
    if codec == "none":
        return LayerStreamer(store, device, store.dtype, sc)
    ccfg = CodecConfig(name=codec, cache_dir=str(root / "codecs"))
    c, cache = (
        get_codec(ccfg),
        open_codec_cache(store, ccfg, device=device if device.type == "cuda" else None),
    )
    assert cache is not None
    return LayerStreamer(
        store,
        device,
        store.dtype,
        sc,
        source=cache.block,
        decoder=lambda packed, dev, dt: decode_block(c, packed, dev, dt),
    )


class BlockTimes:
    """Workload wrapper timing each block of the inner workload (CUDA events, or perf_counter)."""

    def __init__(self, inner: LossWorkload, device: torch.device) -> None:
        self.inner, self.cuda, self._clock = inner, device.type == "cuda", time.perf_counter
        self.marks: list[tuple[Any, Any]] = []

    def begin(self, outer: dict[str, torch.Tensor]) -> None:
        self.inner.begin(outer)

    def block(self, i: int, w: dict[str, torch.Tensor]) -> None:
        if self.cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            self.inner.block(i, w)
            e.record()
        else:
            s = self._clock()
            self.inner.block(i, w)
            e = self._clock()
        self.marks.append((s, e))

    def end(self, outer: dict[str, torch.Tensor]) -> None:
        self.inner.end(outer)

    def seconds(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [s.elapsed_time(e) / 1e3 for s, e in self.marks]
        return [e - s for s, e in self.marks]


def block_forwards(tr: ZOTrainer, device: torch.device, reps: int = 2) -> list[float]:
    """Seconds of one unperturbed forward of the step's batch through each block (min over reps)."""
    lora_fn = None
    if tr.adapter is not None:
        ad = tr.adapter
        lora_fn = lambda i: {m: [lw] for m, lw in ad.layer(i).items()}  # noqa: E731
    best: list[float] | None = None
    for _ in range(reps + 1):  # the first pass is a warm-up
        bt = BlockTimes(LossWorkload(tr.fam, tr.spec, tr.batch(0), lora_fn=lora_fn), device)
        run_pass(tr.streamer, [bt])
        times = bt.seconds()
        best = times if best is None else [min(x, y) for x, y in zip(best, times, strict=True)]
    return best if best is not None else []


def run_case(
    model_dir: Path, method: str, codec: str, gpu_memory: int | None, a: Any, device: torch.device, root: Path
) -> dict[str, Any] | None:
    """Time `a.steps` ZO steps of a fresh job; None when the engine refuses the combination."""
    store = WeightStore(model_dir)
    sc = StreamConfig(gpu_memory_bytes=gpu_memory)
    cfg = ZOConfig(method=method, steps=a.steps + 1, batch_size=a.batch, q=a.q, max_len=max(16, a.seq))
    ds = random_dataset(store.spec.vocab, a.batch * (a.steps + 1), a.seq)
    (root / "jobs").mkdir(parents=True, exist_ok=True)
    job = Path(tempfile.mkdtemp(prefix=f"zo-{method}-{codec}-", dir=root / "jobs"))
    reset_peak(device)
    try:
        # Full-parameter jobs read their own working copy, never the base streamer.
        base = base_streamer(store, device, sc, codec, root) if method == "lora" else None
        tr = open_trainer(cfg, job, store, ds, PAD, device, store.dtype, base, sc, codec)  # type: ignore[arg-type]
    except PreconditionError:
        shutil.rmtree(job, ignore_errors=True)
        return None
    try:
        tr.run_step()  # warm-up (and the step whose update the timed steps apply lazily)
        st = tr.streamer.stats
        h0, d0 = st.h2d_bytes, st.d2h_bytes
        n0, s0 = NOISE.elements, NOISE.seconds
        times = []
        for _ in range(a.steps):
            with Timer(device) as t:
                tr.run_step()
            times.append(t.seconds)
        params = (
            sum(t.numel() for t in tr.adapter.tensors.values())
            if tr.adapter is not None
            else sum(store.tensor(n).numel() for n in store.family.expected_tensors(store.spec))
        )
        out: dict[str, Any] = {
            "step": mean(times),
            "params": params,
            "noise_per_param": (NOISE.elements - n0) / a.steps / params,
            "noise_s": (NOISE.seconds - s0) / a.steps,
            "h2d": (st.h2d_bytes - h0) / a.steps,
            "d2h": (st.d2h_bytes - d0) / a.steps,
            "streamed": len(tr.streamer.plan.streamed),
            "layers": store.num_layers,
            "peak": peak_bytes(device),
        }
        if gpu_memory is None:
            out["fwd"] = block_forwards(tr, device)
        tr.streamer.close()  # unregister the mmap before it goes away
        return out
    finally:
        tr = base = None  # noqa: F841 - drop the device tensors before the next case
        release(device)
        shutil.rmtree(job, ignore_errors=True)


def per_block(total: float, n_streamed: int, layers: int) -> list[float]:
    """A step's bytes spread over its streamed blocks, the LAST n_streamed ones (the residency plan
    keeps the first blocks resident); the blocks of one model have one shape."""
    each = total / n_streamed if n_streamed else 0.0
    return [0.0] * (layers - n_streamed) + [each] * n_streamed


def run_shape(
    shape: str, a: Any, device: torch.device, root: Path, link: LinkRates, noise_rows: list[list[object]]
) -> list[list[object]]:
    model_dir = make_model(shape, a.layers, torch.bfloat16, root, device=device)
    rows: list[list[object]] = []
    for method in split_list(a.methods):
        log(f"{shape}: {method}, resident")
        resident = run_case(model_dir, method, "none", None, a, device, root)
        assert resident is not None
        r = resident
        noise_rows.append([shape, method, r["params"], r["noise_per_param"], r["noise_s"], r["step"]])
        for codec in split_list(a.codecs):
            log(f"{shape}: {method}, streamed, codec {codec}")
            s = run_case(model_dir, method, codec, 0, a, device, root)
            if s is None:
                rows.append([shape, method, codec, REFUSED, "-", "-", "-", "-", "-", "-", "-", "-"])
                continue
            floor = zo_step_floor(
                resident["fwd"],
                per_block(s["h2d"], s["streamed"], s["layers"]),
                per_block(s["d2h"], s["streamed"], s["layers"]),
                link,
                forwards=2 * a.q,
            )
            rows.append(
                [
                    shape,
                    method,
                    codec,
                    s["step"],
                    resident["step"],
                    floor,
                    ratio(s["step"], floor),
                    ratio(s["step"], resident["step"]),
                    mb(s["h2d"]),
                    mb(s["d2h"]),
                    mb(s["peak"]),
                    mb(resident["peak"]),
                ]
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    device = resolve_device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    root = Path(a.cache) if a.cache else default_root()
    print(f"# bench/zo.py  {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(machine_line(device) + "\n")
    link = measure_link(device, a.link_mb << 20 if device.type == "cuda" else min(a.link_mb, 64) << 20)
    print(table("raw link", LINK_HEADERS, [[link.kind, link.h2d / 1e9, link.d2h / 1e9, link.both / 1e9]]))
    rows: list[list[object]] = []
    noise_rows: list[list[object]] = []
    for shape in split_list(a.shape):
        rows += run_shape(shape, a, device, root, link, noise_rows)
    print(table(TITLE, HEADERS, rows))
    print(table(NOISE_TITLE, NOISE_HEADERS, noise_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
