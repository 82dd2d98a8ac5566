"""The device checks of bench/gpu_check.sh that need Python: host registration, transfer rates,
generator throughput and the streamer's pipeline against its transfer floor.

    python bench/gpu_probe.py register|generator|pipeline [--device cuda|emu] [--mb 256]

register  : for a read-only file mapping, a shared (writable) file mapping and a /dev/shm file:
            whether registration succeeds (driver API, memlock checked first) and H2D / D2H GB/s
            from that memory (registered, else through pageable memory).
generator : noise elements/s of the portable generator (rademacher, gaussian) against torch.randn.
pipeline  : a random model streamed with --gpu-memory 0, no compute: frozen (H2D only) and mutable
            (every block written back: H2D + D2H), bytes per second against the link floor measured
            in the same run. Which host path ran (registered or staging) is printed with each row.
On `--device emu` every probe runs on the emulated device (the dry run CI does): the figures are
host memcpy rates and only show that the probes work.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import fmt, make_model, measure_link

from zostream.engine import rng
from zostream.engine.config import StreamConfig
from zostream.engine.emu import EmuDevice
from zostream.engine.store import WeightStore
from zostream.engine.streamer import LayerStreamer

GB = 1e9


def _device(name: str) -> tuple[torch.device, EmuDevice | None]:
    if name == "emu":
        return torch.device("cpu"), EmuDevice()
    return torch.device(name), None


def _rate(nbytes: int, fn, device: torch.device, reps: int = 3) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return nbytes * reps / max(time.perf_counter() - t0, 1e-9) / GB


def _copies(host: torch.Tensor, n: int, device: torch.device, emu: EmuDevice | None, registered: bool):
    """(h2d, d2h) callables copying all of host to a device buffer and back, each complete on return."""
    if emu is not None:
        buf, s = emu.empty(n), emu.stream("probe")

        def emu_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
            emu.copy(dst, src, s)
            s.synchronize()

        return (lambda: emu_copy(buf, host)), (lambda: emu_copy(host, buf))
    dbuf = torch.empty(n, dtype=torch.uint8, device=device)
    return (lambda: dbuf.copy_(host, non_blocking=registered)), (
        lambda: host.copy_(dbuf, non_blocking=registered)
    )


def _register(
    span: list[tuple[int, int]], read_only: bool, emu: EmuDevice | None
) -> tuple[list[int], object]:
    if emu is not None:
        return emu.register(span, read_only), emu.unregister
    from zostream.engine import cuda_device

    return cuda_device.host_register(span, read_only), cuda_device.host_unregister


def _probe_one(
    label: str, where: str, writable: bool, device: torch.device, emu: EmuDevice | None, n: int
) -> str:
    fd, path = tempfile.mkstemp(dir=where, prefix="zostream-probe-")
    m = None
    try:
        os.ftruncate(fd, n)
        if writable:  # what a full-parameter job's working copy is
            m = mmap.mmap(fd, n, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
            host = torch.frombuffer(m, dtype=torch.uint8)
        else:  # what the frozen base is: a private mapping the engine never writes
            host = torch.from_file(path, shared=False, size=n, dtype=torch.uint8)
        ptrs, unregister = _register([(host.data_ptr(), n)], not writable, emu)
        h2d, d2h = _copies(host, n, device, emu, bool(ptrs))
        up = _rate(n, h2d, device)
        down = _rate(n, d2h, device) if writable else float("nan")
        unregister(ptrs)  # type: ignore[operator]  # before the mapping goes away
        del host, h2d, d2h
        return f"| {label} | {'yes' if ptrs else 'no (pageable)'} | {fmt(up)} | {fmt(down)} |"
    finally:
        if m is not None:
            m.close()
        os.close(fd)
        os.unlink(path)


def register(a: argparse.Namespace) -> None:
    device, emu = _device(a.device)
    print("| host memory | registered | H2D GB/s | D2H GB/s |")
    print("|---|---|---|---|")
    dirs = [("file, private mapping", tempfile.gettempdir(), False), ("file, shared mapping", ".", True)]
    if Path("/dev/shm").is_dir():
        dirs.append(("/dev/shm, shared mapping", "/dev/shm", True))
    for label, where, writable in dirs:
        print(_probe_one(label, where, writable, device, emu, a.mb << 20))


def generator(a: argparse.Namespace) -> None:
    device, _ = _device(a.device)
    n = (a.mb << 20) // 4
    print("| generator | elements/s | vs torch.randn |")
    print("|---|---|---|")
    base = _rate(n, lambda: torch.randn(n, device=device), device)
    print(f"| torch.randn | {fmt(base * GB)} | 1.00 |")
    for kind in ("rademacher", "gaussian"):
        r = _rate(n, lambda k=kind: rng.noise(k, 7, "probe.weight", n, device=device), device)
        print(f"| rng.noise {kind} | {fmt(r * GB)} | {fmt(r / base)} |")


def _one_pass(st: LayerStreamer) -> None:
    """A pass with no compute; a mutable streamer writes every block back."""
    with st.open_pass() as blocks:
        for i, _w in blocks:
            if st.mutable:
                st.mark_dirty(i + 1, 0)


def pipeline(a: argparse.Namespace) -> None:
    device, emu = _device(a.device)
    link = measure_link(device, nbytes=a.mb << 20)
    model = make_model(a.shape, a.layers, torch.bfloat16, Path(a.cache) if a.cache else None)
    print(f"link ({link.kind}): H2D {fmt(link.h2d / GB)} GB/s, D2H {fmt(link.d2h / GB)}, ", end="")
    print(f"both ways {fmt(link.both / GB)}")
    print()
    print("| mode | host path | GB/s moved | floor GB/s | ratio to floor |")
    print("|---|---|---|---|---|")
    work = Path(tempfile.mkdtemp(prefix="zostream-probe-master-"))
    shutil.copytree(model, work / "m")  # a master is written back: a writable copy (the base never is)
    for mutable in (False, True):
        store = WeightStore(work / "m", writable=True) if mutable else WeightStore(model)
        st = LayerStreamer(store, device, store.dtype, StreamConfig(0, 3), mutable=mutable, emu=emu)
        path = st.host_path()

        _one_pass(st)
        s0 = st.stats.h2d_bytes + st.stats.d2h_bytes
        t0 = time.perf_counter()
        for _ in range(a.passes):
            _one_pass(st)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        moved = st.stats.h2d_bytes + st.stats.d2h_bytes - s0
        floor = link.both if mutable else link.h2d
        rate = moved / seconds
        mode = "mutable (H2D + D2H)" if mutable else "frozen (H2D)"
        print(f"| {mode} | {path} | {fmt(rate / GB)} | {fmt(floor / GB)} | {fmt(rate / floor)} |")
        st.close()
    shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("probe", choices=["register", "generator", "pipeline"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--mb", type=int, default=256, help="bytes per transfer / generator buffer")
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--cache", default=None)
    a = p.parse_args(argv)
    {"register": register, "generator": generator, "pipeline": pipeline}[a.probe](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
