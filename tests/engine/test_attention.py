"""The CPU attention of passes without a KV cache (models/attention.attend_cpu) against attention
written out here in float64 numpy, one (row, head) at a time: padding, GQA, OPT's scale, chunking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zostream.engine.models import attention as A


def textbook(q, k, v, lens, scale):
    """float64 softmax(q k^T scale + causal/padding mask) v, head h reading kv head h // (H / Hkv)."""
    q, k, v = (t.double().numpy() for t in (q, k, v))
    B, H, T, D = q.shape
    g = H // k.shape[1]
    out = np.zeros((B, H, T, D))
    for b in range(B):
        for h in range(H):
            for t in range(T):
                keys = [j for j in range(T) if j <= t and j < int(lens[b])]
                s = np.array([q[b, h, t] @ k[b, h // g, j] for j in keys]) * scale
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, h, t] = sum(pj * v[b, h // g, j] for pj, j in zip(p, keys, strict=True))
    return torch.from_numpy(out)


def inputs(B, H, Hkv, T, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    # As llama.block makes them: [B,T,heads,D] projections viewed as [B,heads,T,D].
    q, k, v = (torch.randn(B, T, n, D, generator=g).to(dtype).transpose(1, 2) for n in (H, Hkv, Hkv))
    lens = torch.randint(1, T + 1, (B,), generator=g)
    lens[0] = T
    return q, k, v, lens


@pytest.mark.parametrize(("B", "H", "Hkv", "T", "D"), [(3, 4, 2, 7, 8), (2, 6, 6, 9, 16), (2, 9, 3, 5, 4)])
@pytest.mark.parametrize("scale", [None, 1.0])
def test_matches_textbook_attention(B, H, Hkv, T, D, scale):
    q, k, v, lens = inputs(B, H, Hkv, T, D, torch.float32)
    ab = A.AttentionBatch.build(lens, T)
    got = ab.layer(0)(q, k, v, scale)
    want = textbook(q, k, v, lens, 1 / math.sqrt(D) if scale is None else scale)
    valid = (torch.arange(T)[None, :] < lens[:, None])[:, None, :, None]  # padded rows are never read
    torch.testing.assert_close(got.double() * valid, want * valid, rtol=1e-5, atol=1e-6)


def test_chunked_batch_gives_the_same_bits(monkeypatch):
    """Rows are independent: a batch cut into chunks (large T x Lk) gives what one chunk gives."""
    q, k, v, lens = inputs(5, 6, 2, 8, 16, torch.bfloat16, seed=3)
    mask = A.AttentionBatch.build(lens, 8).additive_mask()
    whole = A.attend_cpu(q, k, v, mask, None)
    monkeypatch.setattr(A, "_CHUNK_SCORES", 6 * 8 * 8 * 2)  # two rows per chunk: chunks 2, 2, 1
    assert torch.equal(A.attend_cpu(q, k, v, mask, None), whole)


def test_bf16_within_rounding_of_textbook():
    """bf16 scores and weights (transformers' eager attention rounds them too): within bf16 rounding."""
    q, k, v, lens = inputs(2, 4, 2, 6, 8, torch.bfloat16, seed=5)
    got = A.AttentionBatch.build(lens, 6).layer(0)(q, k, v)
    want = textbook(q, k, v, lens, 1 / math.sqrt(8))
    valid = (torch.arange(6)[None, :] < lens[:, None])[:, None, :, None]
    torch.testing.assert_close(got.double() * valid, want * valid, rtol=3e-2, atol=3e-2)


def test_row_with_nothing_to_attend_stays_finite():
    """A row of length 0 masks every key: weights come out uniform, not NaN (NaN would reach no loss,
    but a finite tensor keeps sums over padded rows finite)."""
    q, k, v, _ = inputs(2, 2, 1, 4, 8, torch.float32)
    lens = torch.tensor([4, 0])
    out = A.AttentionBatch.build(lens, 4).layer(0)(q, k, v)
    assert torch.isfinite(out).all()
