"""LayerStreamer: the ONLY owner of device streams, events, registered host memory, weight slots
and write-back (docs/ARCHITECTURE.md follows one tensor through it).

A pass asks for blocks 0..L-1 in order. Blocks that fit the budget are resident
(decoded once, kept on the device); the rest stream through `depth` preallocated slots:
H2D copies run on their own stream up to `depth` blocks ahead, compute waits on a per-slot
"ready" event, and the H2D stream waits on a per-slot "free" event before overwriting a slot.
Write-back (D2H) runs on a second stream, so uploads and write-backs overlap.

Three device kinds, one code path for the two that copy:
- cuda: a GPU (cuda_device.CudaDevice);
- emu: CPU memory playing a GPU (emu.EmuDevice): real copies into separate buffers, asynchronous
  copy engines, CUDA event semantics; what the tests use to run the GPU's path without one;
- cpu: no copies at all: host tensors (mmap views or codec-packed views) are decoded straight into
  compute tensors, and a mutable block IS the host working copy.

Two modes:
- frozen (generation, LoRA jobs): blocks are decoded to the compute dtype;
- mutable (full-parameter jobs): blocks are the MASTER tensors on the device, in the master dtype.
  The caller updates them in place and `mark_dirty(group, tag)`s them; a streamed block is written
  back when it is released, resident blocks and the outer tensors at `flush()`. The write-back hook
  is called with (group, tag, landed=False) before the host copy is touched and (group, tag,
  landed=True) once the copy has landed there: the owner moves its durable counters in the hook.

Where blocks sit (groups, slot layouts, the residency plan) is residency.py; the copy machinery of the
streamed blocks (slots, streams, events, host registration) is stream_slots.StreamSlots, which only
LayerStreamer builds and drives.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from . import cuda_device
from .config import StreamConfig
from .host_tier import HostTier, file_spans, read_maps
from .residency import OUTER, block_nbytes, group_of_block, plan_residency, slot_layout
from .store import WeightStore
from .stream_slots import CLEAN, StreamSlots


@dataclass
class StreamStats:
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    transfer_seconds: float = 0.0  # direct CPU path: decode time; slots (emu, CUDA): the uploads' H2D
    # stream time from timed events, counted once they complete (and a staging ring's host copies)
    stall_seconds: float = 0.0  # compute waiting on a transfer
    passes: int = 0


BlockSource = Callable[[int], dict[str, torch.Tensor]]  # host tensors of block i (packed or raw)
BlockDecoder = Callable[[dict[str, torch.Tensor], torch.device, torch.dtype], dict[str, torch.Tensor]]
WriteBackHook = Callable[[int, Any, bool], None]  # (group, tag, landed)


class LayerStreamer:
    def __init__(
        self,
        store: WeightStore,
        device: torch.device,
        dtype: torch.dtype,
        cfg: StreamConfig,
        source: BlockSource | None = None,
        decoder: BlockDecoder | None = None,
        mutable: bool = False,
        emu: Any = None,
        on_write_back: WriteBackHook | None = None,
        resident_extra_bytes: int = 0,
    ) -> None:
        """device: where compute runs (cpu for emu). emu: an emu.EmuDevice to play the GPU on the CPU.
        on_write_back: the mutable owner's counter hook (see the module docstring).
        resident_extra_bytes: device bytes a block costs on top of its weights when resident (its KV pool
        when streamed layers' KV is offloaded: kv_offload.py)."""
        self.store = store
        self.device = device
        self.dtype = dtype  # compute dtype (frozen) or master dtype (mutable)
        self.cfg = cfg
        self.mutable = mutable
        self.source: BlockSource = source or store.block
        self.decoder: BlockDecoder = decoder or _identity_decode
        self.on_write_back = on_write_back
        self.cuda = device.type == "cuda"
        self.emu = emu
        self.dev: Any = emu if emu is not None else (cuda_device.CudaDevice(device) if self.cuda else None)
        self.copies = self.dev is not None  # False: the direct CPU path
        n = store.num_layers
        self.layouts = [slot_layout(self.source(i)) for i in range(n)]
        decoded = [self._decoded_nbytes(i) for i in range(n)]
        outer = sum(t.numel() * dtype.itemsize for t in store.outer().values())
        budget = cfg.gpu_memory_bytes
        if budget is None and self.cuda:
            # "auto": what the device has free now, minus headroom for activations and the KV cache.
            free, _total = torch.cuda.mem_get_info(device)
            budget = int(free * 0.8)
        # A mutable slot is busy until its write-back lands: depth 3 keeps one upload, one compute and one
        # write-back in flight at once.
        self.depth = max(cfg.prefetch_depth, 3) if mutable and self.copies else cfg.prefetch_depth
        with_kv = [d + resident_extra_bytes for d in decoded]
        self.plan = plan_residency([lay.nbytes for lay in self.layouts], with_kv, outer, budget, self.depth)
        self.kv_travel: Any = None  # kv_offload.KVOffload: streamed layers' KV rides their copies
        self.stats = StreamStats()
        self.tier = self._host_tier()
        self._outer = {k: self._to_device(v) for k, v in store.outer().items()}
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        for i in self.plan.resident:
            self._resident[i] = self._load_blocking(i)
        self._dirty: dict[int, Any] = {}  # group -> tag of its pending write-back
        self._slots = StreamSlots(self) if self.copies and self.plan.streamed else None

    # ---- public ----------------------------------------------------------------------------
    def outer(self) -> dict[str, torch.Tensor]:
        """Embeddings / final norm / head on the device (always resident)."""
        return self._outer

    @contextlib.contextmanager
    def open_pass(self) -> Iterator[Iterator[tuple[int, dict[str, torch.Tensor]]]]:
        """One pass as a context: iterate (i, weights of block i on the device) for i = 0..L-1.
        Leaving it, normally or by an exception, releases the block in use (writing it back if dirty) and
        waits for the pass's write-backs to land, so the streamer is ready for the next pass."""
        self.stats.passes += 1
        self._current: int | None = None
        try:
            with self.compute_memory():
                yield self._iterate()
        finally:
            if self._slots is not None:
                if self._current is not None:
                    self._slots.release(self._current, self._dirty.pop(group_of_block(self._current), CLEAN))
                self._slots.end_pass()

    def compute_memory(self) -> contextlib.AbstractContextManager[None]:
        """On emu, count what compute allocates as device memory (emu.EmuDevice.track_compute); reentrant."""
        return self.emu.track_compute() if self.emu is not None else contextlib.nullcontext()

    def blocks(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """One pass (see open_pass; prefer it where the loop body can raise)."""
        with self.open_pass() as it:
            yield from it

    def _iterate(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        slots = self._slots
        if slots is not None:
            slots.start_pass()
        tier = self.tier if slots is None else None  # with slots: StreamSlots calls it at copy time
        for i in range(self.store.num_layers):
            if tier is not None:
                tier.before(i)
            if i in self._resident:
                yield i, self._resident[i]
            elif slots is not None:
                w = slots.acquire(i)
                self._current = i
                yield i, w
                self._current = None
                slots.release(i, self._dirty.pop(group_of_block(i), CLEAN))
            else:
                t0 = time.perf_counter()
                w = self._load_blocking(i)
                self.stats.transfer_seconds += time.perf_counter() - t0
                yield i, w
                if self._dirty.pop(group_of_block(i), CLEAN) is not CLEAN:
                    self._write_back_cpu(i, w)
            if tier is not None:
                tier.after(i)
        if slots is not None:
            if self.kv_travel is not None:
                self.kv_travel.disarm()  # the next pass's first blocks: their KV waits for its views
            slots.prefetch_next_pass()

    def mark_dirty(self, group: int, tag: Any = None) -> None:
        """The caller updated group's master in place (OUTER or group_of_block(i)): write it back, and pass
        tag to the write-back hook. Streamed blocks go back on release, resident ones and OUTER at flush()."""
        assert self.mutable, "only a mutable (full-parameter) streamer writes back"
        self._dirty[group] = tag

    def flush(self) -> None:
        """Write dirty resident blocks and the outer tensors back to the host copy (checkpoint / eval /
        export / job end); returns once they have landed (the hook has moved their counters)."""
        if not self.mutable:
            return
        groups = [g for g in sorted(self._dirty) if g == OUTER or g - 1 in self._resident]
        for g in groups:
            tag = self._dirty.pop(g)
            if not self.copies:
                continue  # the CPU master is the host copy
            w = self._outer if g == OUTER else self._resident[g - 1]
            host = self.store.outer() if g == OUTER else self.source(g - 1)
            self.notify_write_back(g, tag, False)
            for k, t in w.items():
                self.dev.download(host[k], t)
                self.stats.d2h_bytes += t.numel() * t.element_size()
            self.notify_write_back(g, tag, True)

    flush_resident = flush  # the former name

    def resident_block(self, i: int) -> dict[str, torch.Tensor] | None:
        return self._resident.get(i)

    def host_path(self) -> str:
        """How streamed blocks reach the device: "none" (the direct CPU path, or every block resident),
        "registered" (copied from the registered mmap), "staging" (through the pinned staging ring) or
        "registered+staging" (under a host budget: the blocks kept in RAM registered, the rest staged)."""
        return "none" if self._slots is None else self._slots.host_path()

    def close(self) -> None:
        """Unregister host memory (before its mapping goes away); stop the host tier's readahead."""
        if self._slots is not None:
            self._slots.close()
        if self.tier is not None:
            self.tier.close()

    # ---- internals ---------------------------------------------------------------------------
    def notify_write_back(self, group: int, tag: Any, landed: bool) -> None:
        """Call the owner's write-back hook (on_write_back), if any: landed False before the host copy is
        touched, True once the copy has landed there."""
        if self.on_write_back is not None:
            self.on_write_back(group, tag, landed)

    def _host_tier(self) -> HostTier | None:
        """A host-memory budget on a read-only base: blocks beyond it stream from the file."""
        if self.cfg.host_memory_bytes is None or self.mutable:
            return None
        skip = set(self.plan.resident) if self.copies else set()  # read once onto the device, never again
        maps = read_maps()
        spans = [
            [] if i in skip else file_spans(self.source(i).values(), maps)
            for i in range(self.store.num_layers)
        ]
        return HostTier(spans, self.store.outer_nbytes(), self.cfg.host_memory_bytes, self.cfg.prefetch_depth)

    def _decoded_nbytes(self, i: int) -> int:
        return sum(t.numel() * self.dtype.itemsize for t in self.store.block(i).values())

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.copies:
            return self.dev.upload(t, self.dtype)
        # CPU, same dtype: the mapped tensor itself, no copy (a mutable master: the host working copy;
        # a frozen base: a read-only mapping, where a write faults, so no private copy is needed, and
        # an outer tensor larger than RAM stays paged). Another dtype copies anyway.
        return t.to(self.device, self.dtype)

    def _load_blocking(self, i: int) -> dict[str, torch.Tensor]:
        host = self.source(i)
        if self.copies:
            self.stats.h2d_bytes += block_nbytes(host)
            on_dev = {k: self.dev.upload(v) for k, v in host.items()}
            if self.mutable:
                return on_dev
            out = self.decoder(on_dev, self.device, self.dtype)
            # The packed upload is dropped once decoded.
            self.dev.account(block_nbytes(out) - block_nbytes(on_dev))
            return out
        if self.mutable:
            return {k: self._to_device(v) for k, v in host.items()}
        return self.decoder(host, self.device, self.dtype)

    def _write_back_cpu(self, i: int, w: dict[str, torch.Tensor]) -> None:
        host = self.source(i)
        for k, t in w.items():
            if t.data_ptr() != host[k].data_ptr():
                host[k].copy_(t)
                self.stats.d2h_bytes += t.numel() * t.element_size()


def _identity_decode(packed: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    return {k: v.to(device, dtype) for k, v in packed.items()}
