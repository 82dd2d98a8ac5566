"""Where a full-parameter job's master lives, and what it costs: the job directory vs a tmpfs.

    python bench/master_dir.py --model DIR [--shm /dev/shm] [--devices cpu,emu] [--batch 4] [--seq 64]
                               [--steps 3] [--root DIR]

For each master location (the job directory's file system; --shm, a tmpfs whose shared memory CUDA
can register) and device (cpu: the direct path, the master's mapping is the weights; emu: every block
streams, uploaded from the mapping and written back into it): the seconds to make the master from the
base, per ZO step (mean of --steps after one warm-up step; fp32 master, MeZO, q=1), and to export
it, in wall time; the configurations run interleaved --rounds times and the best round counts (the
first run of a process also compiles kernels). The tmpfs costs the master's bytes in RAM that cannot
be dropped; the file costs dirty pages the kernel writes back to disk.
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
from common import default_root, log, machine_line

from zostream.engine import data as D
from zostream.engine.config import StreamConfig, ZOConfig
from zostream.engine.emu import EmuDevice
from zostream.engine.finetune import export, open_trainer
from zostream.engine.store import WeightStore
from zostream.engine.streamer import LayerStreamer

CPU = torch.device("cpu")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Hugging Face model directory (the base)")
    p.add_argument("--shm", default="/dev/shm", help="the tmpfs to compare with the job directory")
    p.add_argument("--devices", default="cpu,emu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="every configuration this many times, interleaved")
    p.add_argument("--root", default=None, help="where job directories go (default: the bench cache)")
    return p.parse_args(argv)


def fs_type(path: Path) -> str:
    """The file system type of path's mount (Linux /proc/mounts; '?' elsewhere)."""
    best, kind = "", "?"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mnt, fs, *_ = line.split()
            if str(path.resolve()).startswith(mnt) and len(mnt) > len(best):
                best, kind = mnt, fs
    except OSError:
        pass
    return kind


def run(a: argparse.Namespace, root: Path, device: str, master_dir: str | None) -> dict[str, Any]:
    store = WeightStore(a.model)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(1, store.spec.vocab, (a.batch * 4, a.seq), generator=g).tolist()
    ds = D.Dataset("text", [D.Example(tuple(r), (D.IGNORE, *r[1:])) for r in rows], [], "bench-random")
    cfg = ZOConfig(
        method="full", steps=a.steps + 1, batch_size=a.batch, q=1, max_len=a.seq, estimator="mezo", lr=1e-6
    )
    sc = StreamConfig(gpu_memory_bytes=0 if device == "emu" else None, master_dir=master_dir)
    emu = EmuDevice() if device == "emu" else None
    base = LayerStreamer(store, CPU, store.dtype, sc, emu=emu)
    job = Path(tempfile.mkdtemp(prefix="master-dir-", dir=root))
    try:
        t0 = time.perf_counter()
        tr = open_trainer(cfg, job, store, ds, 0, CPU, store.dtype, base, sc)
        create = time.perf_counter() - t0
        tr.run_step()  # warm-up
        steps = []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            tr.run_step()
            steps.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        export(tr, job)
        exp = time.perf_counter() - t0
        where = tr.working_copy.dir
        tr.log.close()
    finally:
        target = job / "working"
        if target.is_symlink():
            shutil.rmtree(target.resolve(), ignore_errors=True)
        shutil.rmtree(job, ignore_errors=True)
    return {"create": create, "step": mean(steps), "export": exp, "where": where}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    root = Path(a.root) if a.root else default_root()
    root.mkdir(parents=True, exist_ok=True)
    places = [("job directory", None, fs_type(root)), (a.shm, a.shm, fs_type(Path(a.shm)))]
    best: dict[tuple[str, str, str], dict[str, Any]] = {}
    for _ in range(a.rounds):
        for device in a.devices.split(","):
            for name, master_dir, fs in places:
                log(f"master-dir: {device}, master in {name} ({fs})")
                r = run(a, root, device, master_dir)
                log(f"master-dir: {r}")
                k = (device, name, fs)
                if k not in best or r["step"] < best[k]["step"]:
                    best[k] = r
    rows = [(d, n, fs, r) for (d, n, fs), r in best.items()]
    print(machine_line(CPU))
    store = WeightStore(a.model)
    print(
        f"\n{Path(a.model).name}, full-parameter fp32 master, MeZO q=1, batch {a.batch} x {a.seq}, "
        f"{a.steps} steps after a warm-up (emu: --gpu-memory 0, every block streams)\n"
    )
    print("| device | master in | fs | make master s | step s | export s |")
    print("|---|---|---|---|---|---|")
    for device, name, fs, r in rows:
        print(f"| {device} | {name} | {fs} | {r['create']:.2f} | {r['step']:.3f} | {r['export']:.2f} |")
    by = {(d, n): r["step"] for d, n, _, r in rows}
    for device in a.devices.split(","):
        ratio = by[(device, a.shm)] / by[(device, "job directory")]
        print(f"\n{device}: step with the master in {a.shm} / in the job directory = {ratio:.2f}")
    print(f"({store.num_layers} layers)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
