"""Paged KV cache: block bookkeeping, attention through block tables vs the contiguous slot cache,
generation vs transformers with tiny blocks and a pool too small for every request at once."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine.test_generation import PROMPTS, FakeTok, greedy, hf_greedy
from tests.tiny import make_tiny_model
from zostream.engine.config import EngineConfig, LimitsConfig, StreamConfig
from zostream.engine.engine import Engine
from zostream.engine.errors import RequestError
from zostream.engine.kv_blocks import BlockAllocator
from zostream.engine.kv_cache import PagedKVCache, kv_bytes_per_token, plan_kv
from zostream.engine.models.attention import AttentionBatch, KVCache
from zostream.engine.scheduler import Scheduler
from zostream.engine.store import WeightStore


def test_allocator_takes_blocks_as_tokens_arrive_and_returns_them():
    a = BlockAllocator(num_blocks=6, block_size=4)
    assert (a.used, a.free) == (0, 6)
    assert len(a.ensure("x", 1)) == 1 and a.used == 1
    assert len(a.ensure("x", 4)) == 1 and a.growth("x", 5) == 1
    assert len(a.ensure("x", 5)) == 2
    ty = a.ensure("y", 12)
    assert len(set(ty) | set(a.tables["x"])) == 5  # no block shared
    with pytest.raises(RuntimeError, match="exhausted"):
        a.ensure("x", 13)
    a.release("x")
    assert (a.used, a.free) == (3, 3)
    a.release("y")
    a.release("y")  # twice is harmless (abort after finish)
    assert (a.used, a.free) == (0, 6)


def test_scheduler_preempts_the_newest_and_readmits_it_first():
    """Bookkeeping only (no model): 4 blocks of 2 positions, two 3-token prompts."""
    sch = Scheduler(LimitsConfig(max_batch=4, max_seq_len=8, kv_block_size=2), BlockAllocator(4, 2))
    sch.add("a", 3, 5)
    sch.add("b", 3, 5)
    sch.add("c", 1, 1)
    plan = sch.schedule()
    assert plan.prefill == ("a", "b") and sch.waiting[0] == "c"  # 2 + 2 blocks: c's 1 does not fit
    assert [len(sch.kv.ensure(r, 3)) for r in plan.prefill] == [2, 2]
    plan = sch.schedule({"a": 4, "b": 4})  # 4 positions still fit 2 blocks each
    assert plan.decode == ("a", "b") and not plan.preempted
    plan = sch.schedule({"a": 5, "b": 5})  # both need a 3rd block, none is free: b (newest) goes
    assert plan.preempted == ("b",) and plan.decode == ("a",) and list(sch.waiting) == ["b", "c"]
    assert sch.kv.free == 2 and sch.lengths["b"] == 5 and not plan.prefill  # b needs 3 blocks, 1 spare
    sch.kv.ensure("a", 5)
    sch.finish("a")
    plan = sch.schedule()
    assert plan.prefill == ("b", "c") and not sch.waiting  # b first (3 blocks), then c (1)
    sch.kv.ensure("b", 5)
    sch.kv.ensure("c", 1)
    plan = sch.schedule({"b": 7, "c": 2})  # b needs a 4th block: c, admitted after it, is preempted
    assert plan.preempted == ("c",) and plan.decode == ("b",) and list(sch.waiting) == ["c"]
    assert sch.lengths["c"] == 2 and sch.kv.free == 1


def test_plan_kv_sizes():
    per = kv_bytes_per_token(layers=2, kv_heads=2, head_dim=8, itemsize=2)
    assert per == 2 * 2 * 2 * 8 * 2
    full = plan_kv(per, 16, max_batch=4, max_seq_len=40, budget=None)
    assert full.num_blocks == 4 * 3 and full.tokens == 192 and full.nbytes == 192 * per
    assert plan_kv(per, 16, 4, 40, budget=0).num_blocks == 12  # 0: every weight block streams
    assert plan_kv(per, 16, 4, 40, budget=10 * 16 * per).num_blocks == 5  # half the budget
    assert plan_kv(per, 16, 4, 40, budget=1).num_blocks == 3  # never less than one full sequence
    assert plan_kv(per, 16, 4, 40, kv_bytes=7 * 16 * per + 5).num_blocks == 7
    # the weights' fixed share (outer + streaming slots) comes first: 20 - 14 blocks' bytes are left
    assert plan_kv(per, 16, 4, 40, budget=20 * 16 * per, fixed_bytes=14 * 16 * per).num_blocks == 6
    # offloaded: the budget pays for a quarter of the pool (2 staging pools of 8 layers): 4x the blocks
    assert plan_kv(per, 16, 4, 40, budget=4 * 16 * per, device_fraction=2 / 8).num_blocks == 8
    assert plan_kv(per, 16, 4, 40, budget=100 * 16 * per, device_fraction=2 / 8).num_blocks == 12  # full
    with pytest.raises(ValueError, match="kv_memory"):
        plan_kv(per, 16, 4, 40, kv_bytes=per)


def _run(fam, store, spec, chunks_ids, lens, past, make_ab):
    ab = make_ab(lens, chunks_ids.shape[1], past)
    h = fam.embed(store.outer(), chunks_ids, ab.positions, spec)
    for i in range(spec.num_layers):
        h = fam.block(h, store.block(i), ab.layer(i), spec)
    return fam.head(h, store.outer(), spec)


@pytest.mark.parametrize("name", ["llama", "opt", "qwen3"])
def test_paged_attention_equals_contiguous_slots_bitwise(tmp_path, name):
    """Mixed-length rows prefill, then decode; the reference is the slot cache (an independent layout).

    The paged rows own interleaved, out-of-order blocks of 4 positions, so every gather crosses blocks.
    """
    d = make_tiny_model(tmp_path, name)
    store = WeightStore(d)
    fam, spec = store.family, store.spec
    B, bs = 3, 4
    slots_cache = KVCache.allocate(spec.num_layers, B, spec.kv_heads, 32, spec.head_dim, torch.float32, "cpu")
    paged = PagedKVCache.allocate(spec.num_layers, 24, bs, spec.kv_heads, spec.head_dim, torch.float32, "cpu")
    for t in paged.k + paged.v:
        t.fill_(float("nan"))  # never-written positions must not reach the attention
    tables = [[9, 2, 17, 5, 11, 0, 22], [3, 20, 8, 14, 1, 6, 19], [7, 12, 4, 23, 16, 10, 21]]
    g = torch.Generator().manual_seed(4)
    lens = torch.tensor([7, 2, 5])
    past = torch.zeros(3, dtype=torch.int64)
    steps = [lens] + [torch.ones(3, dtype=torch.int64)] * 5
    for step_lens in steps:
        T = int(step_lens.max())
        ids = torch.randint(0, 101, (B, T), generator=g)
        slot_ab = lambda ln, T, p: AttentionBatch.build(ln, T, p, slots_cache, torch.tensor([2, 0, 1]))
        paged_ab = lambda ln, T, p: AttentionBatch.build_paged(ln, T, p, paged, tables)
        want = _run(fam, store, spec, ids, step_lens, past, slot_ab)
        got = _run(fam, store, spec, ids, step_lens, past, paged_ab)
        for b in range(B):
            n = int(step_lens[b])
            assert torch.equal(got[b, :n], want[b, :n]), (b, past.tolist())
        past = past + step_lens


def make_engine(d, **limits) -> Engine:
    lim = dict(max_batch=4, max_seq_len=64) | limits
    cfg = EngineConfig(
        str(d), device="cpu", compute_dtype="float32", stream=StreamConfig(), limits=LimitsConfig(**lim)
    )
    return Engine(cfg, tokenizer=FakeTok())


@pytest.mark.parametrize("block_size", [1, 4])
def test_small_pool_preempts_and_matches_transformers(tmp_path, block_size):
    """A 20-token pool for 51 tokens of requests: sequences are preempted and prefilled again, and
    every one still produces transformers' greedy tokens."""
    d = make_tiny_model(tmp_path, "llama")
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    per = kv_bytes_per_token(3, 2, 8, 4)  # the tiny llama: 3 layers, 2 kv heads, head_dim 8, float32
    eng = make_engine(d, kv_block_size=block_size, kv_memory_bytes=20 * per)
    assert eng.kv_plan.tokens == 20
    stats = []
    orig = eng.step
    eng.step = lambda: stats.append(orig()) or stats[-1]
    out = eng.generate([greedy(str(i), p, 8) for i, p in enumerate(PROMPTS)])
    for i, p in enumerate(PROMPTS):
        assert list(out[str(i)].token_ids) == hf_greedy(ref, p), (i, p)
    assert max(s.kv_blocks_used for s in stats) * block_size <= 20
    assert sum(s.kv_preemptions for s in stats) > 0
    assert (eng.scheduler.kv.used, eng.scheduler.kv.free) == (0, eng.kv_plan.num_blocks)
    assert not eng.scheduler.running and not eng.scheduler.waiting


