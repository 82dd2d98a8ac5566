"""The paged KV cache: a pool of fixed-size blocks per layer, read through block tables.

Layout per layer: k[i], v[i] are [N, block_size, Hkv, D] (N blocks). Which blocks a sequence
holds is decided by kv_blocks.BlockAllocator; this module owns the tensors, the size plan and
the per-pass gather/scatter indices.

Attention reads through the block table by gathering each row's positions into a dense
[B, Hkv, Lk, D] K/V and calling torch SDPA with the same mask as the contiguous cache: one
indexed copy per layer and pass. Why not flex attention's paged block mask: on the CPU it needs
torch.compile (inductor + a C++ toolchain, seconds of compile per new shape) and its eager
fallback materialises the full score matrix; the gather keeps the attention arithmetic
exactly that of the contiguous cache (tokens bitwise equal, tested), on every device. The cost
is one extra read+write of the live K/V per layer (bench/RESULTS.md).

Memory: the pool is allocated with `torch.empty`, so on the CPU pages are committed only when
a block is first written: resident memory follows live tokens. Positions a row does not own
(past its end, up to the batch's Lk) are read from the row's first position, which this pass
has written, so uninitialised memory never reaches the attention (masked, but 0 * NaN = NaN).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .kv_blocks import blocks_for


@dataclass(frozen=True)
class KVPlan:
    """How many KV blocks the pool holds and what they cost."""

    block_size: int
    num_blocks: int
    bytes_per_token: int  # K and V, every layer

    @property
    def tokens(self) -> int:
        """Concurrent tokens (prompt + generated, over all running sequences) the pool holds."""
        return self.num_blocks * self.block_size

    @property
    def nbytes(self) -> int:
        return self.tokens * self.bytes_per_token


def kv_bytes_per_token(layers: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    return 2 * layers * kv_heads * head_dim * itemsize


def plan_kv(
    bytes_per_token: int,
    block_size: int,
    max_batch: int,
    max_seq_len: int,
    kv_bytes: int | None = None,
    budget: int | None = None,
    device_fraction: float = 1.0,
    fixed_bytes: int = 0,
) -> KVPlan:
    """Blocks for the pool.

    kv_bytes given: that many bytes (rounded down to blocks). Otherwise enough for max_batch full
    sequences, but at most half of a nonzero device budget (the rest is for weights and streaming
    slots) and never less than one max_seq_len sequence, so every admissible request can run;
    budget None or 0 (no budget / stream every block): the full max_batch × max_seq_len.
    device_fraction: the share of the pool the budget pays for (with KV offload, depth staging pools
    out of L layers: the rest lives in host memory). fixed_bytes: what the budget must hold besides
    (outer weights, streaming slots): the pool never takes it.
    """
    block_bytes = block_size * bytes_per_token
    full = max_batch * blocks_for(max_seq_len, block_size)
    if kv_bytes is not None:
        n = kv_bytes // block_bytes
        if n < 1:
            raise ValueError(
                f"kv_memory: {kv_bytes} bytes hold no KV block ({block_bytes} bytes each); raise it"
            )
    elif budget:
        fits = int(min(budget // 2, budget - fixed_bytes) / (block_bytes * min(1.0, device_fraction)))
        n = max(blocks_for(max_seq_len, block_size), min(full, fits))
    else:
        n = full
    return KVPlan(block_size, n, bytes_per_token)


@dataclass
class PagedKVCache:
    k: list[torch.Tensor]  # per layer [N, block_size, Hkv, D]
    v: list[torch.Tensor]
    block_size: int
    offload: Any = None  # kv_offload.KVOffload when streamed layers' pools live in host memory

    @classmethod
    def allocate(
        cls,
        layers: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype,
        device,
        alloc: Callable[[int, int], torch.Tensor] | None = None,
    ) -> PagedKVCache:
        """alloc(layer, nbytes) -> uint8 buffer for one layer's K or V (None: torch.empty on device)."""
        shape = (num_blocks, block_size, kv_heads, head_dim)
        nbytes = num_blocks * block_size * kv_heads * head_dim * dtype.itemsize

        def one(i: int) -> torch.Tensor:
            if alloc is None:
                return torch.empty(shape, dtype=dtype, device=device)
            return alloc(i, nbytes).view(dtype).view(shape)

        return cls([one(i) for i in range(layers)], [one(i) for i in range(layers)], block_size)

    @property
    def num_blocks(self) -> int:
        return self.k[0].shape[0]

    def token_nbytes(self) -> int:
        """Bytes of one token's K and V over every layer."""
        t = self.k[0]
        return 2 * len(self.k) * t.shape[2] * t.shape[3] * t.element_size()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class PagedView:
    """One pass's indices into the pool (the same for every layer).

    write: (b, t, flat position) of each valid new token; read: [B, Lk] flat positions to gather.
    """

    cache: PagedKVCache
    write_b: torch.Tensor  # [n] int64
    write_t: torch.Tensor  # [n] int64
    write_pos: torch.Tensor  # [n] int64 block * block_size + offset
    read_pos: torch.Tensor  # [B, Lk] int64
    host_write: torch.Tensor | None = None  # write_pos / read_pos on the host (KVOffload.arm reads them)
    host_read: torch.Tensor | None = None
    # Staging-local positions for layers whose K/V travel with their block (set by KVOffload.arm).
    local_write: torch.Tensor | None = None
    local_read: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        cache: PagedKVCache,
        tables: list[list[int]],
        past: torch.Tensor,
        lens: torch.Tensor,
        kv_len: int,
        device: torch.device,
    ) -> PagedView:
        """tables[b] covers positions [0, past[b] + lens[b]); past/lens are [B] int64 (host)."""
        bs = cache.block_size
        B = len(tables)
        width = max(len(t) for t in tables)
        table = torch.zeros(B, width, dtype=torch.int64)
        for b, t in enumerate(tables):
            table[b, : len(t)] = torch.tensor(t, dtype=torch.int64)
        past, lens = past.cpu(), lens.cpu()
        end = past + lens  # [B]
        j = torch.arange(kv_len)
        flat = table[:, (j // bs).clamp(max=width - 1)] * bs + (j % bs)  # [B, Lk]
        # Past a row's end: its position 0 (written by now; masked anyway, but must be finite).
        read = torch.where(j[None, :] < end[:, None], flat, table[:, :1] * bs)
        T = int(lens.max())
        t = torch.arange(T)
        wb, wt = (t[None, :] < lens[:, None]).nonzero(as_tuple=True)
        p = past[wb] + wt
        wpos = table[wb, p // bs] * bs + p % bs
        return cls(cache, wb.to(device), wt.to(device), wpos.to(device), read.to(device), wpos, read)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new k/v [B,Hkv,T,D] of valid tokens, return the rows' K/V [B,Hkv,Lk,D]."""
        off = self.cache.offload
        if off is not None and layer in off.layers:
            kf, vf = off.staging(layer)  # this layer's blocks, uploaded with its weights
            wpos, rpos = self.local_write, self.local_read
        else:
            kc, vc = self.cache.k[layer], self.cache.v[layer]
            kf = kc.view(-1, kc.shape[2], kc.shape[3])  # [N*bs, Hkv, D]
            vf = vc.view(-1, vc.shape[2], vc.shape[3])
            wpos, rpos = self.write_pos, self.read_pos
        kf[wpos] = k.transpose(1, 2)[self.write_b, self.write_t].to(kf.dtype)
        vf[wpos] = v.transpose(1, 2)[self.write_b, self.write_t].to(vf.dtype)
        # [B,Lk,Hkv,D] -> [B,Hkv,Lk,D] views (SDPA reads strides; tokens equal the slot cache's, tested).
        k_out = kf[rpos].transpose(1, 2).to(k.dtype)
        v_out = vf[rpos].transpose(1, 2).to(v.dtype)
        return k_out, v_out
