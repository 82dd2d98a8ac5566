"""bench/mixed_forward.py: its patched Llama forward against the engine's.

Two claims the bench's results rest on: with fp32 weights the patched forward is the engine's arithmetic
(so bench/lora_precision.py's fp32 reference does not move under --keep), and with bf16 weights each
lifted rounding brings the logits closer to the fp32 forward of the same weights.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.tiny import make_tiny_model
from zostream.engine.models import llama as L
from zostream.engine.models.attention import AttentionBatch
from zostream.engine.store import WeightStore

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture
def mixed(monkeypatch: pytest.MonkeyPatch):
    """The bench module, its patches undone after the test (monkeypatch restores llama's functions)."""
    monkeypatch.setattr(L, "block", L.block)
    monkeypatch.setattr(L, "head", L.head)
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("mixed_forward", None)
    yield importlib.import_module("mixed_forward")
    sys.modules.pop("mixed_forward", None)


def logits(store: WeightStore | SimpleNamespace, ids: torch.Tensor, lens: torch.Tensor) -> torch.Tensor:
    """The family's forward as the workloads run it: embed, every block, head -> [B, T, V] float32."""
    fam, spec, outer = store.family, store.spec, store.outer()
    attn = AttentionBatch.build(lens, ids.shape[1])
    h = fam.embed(outer, ids, attn.positions, spec)
    for i in range(store.num_layers):
        h = fam.block(h, store.block(i), attn.layer(i), spec)
    return fam.head(h, outer, spec).float()


def batch(store: WeightStore) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, store.spec.vocab, (3, 9), generator=g)
    return ids, torch.tensor([9, 6, 4])


def test_fp32_weights_run_the_engines_arithmetic(tmp_path: Path, mixed) -> None:
    store = WeightStore(make_tiny_model(tmp_path, "llama"))
    ids, lens = batch(store)
    want, engine_block = logits(store, ids, lens), L.block
    mixed.patch("head,resid,lora")
    assert L.block is not engine_block  # the patched forward is the one that runs below
    got = logits(store, ids, lens)
    assert torch.equal(got, want)  # same ops in the same order: the same bits


@pytest.mark.parametrize("keep", ["head", "resid", "head,resid,lora"])
def test_each_lifted_rounding_brings_bf16_closer_to_fp32(tmp_path: Path, mixed, keep: str) -> None:
    store = WeightStore(make_tiny_model(tmp_path, "llama", dtype=torch.bfloat16))
    ids, lens = batch(store)
    bf16 = logits(store, ids, lens)

    def as_fp32(w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: t.float() for k, t in w.items()}

    fp32_store = SimpleNamespace(  # the same bf16 values, computed in fp32
        family=store.family,
        spec=store.spec,
        num_layers=store.num_layers,
        outer=lambda: as_fp32(store.outer()),
        block=lambda i: as_fp32(store.block(i)),
    )
    ref = logits(fp32_store, ids, lens)
    mixed.patch(keep)
    got = logits(store, ids, lens)
    valid = (torch.arange(ids.shape[1])[None] < lens[:, None])[..., None]  # padding rows are not compared
    err = lambda x: float(((x - ref) * valid).norm())  # noqa: E731
    assert err(got) < err(bf16), f"{keep}: {err(got)} vs bf16 {err(bf16)}"