def test_request_larger_than_the_pool_is_refused_up_front(tmp_path):
    d = make_tiny_model(tmp_path, "llama")
    per = kv_bytes_per_token(3, 2, 8, 4)
    eng = make_engine(d, kv_block_size=4, kv_memory_bytes=16 * per)
    with pytest.raises(RequestError, match="KV cache holds 4") as e:
        eng.submit(greedy("big", PROMPTS[2], 8))  # 19 tokens > 16
    assert e.value.field == "max_new_tokens"
    assert eng.generate([greedy("ok", PROMPTS[2], 5)])["ok"].completion_tokens == 5  # exactly 16 fit


def test_kv_metrics_follow_the_engine(tmp_path):
    from tests.engine.test_metrics import val
    from zostream.engine.metrics import Metrics

    d = make_tiny_model(tmp_path, "llama")
    per = kv_bytes_per_token(3, 2, 8, 4)
    eng = make_engine(d, kv_block_size=4)
    m = Metrics()
    used = []
    orig = eng.step

    def step():
        st = orig()
        m.observe_step(st, codec="none", running=len(eng.scheduler.running), waiting=0)
        used.append(val(m, "zostream_kv_blocks", state="used"))
        return st

    eng.step = step
    eng.generate([greedy("a", PROMPTS[0], 4), greedy("b", PROMPTS[2], 6)])
    # a: 5 + 3 positions written (the last token is sampled, never fed back), b: 11 + 5
    assert val(m, "zostream_kv_bytes_total", op="written") == (8 + 16) * per
    # prefill: both rows gather 11 positions; then decode passes gather max(len) per row
    assert val(m, "zostream_kv_bytes_total", op="read") > val(m, "zostream_kv_bytes_total", op="written")
    assert used[0] == 2 + 3  # blocks of 4 holding 5 and 11 tokens
    assert used[-1] == 0 and val(m, "zostream_kv_blocks", state="free") == eng.kv_plan.num_blocks


def test_cancel_returns_blocks_to_a_waiting_request(tmp_path):
    d = make_tiny_model(tmp_path, "llama")
    per = kv_bytes_per_token(3, 2, 8, 4)
    eng = make_engine(d, kv_block_size=4, kv_memory_bytes=20 * per)  # 5 blocks: one 19-token request
    eng.submit(greedy("a", PROMPTS[2], 8))
    eng.submit(greedy("b", PROMPTS[2], 8))
    eng.step()
    assert list(eng.scheduler.running) == ["a"] and list(eng.scheduler.waiting) == ["b"]
    assert eng.scheduler.kv.used == 3  # 11 prompt positions in blocks of 4
    eng.abort("a")
    eng.step()
    assert list(eng.scheduler.running) == ["b"] and not eng.scheduler.waiting
    assert eng.scheduler.kv.tables["b"] and "a" not in eng.scheduler.kv.tables
