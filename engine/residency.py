"""Where a model's blocks sit on the device: group numbering (the counters' index), the layout of a
block's tensors in a streaming slot, and the residency plan (which blocks stay on the device, which
stream through slots). Pure arithmetic: the streamer (streamer.py) sizes, fills and views its slots
through these, and `zostream model info` prints the plan without building a streamer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

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


def block_nbytes(ts: dict[str, torch.Tensor]) -> int:
    """Bytes of a block's tensors (as they are: packed, raw or decoded)."""
    return sum(t.numel() * t.element_size() for t in ts.values())


def _align(n: int, a: int = SLOT_ALIGN) -> int:
    return (n + a - 1) // a * a
