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
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import cuda_device
from .config import StreamConfig
from .host_tier import HostTier, file_spans, read_maps
from .store import WeightStore

OUTER = 0  # group of the outer tensors; block i is group i + 1 (the trainer's and the counters' index)
SLOT_ALIGN = 256  # tensors start at 256-byte offsets inside a slot (what vectorised kernels expect)


def group_of_block(i: int) -> int:
    return i + 1


@dataclass(frozen=True)
class SlotLayout:
    """Where block tensors sit in a slot: (name, byte offset, nbytes) each, and the bytes the slot needs."""

    items: tuple[tuple[str, int, int], ...]
    nbytes: int


def slot_layout(tensors: dict[str, torch.Tensor], align: int = SLOT_ALIGN) -> SlotLayout:
    """The one layout helper: slots are sized by it and filled and viewed through it."""
    off, items = 0, []
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        items.append((name, off, n))
        off = _align(off + n, align)
    return SlotLayout(tuple(items), off)


@dataclass(frozen=True)
class ResidencyPlan:
    resident: tuple[int, ...]
    streamed: tuple[int, ...]
    slot_bytes: int  # bytes of one streaming slot (largest slot layout of a streamed block)
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
    packed_bytes are slot sizes (slot_layout(...).nbytes for the host tensors of each block).
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
WriteBackHook = Callable[[int, Any, bool], None]  # (group, tag, landed)
_CLEAN = object()


def _nbytes(ts: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts.values())


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


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
        self._slots = _Slots(self) if self.copies and self.plan.streamed else None

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
                    self._slots.release(self._current, self._dirty.pop(group_of_block(self._current), _CLEAN))
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
        tier = self.tier if slots is None else None  # with slots: _Slots calls it at copy time
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
                slots.release(i, self._dirty.pop(group_of_block(i), _CLEAN))
            else:
                t0 = time.perf_counter()
                w = self._load_blocking(i)
                self.stats.transfer_seconds += time.perf_counter() - t0
                yield i, w
                if self._dirty.pop(group_of_block(i), _CLEAN) is not _CLEAN:
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
            self._hook(g, tag, False)
            for k, t in w.items():
                self.dev.download(host[k], t)
                self.stats.d2h_bytes += t.numel() * t.element_size()
            self._hook(g, tag, True)

    flush_resident = flush  # the former name

    def resident_block(self, i: int) -> dict[str, torch.Tensor] | None:
        return self._resident.get(i)

    def close(self) -> None:
        """Unregister host memory (before its mapping goes away); stop the host tier's readahead."""
        if self._slots is not None:
            self._slots.close()
        if self.tier is not None:
            self.tier.close()

    # ---- internals ---------------------------------------------------------------------------
    def _hook(self, group: int, tag: Any, landed: bool) -> None:
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
            self.stats.h2d_bytes += _nbytes(host)
            on_dev = {k: self.dev.upload(v) for k, v in host.items()}
            if self.mutable:
                return on_dev
            out = self.decoder(on_dev, self.device, self.dtype)
            self.dev.account(_nbytes(out) - _nbytes(on_dev))  # the packed upload is dropped once decoded
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


