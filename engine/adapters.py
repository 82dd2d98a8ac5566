"""The engine's adapter registry: every LoRA adapter it can serve, at most `max_resident` on the device.

Every adapter has a host (CPU) copy; device copies are kept least-recently-used first and evicted
when a pass needs room (reloaded from the host copy on demand). A pass whose batch uses more
adapters than the limit holds all of them for that pass, then the registry shrinks back to the
limit. Only the engine thread touches it (the engine's inbox serialises the job runner and servicers).

Cached adapters (`cache`: checkpoints the engine can rebuild from a job's log) also leave the host when
more than `max_cached` of them exist, least recently used first, unless a request is using them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .models.attention import LoraSet

CPU = torch.device("cpu")
MAX_CACHED = 8  # rebuildable (cached) adapters kept on the host; each costs one LoRA's bytes


def _same(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)  # "cuda" is "cuda:0"


class AdapterRegistry:
    def __init__(self, device: torch.device, max_resident: int | None = None) -> None:
        if max_resident is not None and max_resident < 1:
            raise ValueError(f"max_resident adapters must be >= 1 (or None: no limit), got {max_resident}")
        self.device, self.max_resident = device, max_resident
        self._host: dict[str, Any] = {}  # id -> LoraAdapter on the host
        self._resident: OrderedDict[str, Any] = OrderedDict()  # id -> LoraAdapter on the device, LRU first
        self._cached: OrderedDict[str, None] = OrderedDict()  # rebuildable ids, least recently used first
        self.max_cached = MAX_CACHED
        self.loads = 0  # host -> device copies made on demand
        self.evictions = 0  # device copies dropped for room

    # ---- the dict-like view: what exists --------------------------------------------------------
    def __contains__(self, aid: object) -> bool:
        return aid in self._host

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._host))

    def __len__(self) -> int:
        return len(self._host)

    def __getitem__(self, aid: str) -> Any:
        """The host copy (shapes, spec, sizes); `acquire` gives the device copy a pass computes with."""
        return self._host[aid]

    def __setitem__(self, aid: str, adapter: Any) -> None:
        """Register or replace `aid`; `adapter` (on any device) becomes its most recently used copy."""
        self._host[aid] = adapter if _same(adapter.device, CPU) else adapter.to(CPU)
        self._resident.pop(aid, None)
        self._cached.pop(aid, None)
        self._resident[aid] = adapter if _same(adapter.device, self.device) else adapter.to(self.device)
        self._shrink(keep=(aid,))

    def cache(self, aid: str, adapter: Any, in_use: Iterable[str] = ()) -> None:
        """Register a rebuildable adapter; the least recently used cached ones beyond `max_cached` that
        no request uses (`in_use`) are dropped whole (their owner rebuilds them on the next use)."""
        self[aid] = adapter
        self._cached[aid] = None
        busy = set(in_use) | {aid}
        for old in list(self._cached):
            if len(self._cached) <= self.max_cached:
                break
            if old not in busy:
                self.pop(old)
                self.evictions += 1

    @property
    def cached(self) -> list[str]:
        return list(self._cached)

    def pop(self, aid: str, default: Any = None) -> Any:
        self._resident.pop(aid, None)
        self._cached.pop(aid, None)
        return self._host.pop(aid, default)

    def keys(self) -> list[str]:
        return list(self._host)

    # ---- residency ----------------------------------------------------------------------------
    @property
    def resident(self) -> list[str]:
        return list(self._resident)

    def acquire(self, aid: str, pinned: Iterable[str] = ()) -> Any | None:
        """The device copy of `aid` (loaded if needed, made most recently used); None if unknown.
        `pinned`: adapters the current pass also uses, never evicted to make room."""
        if aid not in self._host:
            return None
        if aid in self._cached:
            self._cached.move_to_end(aid)
        if aid in self._resident:
            self._resident.move_to_end(aid)
            return self._resident[aid]
        self._shrink(keep=(aid, *pinned), room=1)
        adapter = self._host[aid].to(self.device)
        self._resident[aid] = adapter
        self.loads += 1
        return adapter

    def prepare(self, needed: Iterable[str]) -> None:
        """Before a pass: make `needed` resident (evicting others, least recently used first)."""
        needed = [a for a in dict.fromkeys(needed) if a in self._host]
        for aid in needed:
            self.acquire(aid, pinned=needed)

    def lora_set(self, adapter_ids: list[str], layer: int) -> LoraSet | None:
        """The LoRA weights of block `layer` for a batch whose row b uses adapter_ids[b] ("": none),
        each adapter applied to its rows only; None when no row uses one."""
        by_adapter: dict[str, list[int]] = {}
        for b, aid in enumerate(adapter_ids):
            if aid:
                by_adapter.setdefault(aid, []).append(b)
        if not by_adapter:
            return None
        lora: LoraSet = {}
        all_rows = len(adapter_ids)
        for aid, rows in by_adapter.items():
            adapter = self.acquire(aid, pinned=by_adapter)
            if adapter is None:
                continue
            # Built on the host and sent asynchronously (once per layer): torch.tensor(..., device=cuda)
            # would synchronise the host inside the block loop.
            idx = None if len(rows) == all_rows else torch.tensor(rows).to(self.device, non_blocking=True)
            for module, lw in adapter.layer(layer, rows=idx).items():
                lora.setdefault(module, []).append(lw)
        return lora

    def shrink(self) -> None:
        """After a pass: back down to the limit."""
        self._shrink()

    def _shrink(self, keep: Iterable[str] = (), room: int = 0) -> None:
        if self.max_resident is None:
            return
        keep = set(keep)
        for aid in list(self._resident):
            if len(self._resident) + room <= self.max_resident:
                break
            if aid not in keep:
                del self._resident[aid]
                self.evictions += 1
