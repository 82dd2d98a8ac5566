"""The streamer's copy machinery for streamed blocks: preallocated device slots, the H2D and D2H
streams, the events that order them, and host registration (or the pinned staging ring without it).

Only LayerStreamer (streamer.py) builds and drives a StreamSlots: it is part of the streamer, the one
owner of streams, events and registered host memory.
"""

from __future__ import annotations

import mmap
import time
import weakref
from typing import TYPE_CHECKING, Any

import torch

from .residency import block_nbytes, group_of_block

if TYPE_CHECKING:
    from .streamer import LayerStreamer

PAGE = mmap.PAGESIZE
CLEAN = object()  # a released block's tag when it was not marked dirty: nothing to write back


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


class StreamSlots:
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
        self.timed: list[tuple[Any, Any]] = []  # (start, end) timed events of uploads not yet counted
        self.decoded = 0  # bytes of the frozen block decoded from the slot now in use
        self.registered: list[int] = []
        # Streamed blocks that stay in host RAM upload straight from their registered pages; under a host
        # budget the blocks read from the file every pass go through the pinned staging ring instead
        # (pinning them would defeat the budget, and their pages are dropped behind each pass).
        kept = [i for i in self.order if owner.tier is None or owner.tier.keeps(i)]
        if owner.cfg.register_host_memory and kept:
            self.registered = self._register_host(kept)
        self.direct = frozenset(kept) if self.registered else frozenset()
        self.staging = None
        if len(self.direct) < len(self.order):
            self.staging = [dev.pinned(slot_bytes) for _ in range(depth)]
        weakref.finalize(self, _unregister, dev, list(self.registered))

    def _register_host(self, blocks: list[int]) -> list[int]:
        """Register the whole pages under `blocks`' host tensors, adjacent ranges merged (read-only for a
        frozen base): mmap -> device at the pinned rate. Only those pages are pinned, not the outer weights
        or blocks resident on the device (each uploaded once). Fails as a whole (memlock, a kernel refusing
        a writable pin of a shared file mapping...): then staging."""
        ranges = sorted(
            (t.data_ptr() // PAGE * PAGE, -(-(t.data_ptr() + t.nbytes) // PAGE) * PAGE)
            for i in blocks
            for t in self.o.source(i).values()
            if t.numel()
        )
        merged: list[list[int]] = []
        for lo, hi in ranges:
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        return self.o.dev.register([(lo, hi - lo) for lo, hi in merged], read_only=not self.o.mutable)

    def host_path(self) -> str:
        if not self.direct:
            return "staging"
        return "registered" if self.staging is None else "registered+staging"

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
        staged = i not in self.direct
        if staged:
            self.landed[i].synchronize()  # the host reads the host copy itself here
            self.staged[s].synchronize()  # the previous upload from this staging buffer is done
            t0 = time.perf_counter()
            for name, off, n in lay.items:
                self.staging[s][off : off + n].copy_(_flat(host[name]))
            o.stats.transfer_seconds += time.perf_counter() - t0  # the host's share of the move
        # The copies' own time on the H2D stream (after its waits), counted once `end` has completed.
        start, end = dev.event(timing=True), dev.event(timing=True)
        start.record(self.h2d)
        if staged:
            dev.copy(slot[: lay.nbytes], self.staging[s][: lay.nbytes], self.h2d, f"h2d {i}")
        else:
            for name, off, n in lay.items:
                dev.copy(slot[off : off + n], _flat(host[name]), self.h2d, f"h2d {i}")
        if o.kv_travel is not None:
            o.kv_travel.upload(i, s, self.h2d)  # the layer's KV blocks follow its weights
        end.record(self.h2d)
        self.timed.append((start, end))
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
        self.decoded = block_nbytes(out)
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
        if tag is not CLEAN:
            g = group_of_block(i)
            o.notify_write_back(g, tag, False)  # before the host copy is touched: a kill leaves a torn mark
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
        """Move the counters of write-backs that have landed and count the uploads that are done (in order;
        never blocks)."""
        while self.pending and self.pending[0][0].query():
            _ev, g, tag = self.pending.pop(0)
            self.o.notify_write_back(g, tag, True)
        while self.timed and self.timed[0][1].query():
            start, end = self.timed.pop(0)
            self.o.stats.transfer_seconds += start.elapsed_time(end) / 1e3  # elapsed_time: milliseconds

    def end_pass(self) -> None:
        """Wait for this pass's write-backs to land and move their counters."""
        while self.pending:
            ev, g, tag = self.pending.pop(0)
            ev.synchronize()
            self.o.notify_write_back(g, tag, True)
        self._poll()  # uploads done by now; the rest (e.g. the next pass's prefetches) at a later poll


def _unregister(dev: Any, ptrs: list[int]) -> None:
    if ptrs:
        dev.unregister(ptrs)
