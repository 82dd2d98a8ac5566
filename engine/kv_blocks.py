"""Which KV blocks each running sequence holds. Bookkeeping only: imports no torch.

The KV cache is a pool of fixed-size blocks (`block_size` token positions each, every layer).
A sequence's K/V for positions [0, n) live in the blocks of its table, position p at
block `table[p // block_size]`, offset `p % block_size`. Blocks are taken as tokens arrive
and returned when the sequence ends, so memory follows live tokens, not max_batch × max_seq_len.
The scheduler decides who may take blocks (admission, preemption); this class only hands them out.
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

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"need >= 1 block of >= 1 token, got {self.num_blocks} x {self.block_size}")
        # Popped from the end: the lowest ids go first, which keeps a small working set compact.
        self._free = list(range(self.num_blocks - 1, -1, -1))

    @property
    def used(self) -> int:
        """Blocks holding live tokens."""
        return self.num_blocks - len(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def growth(self, rid: str, tokens: int) -> int:
        """Blocks rid must still take to cover positions [0, tokens)."""
        return max(0, self.blocks_for(tokens) - len(self.tables.get(rid, ())))

    def ensure(self, rid: str, tokens: int) -> list[int]:
        """Grow rid's table to cover positions [0, tokens); returns the table (not a copy)."""
        table = self.tables.setdefault(rid, [])
        need = self.blocks_for(tokens) - len(table)
        if need > len(self._free):
            raise RuntimeError(f"KV pool exhausted: {rid!r} needs {need} blocks, {len(self._free)} free")
        for _ in range(need):
            table.append(self._free.pop())
        return table

    def release(self, rid: str) -> None:
        """The sequence ended or was preempted: its blocks go back."""
        self._free.extend(reversed(self.tables.pop(rid, [])))
