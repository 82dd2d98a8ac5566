"""LayerStreamer: the ONLY owner of CUDA streams, events, pinned/registered host memory
and device weight slots.

A pass asks for blocks 0..L-1 in order. Blocks that fit the budget are resident
(decoded once, kept on the device); the rest stream through `prefetch_depth`
preallocated slots: H2D copies run on a copy stream up to `depth` blocks ahead, the
compute stream waits on a per-slot "ready" event, and the copy stream waits on a
per-slot "free" event before overwriting a slot. The host never synchronises.

On a CPU device the same code runs with no copies: the host tensors (mmap views or
codec-packed views) are decoded straight into compute tensors.

Two modes:
- frozen (generation, LoRA jobs): blocks are decoded to the compute dtype;
- mutable (full-parameter jobs): blocks are the MASTER tensors on the device, in the
  master dtype; the caller updates them in place and `mark_dirty(i)` schedules the
  D2H write-back into the host working copy (a shared mmap) before the slot is reused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .config import StreamConfig
from .host_tier import HostTier, file_spans, read_maps
from .store import WeightStore

_HOST_REGISTER_READONLY = 8  # cudaHostRegisterReadOnly
_HOST_REGISTER_DEFAULT = 0


@dataclass(frozen=True)
class ResidencyPlan:
    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    slot_bytes: int  # bytes of one streaming slot (largest packed streamed block)
    resident_bytes: int
    budget: int | None

    @property
    def all_resident(self) -> bool:
        return not self.streamed


def plan_residency(
    packed_bytes: list[int], decoded_bytes: list[int], outer_bytes: int, budget: int | None, depth: int
) -> ResidencyPlan:
    """Keep the first blocks resident while they fit; the rest stream through `depth` slots.

    Resident blocks come first so the first streamed blocks prefetch behind them.
    budget None: everything resident; 0: every block streams (outer weights always stay).
    """
    n = len(packed_bytes)
    if budget is None:
        return ResidencyPlan(tuple(range(n)), (), 0, sum(decoded_bytes), None)
    slot = max(packed_bytes, default=0)
    # Streaming needs depth slots plus one decoded copy in flight.
    stream_cost = depth * slot + max(decoded_bytes, default=0)
    left = budget - outer_bytes - stream_cost
    resident: list[int] = []
    used = 0
    if budget > 0:
        for i in range(n):
            if used + decoded_bytes[i] > left:
                break
            used += decoded_bytes[i]
            resident.append(i)
        if len(resident) == n - 1 and used + decoded_bytes[-1] <= budget - outer_bytes:
            resident.append(n - 1)  # the last block fits once no slots are needed
            used += decoded_bytes[-1]
    streamed = tuple(i for i in range(n) if i not in set(resident))
    return ResidencyPlan(tuple(resident), streamed, slot if streamed else 0, used, budget)


@dataclass
class StreamStats:
    h2d_bytes: int = 0
    d2h_bytes: int = 0
    transfer_seconds: float = 0.0  # CPU: decode time; CUDA: copy-stream time (resolved lazily)
    stall_seconds: float = 0.0  # compute waiting on a transfer
    passes: int = 0
    _pending: list = field(default_factory=list)


BlockSource = Callable[[int], dict[str, torch.Tensor]]  # host tensors of block i (packed or raw)
BlockDecoder = Callable[[dict[str, torch.Tensor], torch.device, torch.dtype], dict[str, torch.Tensor]]


class LayerStreamer:
    def __init__(
        self,
        store: WeightStore,
        device: torch.device,
        dtype: torch.dtype,
        cfg: StreamConfig,
        source: BlockSource | None = None,
        decoder: BlockDecoder | None = None,
        packed_nbytes: Callable[[int], int] | None = None,
        mutable: bool = False,
    ) -> None:
        self.store = store
        self.device = device
        self.dtype = dtype  # compute dtype (frozen) or master dtype (mutable)
        self.cfg = cfg
        self.mutable = mutable
        self.source: BlockSource = source or store.block
        self.decoder: BlockDecoder = decoder or _identity_decode
        self.cuda = device.type == "cuda"
        n = store.num_layers
        packed = [packed_nbytes(i) if packed_nbytes else store.block_nbytes(i) for i in range(n)]
        decoded = [self._decoded_nbytes(i) for i in range(n)]
        outer = sum(t.numel() * dtype.itemsize for t in store.outer().values())
        budget = cfg.gpu_memory_bytes
        if budget is None and self.cuda:
            # "auto": what the device has free now, minus headroom for activations and the KV cache.
            free, _total = torch.cuda.mem_get_info(device)
            budget = int(free * 0.8)
        self.plan = plan_residency(packed, decoded, outer, budget, cfg.prefetch_depth)
        self.stats = StreamStats()
        self.tier = self._host_tier()
        self._outer = {k: self._to_device(v) for k, v in store.outer().items()}
        self._resident: dict[int, dict[str, torch.Tensor]] = {}
        for i in self.plan.resident:
            self._resident[i] = self._load_blocking(i)
        self._dirty: set[int] = set()
        self._cuda = _CudaSlots(self, self.plan.slot_bytes) if self.cuda and self.plan.streamed else None

    # ---- public ----------------------------------------------------------------------------
    def outer(self) -> dict[str, torch.Tensor]:
        """Embeddings / final norm / head on the device (always resident)."""
        return self._outer

    def blocks(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """One pass: yield (i, weights of block i on the device) for i = 0..L-1, in order."""
        self.stats.passes += 1
        if self._cuda is not None:
            self._cuda.start_pass()
        tier = self.tier if self._cuda is None else None  # CUDA: _CudaSlots calls it at copy time
        for i in range(self.store.num_layers):
            if tier is not None:
                tier.before(i)
            if i in self._resident:
                yield i, self._resident[i]
            elif self._cuda is not None:
                yield i, self._cuda.acquire(i)
                self._cuda.release(i, i in self._dirty)
            else:
                t0 = time.perf_counter()
                w = self._load_blocking(i)
                self.stats.transfer_seconds += time.perf_counter() - t0
                yield i, w
                if i in self._dirty:
                    self._write_back_cpu(i, w)
            self._dirty.discard(i)
            if tier is not None:
                tier.after(i)

    def mark_dirty(self, i: int) -> None:
        """The caller updated block i's master in place: write it back before reuse."""
        assert self.mutable, "only a mutable (full-parameter) streamer writes back"
        self._dirty.add(i)

    def flush_resident(self) -> None:
        """Write resident masters back to the host copy (checkpoint / export / job end)."""
        if not self.mutable:
            return
        for i, w in self._resident.items():
            self._write_back_cpu(i, w)
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def resident_block(self, i: int) -> dict[str, torch.Tensor] | None:
        return self._resident.get(i)

    # ---- internals ---------------------------------------------------------------------------
    def _host_tier(self) -> HostTier | None:
        """A host-memory budget on a read-only base: blocks beyond it stream from the file."""
        if self.cfg.host_memory_bytes is None or self.mutable:
            return None
        skip = set(self.plan.resident) if self.cuda else set()  # read once onto the device, never again
        maps = read_maps()
        spans = [
            [] if i in skip else file_spans(self.source(i).values(), maps)
            for i in range(self.store.num_layers)
        ]
        return HostTier(spans, self.store.outer_nbytes(), self.cfg.host_memory_bytes, self.cfg.prefetch_depth)

    def _decoded_nbytes(self, i: int) -> int:
        return sum(t.numel() * self.dtype.itemsize for t in self.store.block(i).values())

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        # CPU, same dtype: the mapped tensor itself, no copy (a mutable master: the host working copy;
        # a frozen base: a read-only mapping, where a write faults, so no private copy is needed, and
        # an outer tensor larger than RAM stays paged). Another device or dtype copies anyway.
        return t.to(self.device, self.dtype)

    def _load_blocking(self, i: int) -> dict[str, torch.Tensor]:
        host = self.source(i)
        self.stats.h2d_bytes += sum(t.numel() * t.element_size() for t in host.values()) if self.cuda else 0
        if self.mutable:
            return {k: self._to_device(v) for k, v in host.items()}
        on_dev = {k: v.to(self.device, non_blocking=False) for k, v in host.items()}
        return self.decoder(on_dev, self.device, self.dtype)

    def _write_back_cpu(self, i: int, w: dict[str, torch.Tensor]) -> None:
        host = self.source(i)
        for k, t in w.items():
            if t.data_ptr() != host[k].data_ptr():
                host[k].copy_(t)
                self.stats.d2h_bytes += t.numel() * t.element_size()


