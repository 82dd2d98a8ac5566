"""Paged KV cache bench: one layer's decode attention read through block tables vs the contiguous
slot cache it replaced, against the floor (SDPA on K/V that are already dense, no indirection).

    python bench/kv.py [--shape opt-13b,llama3-8b] [--batch 16] [--contexts 512,2048]
                       [--block-size 16] [--device auto] [--reps 5]

Per case: B rows decode one token each over `ctx` cached positions (rows of mixed lengths
ctx/4..ctx, so the gather pads like a real batch); the paged pool's blocks are handed out in a
shuffled order, so every row's table is scattered. Timed per call (median of --reps):
  slot:  write 1 token per row + K/V[slots, :, :Lk] index + SDPA (the cache before paging);
  paged: write through the table + flat gather + SDPA (engine/kv_cache.PagedView.update);
  floor: SDPA on dense K/V (what an attention kernel reading the blocks in place would cost).
"KV GB/s" is the live K/V bytes read (sum of row lengths) / paged time. Ratios > 1 are the
price of the indirection (the gather is one extra read + write of the padded K/V).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from common import Timer, log, machine_line, ratio, resolve_device, split_list, table

from zostream.engine.kv_cache import PagedKVCache, PagedView

# (query heads, kv heads, head dim) of the real models
SHAPES = {"opt-13b": (40, 40, 128), "llama3-8b": (32, 8, 128), "opt-175b": (96, 96, 128), "tiny": (4, 2, 8)}
TITLE = "decode attention per layer: paged (block tables) vs slot cache vs floor"


def _median(fn, device: torch.device, reps: int) -> float:
    fn()  # warm-up (allocator, kernels)
    times = []
    for _ in range(reps):
        with Timer(device) as t:
            fn()
        times.append(t.seconds)
    return statistics.median(times)


def case(shape: str, B: int, ctx: int, bs: int, device: torch.device, dtype: torch.dtype, reps: int) -> list:
    H, Hkv, D = SHAPES[shape]
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(max(ctx // 4, 1), ctx + 1, (B,), generator=g)
    lens[0] = ctx
    past = lens - 1  # the new token is the last position
    q = torch.randn(B, H, 1, D, generator=g).to(device, dtype)
    k_new = torch.randn(B, Hkv, 1, D, generator=g).to(device, dtype)
    v_new = torch.randn_like(k_new)
    # slot cache: [B, Hkv, ctx, D]
    kc = torch.randn(B, Hkv, ctx, D, generator=g).to(device, dtype)
    vc = torch.randn_like(kc)
    slots = torch.arange(B, device=device)
    # paged pool with every row's blocks scattered
    per_row = -(-ctx // bs)
    pool = PagedKVCache.allocate(1, B * per_row, bs, Hkv, D, dtype, device)
    pool.k[0].normal_()
    pool.v[0].normal_()
    order = torch.randperm(B * per_row, generator=g).tolist()
    tables = [order[b * per_row : b * per_row + -(-int(lens[b]) // bs)] for b in range(B)]
    view = PagedView.build(pool, tables, past, torch.ones(B, dtype=torch.int64), ctx, device)
    j = torch.arange(ctx, device=device)
    mask = (j[None, :] < lens.to(device)[:, None])[:, None, None, :]  # [B,1,1,Lk]
    groups = H // Hkv
    wb, wp = torch.arange(B, device=device), past.to(device)

    def attend(k, v):
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def slot():
        kc[slots[wb], :, wp] = k_new[:, :, 0]
        vc[slots[wb], :, wp] = v_new[:, :, 0]
        return attend(kc[slots, :, :ctx], vc[slots, :, :ctx])

    def paged():
        return attend(*view.update(0, k_new, v_new))

    dense_k, dense_v = kc.clone(), vc.clone()
    t_slot = _median(slot, device, reps)
    t_paged = _median(paged, device, reps)
    t_floor = _median(lambda: attend(dense_k, dense_v), device, reps)
    live = int(lens.sum()) * 2 * Hkv * D * dtype.itemsize
    return [
        shape,
        B,
        ctx,
        bs,
        t_floor * 1e3,
        t_slot * 1e3,
        t_paged * 1e3,
        ratio(t_paged, t_slot),
        ratio(t_paged, t_floor),
        live / t_paged / 1e9,
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="opt-13b,llama3-8b")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--contexts", default="512,2048")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    dtype = getattr(torch, a.dtype)
    print(machine_line(device) + f"; dtype {a.dtype}\n")
    rows = []
    for shape in split_list(a.shape):
        for ctx in (int(c) for c in split_list(a.contexts)):
            log(f"{shape} B={a.batch} ctx={ctx}")
            rows.append(case(shape, a.batch, ctx, a.block_size, device, dtype, a.reps))
    headers = "shape|B|ctx|block|floor ms|slot ms|paged ms|paged/slot|paged/floor|KV GB/s"
    print(table(TITLE, headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
