"""Passes per second streaming a base larger than RAM from disk, against the disk floor.

A random-weight model of a real shape (llama3-8b, enough layers to exceed this machine's RAM) is
written once; every pass reads the blocks beyond `--host-memory` from the file through the host tier
(engine/host_tier.py). The floor is the pass's disk bytes / the sequential read rate of the same
file measured in the same run, cold (its pages evicted with posix_fadvise DONTNEED first).

    ratio = floor seconds / measured seconds per pass   (1.0 = the disk never idles)

for a pass whose consumer only touches every page (the tier alone), for generation (prefill +
decode passes) and for one LoRA ZO step, per readahead mode ("read":
the readahead thread preads the next blocks; "willneed": it only asks the kernel with
posix_fadvise WILLNEED). The file is deleted at the end unless --keep.

    python bench/disk.py                   # writes ~RAM + 1.5 GB into --dir, ~10 minutes on one disk
    python bench/disk.py --quick           # a small smoke run (does not exceed RAM)
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

from zostream.engine import data as D  # noqa: E402
from zostream.engine import host_tier  # noqa: E402
from zostream.engine.config import EngineConfig, LimitsConfig, StreamConfig, ZOConfig  # noqa: E402
from zostream.engine.engine import Engine  # noqa: E402
from zostream.engine.finetune import open_trainer  # noqa: E402
from zostream.engine.generation import GenerateRequest, StopParams  # noqa: E402
from zostream.engine.sampling import SamplingParams  # noqa: E402

_POOL = 1 << 26  # 64 Mi random bf16 values (128 MB) cycled through with a moving offset


def mem_total() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemTotal in /proc/meminfo")


def write_model(out: Path, shape: str, layers: int) -> Path:
    """Random N(0, 0.02) bf16 weights (norms 1), one shard per 4 layers; data is real (not sparse):
    a 128 MB pool of random values written at a moving offset, so no two chunks repeat in phase."""
    if (out / "complete").exists():
        return out
    cfg = C.hf_config(shape, layers)
    fam = C.family_for(cfg)
    spec = fam.make_spec(cfg)
    gen = torch.Generator().manual_seed(0)
    pool = torch.empty(_POOL, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(torch.bfloat16)
    pool = torch.cat([pool, pool[: C._GEN_CHUNK]])
    step = [0]

    def fill(name: str, rng: tuple[int, int]) -> torch.Tensor:
        n = rng[1] - rng[0]
        if "norm" in name:
            return torch.ones(n, dtype=torch.bfloat16)
        step[0] = (step[0] + 7_919_033) % _POOL
        return pool[step[0] : step[0] + n]

    shards = [dict(fam.outer_tensors(spec))]
    for first in range(0, layers, 4):
        shard = {}
        for i in range(first, min(first + 4, layers)):
            shard |= {fam.layer_prefix(i) + k: v for k, v in fam.block_tensors(spec).items()}
        shards.append(shard)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cfg.dtype = torch.bfloat16
    cfg.save_pretrained(out)
    weight_map = {}
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        C._write_safetensors(out / name, shard, torch.bfloat16, fill)
        weight_map |= dict.fromkeys(shard, name)
        with open(out / name, "rb") as f:
            os.fsync(f.fileno())  # clean pages: the drop-behind can evict them
        C.log(f"wrote {name}")
    import json

    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "complete").write_text("ok\n")
    return out


def shard_files(model: Path) -> list[str]:
    return sorted(str(p) for p in model.glob("*.safetensors"))


def evict(files: list[str]) -> None:
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_rate(files: list[str], max_bytes: int) -> float:
    """Cold sequential read rate (bytes/s) of the files: preads with the next 256 MiB queued at the
    disk (host_tier.measure_read_rate), as many files as max_bytes takes."""
    evict(files)
    m = host_tier.measure_read_rate(files, max_bytes=max_bytes, max_seconds=600.0)
    evict(files)
    return m["bytes_per_second"]


def open_engine(model: Path, host_memory: int, mode: str) -> Engine:
    host_tier.HostTier.__init__.__defaults__ = (2, mode)  # the readahead mode under test
    cfg = EngineConfig(
        str(model),
        device="cpu",
        stream=StreamConfig(gpu_memory_bytes=0, host_memory_bytes=host_memory),
        limits=LimitsConfig(max_batch=1, max_seq_len=64),
    )
    return Engine(cfg, tokenizer=C.TokenStandIn())


def run_case(model: Path, host_memory: int, mode: str, new_tokens: int, job_root: Path) -> list[dict]:
    files = shard_files(model)
    evict(files)
    eng = open_engine(model, host_memory, mode)
    tier = eng.streamer.tier
    assert tier is not None
    disk_bytes = sum(sum(s.nbytes for s in tier.spans[i]) for i in tier.plan.streamed)
    rows = []
    # The tier alone: one pass whose consumer touches one element per 4 KiB page (no model compute).
    io0, passes0, t0 = host_tier.process_io(), eng.streamer.stats.passes, time.perf_counter()
    stall0 = tier.stats.stall_seconds
    for _i, w in eng.streamer.blocks():
        for t in w.values():
            t.reshape(-1)[:: 4096 // t.element_size()].float().sum()
    rows.append(_row("stream only", mode, eng, tier, disk_bytes, io0, passes0, t0, stall0))
    io0, passes0, t0 = host_tier.process_io(), eng.streamer.stats.passes, time.perf_counter()
    stall0 = tier.stats.stall_seconds
    req = GenerateRequest(
        "a", [1, 2, 3, 4], SamplingParams(), StopParams(max_new_tokens=new_tokens, ignore_eos=True)
    )
    eng.generate([req])
    rows.append(_row("generate", mode, eng, tier, disk_bytes, io0, passes0, t0, stall0))
    prompt = list(range(1, 9))
    ds = D.Dataset("text", [D.Example(tuple(prompt), (D.IGNORE, *prompt[1:]))])
    zo = ZOConfig(method="lora", steps=1, batch_size=1, max_len=16)
    job = job_root / f"job-{mode}"
    tr = open_trainer(zo, job, eng.store, ds, 0, eng.device, eng.dtype, eng.streamer, eng.cfg.stream)
    io0, passes0, t0 = host_tier.process_io(), eng.streamer.stats.passes, time.perf_counter()
    stall0 = tier.stats.stall_seconds
    tr.run_step()
    rows.append(_row("LoRA ZO step", mode, eng, tier, disk_bytes, io0, passes0, t0, stall0))
    tier.close()
    shutil.rmtree(job, ignore_errors=True)
    del tr, eng, tier
    gc.collect()
    return rows


def _row(what, mode, eng, tier, disk_bytes, io0, passes0, t0, stall0) -> dict:
    seconds = time.perf_counter() - t0
    io = host_tier.process_io()
    return {
        "what": what,
        "mode": mode,
        "passes": eng.streamer.stats.passes - passes0,
        "seconds": seconds,
        "disk_bytes_per_pass": disk_bytes,
        "read_bytes": io["read_bytes"] - io0["read_bytes"],
        "major_faults": io["major_faults"] - io0["major_faults"],
        "stall_s": tier.stats.stall_seconds - stall0,
        "rss_file": io["rss_file"],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", type=Path, default=None, help="where the model is written (default: bench cache)")
    p.add_argument("--shape", default="llama3-8b", choices=sorted(C.SHAPES))
    p.add_argument("--layers", type=int, default=0, help="0: enough to exceed RAM by 1.5 GB")
    p.add_argument("--host-memory", type=float, default=4.0, metavar="GIB", help="host budget (default 4)")
    p.add_argument("--modes", default="read,willneed")
    p.add_argument("--new-tokens", type=int, default=2)
    p.add_argument("--floor-bytes", type=float, default=8, metavar="GIB", help="sequential read sample")
    p.add_argument("--keep", action="store_true", help="keep the model file")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument(
        "--quick", action="store_true", help="2 layers, host budget 0, 1 GiB floor sample: a smoke run"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick:
        args.host_memory = 0.0  # 2 layers fit any budget: stream them all
    torch.set_num_threads(args.threads)  # default 1: one core computes, the other reads ahead
    root = args.dir or C.default_root() / "disk"
    ram = mem_total()
    cfg = C.hf_config(args.shape, 1)
    fam = C.family_for(cfg)
    spec = fam.make_spec(cfg)
    block = sum(math.prod(s) for s in fam.block_tensors(spec).values()) * 2
    outer = sum(math.prod(s) for s in fam.outer_tensors(spec).values()) * 2
    layers = 2 if args.quick else args.layers or math.ceil((ram + 1.5e9 - outer) / block)
    size = outer + layers * block
    free = shutil.disk_usage(root.parent if not root.exists() else root).free
    model = root / f"{args.shape}-L{layers}"
    if not (model / "complete").exists() and free < size + 2e9:
        sys.exit(f"bench/disk.py: needs {size / 1e9:.1f} GB free in {root}, has {free / 1e9:.1f} GB")
    C.log(f"model {args.shape} x {layers} layers = {size / 1e9:.1f} GB (RAM {ram / 1e9:.1f} GB) in {model}")
    t0 = time.perf_counter()
    write_model(model, args.shape, layers)
    C.log(f"written in {time.perf_counter() - t0:.0f} s")
    try:
        files = shard_files(model)
        load0 = os.getloadavg()
        sample = int((1 if args.quick else args.floor_bytes) * 2**30)
        rate0 = sequential_rate(files, sample)
        C.log(f"sequential read {rate0 / 1e9:.3f} GB/s")
        rows = []
        for mode in C.split_list(args.modes):
            rows += run_case(model, int(args.host_memory * 2**30), mode, args.new_tokens, root)
            C.log(f"{mode}: " + ", ".join(f"{r['what']} {r['seconds']:.1f} s" for r in rows[-3:]))
        load1 = os.getloadavg()
        rate1 = sequential_rate(files, sample)  # again after the runs: the disk is shared
        rate = (rate0 + rate1) / 2
        C.log(f"sequential read {rate1 / 1e9:.3f} GB/s")
        out = []
        for r in rows:
            per_pass = r["seconds"] / max(r["passes"], 1)
            floor = r["disk_bytes_per_pass"] / rate
            out.append([
                r["what"], r["mode"], r["passes"], C.fmt(r["disk_bytes_per_pass"] / 1e9),
                C.fmt(1 / per_pass), C.fmt(1 / floor), C.fmt(floor / per_pass),
                C.fmt(r["read_bytes"] / r["seconds"] / 1e9), r["major_faults"], C.fmt(r["stall_s"]),
            ])  # fmt: skip
        print(
            f"{C.machine_line(torch.device('cpu'))}; RAM {ram / 2**30:.1f} GiB; file {size / 1e9:.1f} GB "
            f"({layers} x {args.shape} layers); host budget {args.host_memory:g} GiB; sequential read "
            f"{rate0 / 1e9:.3f} GB/s before, {rate1 / 1e9:.3f} after (floor: the mean); "
            f"load average {load0[0]:.1f} -> {load1[0]:.1f}"
        )
        print(C.table(
            "Disk tier: passes/s against the disk floor",
            ["pass", "readahead", "passes", "disk GB/pass", "passes/s", "floor passes/s", "ratio",
             "read GB/s", "major faults", "stall s"],
            out,
        ))  # fmt: skip
    finally:
        if not args.keep:
            shutil.rmtree(model, ignore_errors=True)


if __name__ == "__main__":
    main()
