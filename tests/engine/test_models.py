"""Logits parity of the pure family functions with transformers (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny import TINY_CONFIGS, make_tiny_model
from zostream.engine.models.attention import AttentionBatch, KVCache
from zostream.engine.store import WeightStore


def run_store(store: WeightStore, ids: torch.Tensor, lens: torch.Tensor | None = None) -> torch.Tensor:
    fam, spec = store.family, store.spec
    B, T = ids.shape
    lens = lens if lens is not None else torch.full((B,), T)
    ab = AttentionBatch.build(lens, T)
    h = fam.embed(store.outer(), ids, ab.positions, spec)
    for i in range(spec.num_layers):
        h = fam.block(h, store.block(i), ab.layer(i), spec)
    return fam.head(h, store.outer(), spec)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_prefill_logits_match_transformers(tmp_path, name):
    d = make_tiny_model(tmp_path, name)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    store = WeightStore(d)
    ids = torch.randint(0, 101, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    got = run_store(store, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_cached_decode_matches_transformers(tmp_path, name):
    """Prefill 7 tokens into a KV slot, then decode 4 one at a time: every step's logits match."""
    d = make_tiny_model(tmp_path, name)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    store = WeightStore(d)
    fam, spec = store.family, store.spec
    ids = torch.randint(0, 101, (1, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(ids).logits[0]
    cache = KVCache.allocate(spec.num_layers, 3, spec.kv_heads, 32, spec.head_dim, torch.float32, "cpu")
    slot = torch.tensor([2])
    past = 0
    for chunk in (ids[:, :7], ids[:, 7:8], ids[:, 8:9], ids[:, 9:10], ids[:, 10:11]):
        T = chunk.shape[1]
        ab = AttentionBatch.build(torch.tensor([T]), T, torch.tensor([past]), cache, slot)
        h = fam.embed(store.outer(), chunk, ab.positions, spec)
        for i in range(spec.num_layers):
            h = fam.block(h, store.block(i), ab.layer(i), spec)
        got = fam.head(h, store.outer(), spec)[0]
        torch.testing.assert_close(got, want[past : past + T], rtol=1e-4, atol=1e-4)
        past += T


def test_padded_rows_match_unpadded(tmp_path):
    d = make_tiny_model(tmp_path, "llama")
    store = WeightStore(d)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    full = run_store(store, ids)
    short = run_store(store, ids[1:, :5])
    padded = run_store(store, ids, lens=torch.tensor([9, 5]))
    torch.testing.assert_close(padded[0], full[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1, :5], short[0], rtol=1e-5, atol=1e-5)
