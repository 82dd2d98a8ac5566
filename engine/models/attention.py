"""Attention over padded batches with an optional KV cache, shared by every family.

One `AttentionBatch` describes a workload for a whole pass (same for every layer):
rows are sequences, right-padded to T new tokens; row b has `lens[b]` valid new tokens
that follow `past_lens[b]` tokens already in its KV-cache slot `slots[b]`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..kv_cache import PagedKVCache, PagedView


@dataclass
class KVCache:
    """Per-layer K/V slots: k[i], v[i] are [S, Hkv, L, D] (S slots of L positions)."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @classmethod
    def allocate(cls, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (slots, kv_heads, max_len, head_dim)
        return cls(
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
            [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)],
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass
class AttentionBatch:
    positions: torch.Tensor  # [B,T] int64 absolute positions (past_len + t)
    lens: torch.Tensor  # [B] int64 valid new tokens per row
    mask: torch.Tensor  # [B,1,T,Lk] bool, True = may attend
    cache: KVCache | None = None
    slots: torch.Tensor | None = None  # [B] int64
    kv_len: int = 0  # Lk when a cache is used
    write_index: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    memo: dict = field(default_factory=dict)  # per-pass values every layer shares (RoPE tables)
    paged: PagedView | None = None  # set instead of cache/slots when the cache is paged

    @classmethod
    def build(
        cls,
        lens: torch.Tensor,
        T: int,
        past_lens: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> AttentionBatch:
        device = lens.device
        B = lens.shape[0]
        past = past_lens if past_lens is not None else torch.zeros(B, dtype=torch.int64, device=device)
        t = torch.arange(T, device=device)
        positions = past[:, None] + t[None, :]
        if cache is None:
            j = t
            mask = (j[None, None, :] <= t[None, :, None]) & (j[None, None, :] < lens[:, None, None])
            return cls(positions, lens, mask[:, None])
        assert slots is not None
        kv_len = int((past + lens).max().item())
        j = torch.arange(kv_len, device=device)
        end = (past + lens)[:, None, None]
        mask = (j[None, None, :] <= positions[:, :, None]) & (j[None, None, :] < end)
        valid = t[None, :] < lens[:, None]  # [B,T]
        b_idx, t_idx = valid.nonzero(as_tuple=True)
        write = (b_idx, t_idx, slots[b_idx], positions[b_idx, t_idx])
        return cls(positions, lens, mask[:, None], cache, slots, kv_len, write)

    @classmethod
    def build_paged(
        cls, lens: torch.Tensor, T: int, past_lens: torch.Tensor, cache: PagedKVCache, tables: list[list[int]]
    ) -> AttentionBatch:
        """Like `build` with a cache, but row b's K/V live in the blocks tables[b] (kv_cache.py)."""
        device = lens.device
        t = torch.arange(T, device=device)
        positions = past_lens[:, None] + t[None, :]
        end = past_lens + lens
        kv_len = int(end.max().item())
        j = torch.arange(kv_len, device=device)
        mask = (j[None, None, :] <= positions[:, :, None]) & (j[None, None, :] < end[:, None, None])
        view = PagedView.build(cache, tables, past_lens, lens, kv_len, device)
        return cls(positions, lens, mask[:, None], kv_len=kv_len, paged=view)

    def layer(self, i: int) -> LayerAttention:
        return LayerAttention(self, i)

    def additive_mask(self) -> torch.Tensor:
        """[B,1,T,Lk] float32: 0 where `mask` allows, float32's lowest value where not (not -inf: a row
        with nothing to attend to then gets uniform weights instead of NaN). Built once per pass."""
        key = "additive_mask"
        if key not in self.memo:
            low = torch.finfo(torch.float32).min
            self.memo[key] = torch.zeros(self.mask.shape, device=self.mask.device).masked_fill_(
                ~self.mask, low
            )
        return self.memo[key]


# float32 score elements per chunk of attend_cpu: 4 MB temporaries stay in the allocator's cache (larger
# ones are fresh pages each time, and page faults then cost more than the arithmetic).
_CHUNK_SCORES = 1 << 20


def attend_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask_add: torch.Tensor, scale: float | None
) -> torch.Tensor:
    """softmax(q k^T scale + mask_add) v: q [B,H,T,D], k/v [B,Hkv,Lk,D], mask_add [B,1,T,Lk] -> [B,H,T,D].

    The CPU path of a pass without a KV cache (training, scoring): at one thread torch's flash kernel ran a
    batch of 16 x 64 tokens (SmolLM2-135M) at ~50 GFLOP/s, 3 ms a layer; two batched GEMMs in the input
    dtype with a float32 softmax between them take ~1.2 ms (bench/RESULTS.md). The H/Hkv query heads that
    share a key head are stacked along the rows of one GEMM ([g T, D] x [D, Lk]), so keys are never
    repeated. Scores are rounded to the input dtype by the GEMM, as transformers' eager attention
    rounds them; the softmax runs in float32 and its weights are rounded to the input dtype before the
    second GEMM. Rows are independent, so chunking the batch changes no value."""
    B, H, T, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    g = H // Hkv
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    qf = q.reshape(B * Hkv, g * T, D)  # head h = kv head h // g, as repeat_interleave pairs them
    kt = k.transpose(2, 3).reshape(B * Hkv, D, Lk)
    vf = v.reshape(B * Hkv, Lk, D)
    mask_add = mask_add[:, :, None]  # [B,1,1,T,Lk]: broadcast over kv heads and their g query heads
    step = max(1, _CHUNK_SCORES // (H * T * Lk))
    if step >= B:  # one chunk (the usual case): no slicing
        return _attend(qf, kt, vf, mask_add, scale, (B, Hkv, g, T, Lk)).view(B, H, T, D)
    out = torch.empty(B * Hkv, g * T, D, dtype=q.dtype, device=q.device)
    for b0 in range(0, B, step):
        b1 = min(B, b0 + step)
        rows = slice(b0 * Hkv, b1 * Hkv)
        shape = (b1 - b0, Hkv, g, T, Lk)
        _attend(qf[rows], kt[rows], vf[rows], mask_add[b0:b1], scale, shape, out=out[rows])
    return out.view(B, H, T, D)


def _attend(qf, kt, vf, mask_add, scale: float, shape: tuple[int, ...], out=None) -> torch.Tensor:
    """One chunk of attend_cpu: qf [c Hkv, g T, D], kt [c Hkv, D, Lk], vf [c Hkv, Lk, D], mask_add
    [c,1,1,T,Lk]; shape (c, Hkv, g, T, Lk) -> [c Hkv, g T, D] (into `out` when given)."""
    s = torch.bmm(qf, kt).view(shape)
    p = torch.add(mask_add, s, alpha=scale).softmax(-1).to(qf.dtype)  # float32 softmax
    return torch.bmm(p.view(qf.shape[0], qf.shape[1], -1), vf, out=out)


@dataclass
class LayerAttention:
    batch: AttentionBatch
    layer: int

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
        """q [B,H,T,D], k/v [B,Hkv,T,D] (already rotated) -> [B,H,T,D]."""
        ab = self.batch
        if ab.paged is not None:
            k, v = ab.paged.update(self.layer, k, v)
        elif ab.cache is not None:
            kc, vc = ab.cache.k[self.layer], ab.cache.v[self.layer]
            b_idx, t_idx, s_idx, p_idx = ab.write_index
            # Only valid tokens are written: padding never pollutes a slot.
            kc[s_idx, :, p_idx] = k.transpose(1, 2)[b_idx, t_idx].to(kc.dtype)
            vc[s_idx, :, p_idx] = v.transpose(1, 2)[b_idx, t_idx].to(vc.dtype)
            k = kc[ab.slots, :, : ab.kv_len].to(q.dtype)
            v = vc[ab.slots, :, : ab.kv_len].to(q.dtype)
        if ab.cache is None and ab.paged is None and q.device.type == "cpu":
            return attend_cpu(q, k, v, ab.additive_mask(), scale)
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ab.mask, scale=scale)


@dataclass
class LoraWeights:
    """One adapter's factors for one linear: y += scale * (x A^T) B^T on `rows` (None: all)."""

    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float
    rows: torch.Tensor | None = None  # [n] int64 batch rows using this adapter


LoraSet = dict[str, list[LoraWeights]]  # block-local module name ("self_attn.q_proj") -> adapters


def linear(x: torch.Tensor, w: dict, name: str, lora: LoraSet | None) -> torch.Tensor:
    """x [B,T,in] -> [B,T,out] with the block's weight/bias `name` and any LoRA on it."""
    y = F.linear(x, w[name + ".weight"], w.get(name + ".bias"))
    if lora and name in lora:
        for ad in lora[name]:
            xa = x if ad.rows is None else x[ad.rows]
            delta = F.linear(F.linear(xa.to(ad.A.dtype), ad.A), ad.B).to(y.dtype) * ad.scale
            y = y + delta if ad.rows is None else y.index_add(0, ad.rows, delta)
    return y
