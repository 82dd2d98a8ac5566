"""Streamed layers' KV in host memory, travelling with the layer through the emulated device's copy streams:
tokens equal transformers' greedy ones, the bytes moved are the rows written, nothing is read early."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine.test_generation import PROMPTS, FakeTok, greedy, hf_greedy
from tests.tiny import make_tiny_model
from zostream.engine import engine as E
from zostream.engine import engine_setup
from zostream.engine.config import EngineConfig, LimitsConfig, StreamConfig
from zostream.engine.emu import EmuDevice, EmuOptions, overlapped
from zostream.engine.kv_cache import kv_bytes_per_token
from zostream.engine.kv_offload import _runs


def test_runs_merge_consecutive_pairs():
    assert _runs([3, 4, 5, 9, 10], [0, 1, 2, 3, 4]) == [(3, 0, 3), (9, 3, 2)]
    assert _runs([1, 2, 3], [5, 7, 8]) == [(1, 5, 1), (2, 7, 2)]
    assert _runs([], []) == []


def emu_engine(d, monkeypatch, dev: EmuDevice, budget: int, **limits) -> E.Engine:
    monkeypatch.setattr(engine_setup, "emu_device", lambda name: dev if name == "emu" else None)
    lim = dict(max_batch=4, max_seq_len=64, kv_block_size=4, kv_offload=True) | limits
    cfg = EngineConfig(
        str(d),
        device="emu",
        compute_dtype="float32",
        stream=StreamConfig(gpu_memory_bytes=budget),
        limits=LimitsConfig(**lim),
    )
    return E.Engine(cfg, tokenizer=FakeTok())


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_offloaded_kv_matches_transformers_and_moves_the_written_rows(tmp_path, monkeypatch, name):
    d = make_tiny_model(tmp_path, name)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    dev = EmuDevice(EmuOptions(max_delay_s=0.002, seed=3))
    eng = emu_engine(d, monkeypatch, dev, budget=0)  # every block streams: every layer's KV travels
    spec = eng.spec
    off = eng.cache.offload
    assert off is not None and off.layers == set(range(spec.num_layers))
    stats = []
    orig = eng.step
    eng.step = lambda: stats.append(orig()) or stats[-1]
    out = eng.generate([greedy(str(i), p, 8) for i, p in enumerate(PROMPTS)])
    for i, p in enumerate(PROMPTS):
        assert list(out[str(i)].token_ids) == hf_greedy(ref, p), (i, p)
    eng.streamer._slots.h2d.synchronize()
    # Every new row (prompt + 7 fed-back tokens) went back to host memory once, for every layer.
    per = kv_bytes_per_token(spec.num_layers, spec.kv_heads, spec.head_dim, 4)
    assert sum(s.kv_bytes_d2h for s in stats) == sum(len(p) + 7 for p in PROMPTS) * per
    assert sum(s.kv_bytes_written for s in stats) == sum(s.kv_bytes_d2h for s in stats)
    assert sum(s.kv_bytes_h2d for s in stats) > 0
    kv_up = sum(r.nbytes for r in dev.timeline if r.tag.startswith("kv h2d"))
    assert kv_up == sum(s.kv_bytes_h2d for s in stats)  # what the copy engine moved is what is counted
    assert overlapped(dev.timeline, "h2d", "d2h") > 0  # write-backs run while the next layers upload
    assert dev.violations == []


def test_offload_keeps_resident_layers_kv_on_the_device(tmp_path, monkeypatch):
    """A budget that keeps some blocks resident: their KV stays in device pools, the others travel."""
    d = make_tiny_model(tmp_path, "llama")
    dev = EmuDevice()
    big = 10**9
    kv = dict(kv_memory_bytes=64 * kv_bytes_per_token(3, 2, 8, 4))  # a fixed pool: 64 tokens
    eng = emu_engine(d, monkeypatch, dev, budget=big, **kv)
    assert eng.streamer.plan.streamed == () and eng.cache.offload is None  # all resident: nothing to move
    full = eng.generate([greedy(str(i), p, 6) for i, p in enumerate(PROMPTS)])
    block = max(eng.store.block_nbytes(i) for i in range(eng.spec.num_layers))
    layer_kv = eng.kv_plan.nbytes // eng.spec.num_layers
    # outer + 2 streaming slots + 1 decoded copy + 2 staging pools + one resident block with its pool
    # (+ a block of slack for slot alignment): one block resident, two streamed
    budget = eng.store.outer_nbytes() + 5 * block + 3 * layer_kv
    dev2 = EmuDevice(EmuOptions(max_delay_s=0.001))
    eng2 = emu_engine(d, monkeypatch, dev2, budget=budget, **kv)
    assert eng2.streamer.plan.resident and eng2.streamer.plan.streamed
    assert eng2.cache.offload.layers == set(eng2.streamer.plan.streamed)
    got = eng2.generate([greedy(str(i), p, 6) for i, p in enumerate(PROMPTS)])
    assert {k: v.token_ids for k, v in got.items()} == {k: v.token_ids for k, v in full.items()}
    assert dev2.violations == []
    # Weights, slots, resident KV pools and staging: all counted, all inside (activations come on top).
    assert dev2.placed_peak <= budget < dev2.peak