class _Slots:
    """Preallocated device slots, an H2D and a D2H stream, and the events that order them.

    Per slot s: ready[s] (its upload is done: compute may read), free[s] (its consumer and its
    write-back are done: the next upload may overwrite). Per block i: landed[i] (its last write-back
    reached the host: its next upload may read the host copy)."""

    def __init__(self, owner: LayerStreamer) -> None:
        self.o = owner
        dev, depth, slot_bytes = owner.dev, owner.depth, owner.plan.slot_bytes
        self.h2d, self.d2h = dev.stream("h2d"), dev.stream("d2h")
        self.slots = [dev.empty(slot_bytes) for _ in range(depth)]
        self.ready = [dev.event() for _ in range(depth)]
        self.free = [dev.event() for _ in range(depth)]
        self.staged = [dev.event() for _ in range(depth)]
        self.order = list(owner.plan.streamed)
        self.landed = {i: dev.event() for i in self.order}
        self.slot_of: dict[int, int] = {}
        self.next_issue = 0
        self.prefetched = False  # the next pass's first blocks were issued at the end of this one
        self.pending: list[tuple[Any, int, Any]] = []  # (event, group, tag) of write-backs in flight
        self.decoded = 0  # bytes of the frozen block decoded from the slot now in use
        self.registered: list[int] = []
        # Under a host budget the tier decides what stays in RAM; registering the whole mapping would pin
        # all of it, so streamed blocks go through the pinned staging ring (pins depth x slot bytes).
        # TODO(host tier): register the spans of owner.tier.plan.resident and stage only the rest.
        if owner.cfg.register_host_memory and owner.tier is None:
            self.registered = self._register_host()
        self.staging = None
        if not self.registered:
            self.staging = [dev.pinned(slot_bytes) for _ in range(depth)]
        weakref.finalize(self, _unregister, dev, list(self.registered))

    def _register_host(self) -> list[int]:
        """Register every mapped file once (read-only for frozen blocks): mmap -> device at the pinned rate.
        Fails as a whole (memlock, a kernel refusing a writable pin of a shared file mapping...): staging."""
        spans: dict[int, int] = {}
        for i in self.order:
            for t in self.o.source(i).values():
                st = t.untyped_storage()
                spans[st.data_ptr()] = st.nbytes()
        return self.o.dev.register(sorted(spans.items()), read_only=not self.o.mutable)

    def close(self) -> None:
        _unregister(self.o.dev, self.registered)
        self.registered = []

    def start_pass(self) -> None:
        if not self.prefetched:
            self._restart()
        self.prefetched = False
        travel = self.o.kv_travel
        if travel is not None:  # blocks prefetched before this pass's KV blocks were known
            for i, s in travel.take_pending():
                travel.upload(i, s, self.h2d)
                self.ready[s].record(self.h2d)

    def prefetch_next_pass(self) -> None:
        """The next pass's first blocks upload while this pass's head and the caller's commit run."""
        self._restart()
        self.prefetched = True

    def _restart(self) -> None:
        self.next_issue = 0
        self.slot_of.clear()
        for _ in range(min(len(self.slots), len(self.order))):
            self._issue()

    def _issue(self) -> None:
        if self.next_issue >= len(self.order):
            return
        o, dev = self.o, self.o.dev
        i = self.order[self.next_issue]
        s = self.next_issue % len(self.slots)
        self.next_issue += 1
        self.slot_of[i] = s
        host, lay = o.source(i), o.layouts[i]
        self.h2d.wait_event(self.free[s])  # the slot's consumer and write-back are done
        self.h2d.wait_event(self.landed[i])  # the host copy holds this block's last write-back
        slot = self.slots[s]
        tier = o.tier
        if tier is not None:
            tier.before(i)  # its pages are in RAM (read ahead); the staging copies below are synchronous
        if self.staging is not None:
            self.landed[i].synchronize()  # the host reads the host copy itself here
            self.staged[s].synchronize()  # the previous upload from this staging buffer is done
            for name, off, n in lay.items:
                self.staging[s][off : off + n].copy_(_flat(host[name]))
            dev.copy(slot[: lay.nbytes], self.staging[s][: lay.nbytes], self.h2d, f"h2d {i}")
        else:
            for name, off, n in lay.items:
                dev.copy(slot[off : off + n], _flat(host[name]), self.h2d, f"h2d {i}")
        if o.kv_travel is not None:
            o.kv_travel.upload(i, s, self.h2d)  # the layer's KV blocks follow its weights
        self.staged[s].record(self.h2d)
        self.ready[s].record(self.h2d)
        o.stats.h2d_bytes += sum(n for _, _, n in lay.items)
        if tier is not None:
            tier.after(i)

    def acquire(self, i: int) -> dict[str, torch.Tensor]:
        o, s = self.o, self.slot_of[i]
        t0 = time.perf_counter()
        o.dev.compute.wait_event(self.ready[s])
        o.stats.stall_seconds += time.perf_counter() - t0  # emu: the host waits; cuda: ~0 (asynchronous)
        host, lay = o.source(i), o.layouts[i]
        slot = self.slots[s]
        o.dev.begin_use(slot[: lay.nbytes], f"block {i} in slot {s}")
        views = {k: slot[off : off + n].view(host[k].dtype).view(host[k].shape) for k, off, n in lay.items}
        if o.mutable:
            return views
        with o.dev.untracked():  # counted here, explicitly
            out = o.decoder(views, o.device, o.dtype)
        self.decoded = _nbytes(out)
        o.dev.account(self.decoded)  # the decoded block in flight is device memory until release
        return out

    def release(self, i: int, tag: Any) -> None:
        o, dev, s = self.o, self.o.dev, self.slot_of[i]
        lay, slot = o.layouts[i], self.slots[s]
        dev.end_use(slot[: lay.nbytes])
        dev.free(self.decoded)
        self.decoded = 0
        done = dev.event()
        done.record(dev.compute)
        if tag is not _CLEAN:
            g = group_of_block(i)
            o._hook(g, tag, False)  # before the host copy is touched: a kill mid-copy leaves a torn mark
            host = o.source(i)
            self.d2h.wait_event(done)
            for name, off, n in lay.items:
                dev.copy(_flat(host[name]), slot[off : off + n], self.d2h, f"d2h {i}")
                o.stats.d2h_bytes += n
            self.landed[i].record(self.d2h)
            self.free[s].record(self.d2h)
            ev = dev.event()
            ev.record(self.d2h)
            self.pending.append((ev, g, tag))
        elif o.kv_travel is not None and o.kv_travel.download(i, s, self.d2h, done):
            self.free[s].record(self.d2h)  # the new KV rows left the staging before it is reused
        else:
            self.free[s].record(dev.compute)
        self._issue()
        self._poll()

    def _poll(self) -> None:
        """Move the counters of write-backs that have landed (in order; never blocks)."""
        while self.pending and self.pending[0][0].query():
            _ev, g, tag = self.pending.pop(0)
            self.o._hook(g, tag, True)

    def end_pass(self) -> None:
        """Wait for this pass's write-backs to land and move their counters."""
        while self.pending:
            ev, g, tag = self.pending.pop(0)
            ev.synchronize()
            self.o._hook(g, tag, True)


def _unregister(dev: Any, ptrs: list[int]) -> None:
    if ptrs:
        dev.unregister(ptrs)


def _align(n: int, a: int = SLOT_ALIGN) -> int:
    return (n + a - 1) // a * a
