"""Which KV blocks each running sequence holds. Bookkeeping only: imports no torch.

The KV cache is a pool of fixed-size blocks (`block_size` token positions each, every layer).
A sequence's K/V for positions [0, n) live in the blocks of its table, position p at
block `table[p // block_size]`, offset `p % block_size`. Blocks are taken as tokens arrive
and returned when the sequence ends, so memory follows live tokens, not max_batch × max_seq_len.

Admission reserves a request's worst case (prompt + max_new_tokens) in blocks, so a running
sequence can never find the pool empty mid-generation: no preemption, and a request that does
not fit now simply waits in the queue until others finish. Physical blocks are taken only as
tokens arrive, so `used` (what the metrics report) is what live tokens hold.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass
class BlockAllocator:
    num_blocks: int
    block_size: int
    tables: dict[str, list[int]] = field(default_factory=dict)  # request id -> block ids, in order
    reserved: dict[str, int] = field(default_factory=dict)  # request id -> blocks promised at admission

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"need >= 1 block of >= 1 token, got {self.num_blocks} x {self.block_size}")
        # Popped from the end: the lowest ids go first, which keeps a small working set compact.
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._reserved_total = 0

    # ---- capacity ---------------------------------------------------------------------------
    @property
    def used(self) -> int:
        """Blocks holding live tokens."""
        return self.num_blocks - len(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def unreserved(self) -> int:
        """Blocks no admitted request may still claim: what admission can promise."""
        return self.num_blocks - self._reserved_total

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def can_reserve(self, tokens: int) -> bool:
        return self.blocks_for(tokens) <= self.unreserved

    # ---- a sequence's life ------------------------------------------------------------------
    def reserve(self, rid: str, tokens: int) -> None:
        n = self.blocks_for(tokens)
        if rid in self.reserved:
            raise ValueError(f"request {rid!r} already holds a KV reservation")
        if n > self.unreserved:
            raise ValueError(f"{n} KV blocks asked, {self.unreserved} unreserved")
        self.reserved[rid] = n
        self._reserved_total += n
        self.tables[rid] = []

    def ensure(self, rid: str, tokens: int) -> list[int]:
        """Grow rid's table to cover positions [0, tokens); returns the table (not a copy)."""
        table = self.tables[rid]
        need = self.blocks_for(tokens)
        if need > self.reserved[rid]:
            raise ValueError(f"request {rid!r} needs {need} KV blocks but reserved {self.reserved[rid]}")
        while len(table) < need:
            table.append(self._free.pop())  # cannot be empty: reservations never exceed the pool
        return table

    def release(self, rid: str) -> None:
        """The sequence ended: its blocks and the rest of its reservation go back."""
        table = self.tables.pop(rid, None)
        if table is None:
            return
        self._free.extend(reversed(table))
        self._reserved_total -= self.reserved.pop(rid)