def _identity_decode(packed: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    return {k: v.to(device, dtype) for k, v in packed.items()}


class _CudaSlots:
    """Preallocated device slots, a copy stream and events; host memory registered or staged."""

    def __init__(self, owner: LayerStreamer, slot_bytes: int) -> None:
        self.o = owner
        dev = owner.device
        depth = owner.cfg.prefetch_depth
        self.copy_stream = torch.cuda.Stream(dev)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=dev) for _ in range(depth)]
        self.ready = [torch.cuda.Event() for _ in range(depth)]
        self.free = [torch.cuda.Event() for _ in range(depth)]
        self.slot_of: dict[int, int] = {}
        self.order = list(owner.plan.streamed)
        self.next_issue = 0
        # Under a host budget the tier decides what stays in RAM; registering the whole mapping would pin
        # all of it, so streamed blocks go through the pinned staging ring (pins depth x slot bytes).
        # TODO(host tier): register the spans of owner.tier.plan.resident and stage only the rest.
        self.registered = owner.cfg.register_host_memory and owner.tier is None and self._register_host()
        self.staging = (
            None
            if self.registered
            else [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(depth)]
        )
        self.staged = [torch.cuda.Event() for _ in range(depth)]

    def _register_host(self) -> bool:
        """cudaHostRegister(ReadOnly) every mapped file once: mmap -> device at the pinned rate."""
        cudart = torch.cuda.cudart()
        flags = _HOST_REGISTER_DEFAULT if self.o.mutable else _HOST_REGISTER_READONLY
        seen: set[int] = set()
        for i in self.order:
            for t in self.o.source(i).values():
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr in seen:
                    continue
                seen.add(ptr)
                err = cudart.cudaHostRegister(ptr, storage.nbytes(), flags)
                if int(err) != 0:
                    return False  # memlock limits, non-Linux...: fall back to the staging ring
        return True

    def start_pass(self) -> None:
        self.next_issue = 0
        self.slot_of.clear()
        for _ in range(min(len(self.slots), len(self.order))):
            self._issue()

    def _issue(self) -> None:
        if self.next_issue >= len(self.order):
            return
        i = self.order[self.next_issue]
        s = self.next_issue % len(self.slots)
        self.next_issue += 1
        self.slot_of[i] = s
        host = self.o.source(i)
        tier = self.o.tier
        if tier is not None:
            tier.before(i)  # its pages are in RAM (read ahead); the staging copies below are synchronous
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.free[s])
            off = 0
            for t in host.values():
                n = t.numel() * t.element_size()
                dst = self.slots[s][off : off + n]
                src = t.reshape(-1).view(torch.uint8)
                if self.staging is not None:
                    self.staged[s].synchronize()  # the previous H2D from this staging buffer is done
                    self.staging[s][off : off + n].copy_(src)
                    src = self.staging[s][off : off + n]
                dst.copy_(src, non_blocking=True)
                off = _align(off + n)
            self.staged[s].record(self.copy_stream)
            self.ready[s].record(self.copy_stream)
            self.o.stats.h2d_bytes += off
        if tier is not None:
            tier.after(i)

    def acquire(self, i: int) -> dict[str, torch.Tensor]:
        s = self.slot_of[i]
        torch.cuda.current_stream(self.o.device).wait_event(self.ready[s])
        host = self.o.source(i)
        off, views = 0, {}
        for k, t in host.items():
            n = t.numel() * t.element_size()
            views[k] = self.slots[s][off : off + n].view(t.dtype).view(t.shape)
            off = _align(off + n)
        if self.o.mutable:
            return views
        return self.o.decoder(views, self.o.device, self.o.dtype)

    def release(self, i: int, dirty: bool) -> None:
        s = self.slot_of[i]
        compute_done = torch.cuda.Event()
        compute_done.record(torch.cuda.current_stream(self.o.device))
        if dirty:
            host = self.o.source(i)
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(compute_done)
                off = 0
                for t in host.values():
                    n = t.numel() * t.element_size()
                    t.reshape(-1).view(torch.uint8).copy_(self.slots[s][off : off + n], non_blocking=True)
                    off = _align(off + n)
                    self.o.stats.d2h_bytes += n
                self.free[s].record(self.copy_stream)
        else:
            self.free[s].record(torch.cuda.current_stream(self.o.device))
        self._issue()


def _align(n: int, a: int = 256) -> int:
    return (n + a - 1) // a * a
