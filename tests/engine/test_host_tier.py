"""The host tier: plan arithmetic, file spans against the safetensors header parsed by hand,
readahead/drop-behind measured with mincore, and generation under a host budget against transformers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests.engine.test_store import header
from tests.tiny import make_tiny_model
from zostream.engine.config import StreamConfig
from zostream.engine.host_tier import file_spans, plan_host, resident_bytes
from zostream.engine.store import WeightStore
from zostream.engine.streamer import LayerStreamer

LINUX_PROC = pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("budget", "resident"),
    [
        (None, (0, 1, 2, 3, 4, 5)),
        (0, ()),
        (10 + 3 * 100 + 100, (0,)),  # outer 10 + ring (depth 2 + 1) x 100 + one block
        (10 + 3 * 100 + 250, (0, 1)),
        (10 + 600, (0, 1, 2, 3, 4, 5)),  # everything fits: no ring needed
        (10 + 600 - 1, (0, 1)),
    ],
)
def test_plan_host(budget, resident):
    plan = plan_host([100] * 6, 10, budget, depth=2)
    assert plan.resident == resident
    assert plan.streamed == tuple(i for i in range(6) if i not in resident)
    assert plan.resident_bytes == 100 * len(resident)


@LINUX_PROC
def test_file_spans_match_the_header(tmp_path):
    d = make_tiny_model(tmp_path, "llama")
    path = d / "model.safetensors"
    start, entries = header(path)
    store = WeightStore(d)
    block = store.block(1)
    spans = file_spans(block.values())
    assert all(s.path == str(path.resolve()) for s in spans)
    covered = sorted((s.offset, s.offset + s.nbytes) for s in spans)
    for local in block:
        lo, hi = (start + x for x in entries[f"model.layers.1.{local}"]["data_offsets"])
        assert any(a <= lo and hi <= b for a, b in covered), local
    want = sum(e["data_offsets"][1] - e["data_offsets"][0] for n, e in entries.items() if ".layers.1." in n)
    assert sum(s.nbytes for s in spans) == want
    for s in spans:  # the address maps to the same bytes as the file offset
        with open(path, "rb") as f:
            f.seek(s.offset)
            raw = f.read(s.nbytes)
        assert bytes(ctypes_bytes(s.addr, s.nbytes)) == raw


def ctypes_bytes(addr: int, n: int) -> bytes:
    import ctypes

    return ctypes.string_at(addr, n)


def _big_llama(tmp_path: Path) -> Path:
    """6 blocks of ~600 KB: many whole pages per block, so residency is measurable."""
    from tests.tiny import TINY_CONFIGS

    with pytest.MonkeyPatch.context() as mp:
        cfg = {**TINY_CONFIGS["llama"], "hidden_size": 128, "intermediate_size": 512, "num_hidden_layers": 6}
        mp.setitem(TINY_CONFIGS, "llama_wide", cfg)
        d = make_tiny_model(tmp_path, "llama_wide")
    # A freshly written file's pages are dirty and cannot be evicted until written back; a base
    # model has long been on disk.
    with open(d / "model.safetensors", "rb") as f:
        os.fsync(f.fileno())
    return d


@LINUX_PROC
@pytest.mark.parametrize("mode", ["read", "willneed"])
def test_stream_passes_drop_streamed_blocks_and_keep_resident_ones(tmp_path, mode, monkeypatch):
    from zostream.engine import host_tier

    monkeypatch.setattr(host_tier.HostTier.__init__, "__defaults__", (2, mode))
    d = _big_llama(tmp_path)
    store = WeightStore(d)
    sizes = [store.block_nbytes(i) for i in range(6)]
    outer = store.outer_nbytes()
    budget = outer + 3 * max(sizes) + sizes[0] + 1000  # block 0 resident, blocks 1..5 streamed
    sc = StreamConfig(gpu_memory_bytes=None, host_memory_bytes=budget)
    st = LayerStreamer(store, CPU, torch.float32, sc)
    tier = st.tier
    assert tier is not None and tier.plan.resident == (0,) and tier.plan.streamed == (1, 2, 3, 4, 5)
    for _ in range(2):
        for i, w in st.blocks():
            full = sum(s.nbytes for s in tier.spans[i])
            if mode == "read":  # the readahead waited for the disk: in RAM before the compute starts
                assert resident_bytes(tier.spans[i]) >= full
            sum(float(t.float().sum()) for t in w.values())
            assert resident_bytes(tier.spans[i]) >= full  # and, either way, once the compute read it
    # Behind the pass: streamed blocks left RAM, except those the readahead already brought back for the
    # next pass. What may remain: a page shared with a neighbour, and the start of the block after one
    # read ahead, which the kernel's own readahead window (128 KiB by default) pulls in.
    ahead = set(tier._inflight)
    for i in (1, 2, 3, 4, 5):
        if i in ahead:
            continue
        assert resident_bytes(tier.spans[i]) <= sizes[i] // 2, i
    assert resident_bytes(tier.spans[0]) >= sizes[0]
    # Bookkeeping: the readahead thread read (or submitted) block 0 once and each streamed block once
    # per pass (plus at most `depth` blocks of the next pass).
    tier.close()
    extra = sum(sizes[i] for i in ahead)
    assert tier.stats.bytes_read == sizes[0] + 2 * sum(sizes[1:]) + extra
    assert tier.stats.dropped_bytes > 0


@LINUX_PROC
@pytest.mark.parametrize(
    ("mode", "device"),
    [("read", "cpu"), ("willneed", "cpu"), ("willneed", "emu")],  # emu: the copy path (staging ring)
)
def test_generation_under_a_host_budget_matches_transformers(tmp_path, mode, device, monkeypatch):
    from transformers import AutoModelForCausalLM

    from tests.engine.test_generation import greedy, make_engine
    from zostream.engine import host_tier

    monkeypatch.setattr(host_tier.HostTier.__init__, "__defaults__", (2, mode))
    d = make_tiny_model(tmp_path, "llama")
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    prompt = [5, 17, 3, 99, 42]
    want = ref.generate(
        torch.tensor([prompt]), max_new_tokens=6, do_sample=False, min_new_tokens=6, pad_token_id=0
    )[0, len(prompt) :].tolist()
    eng = make_engine(d, device, gpu_memory_bytes=0, host_memory_bytes=0)
    assert eng.streamer.tier is not None and eng.streamer.tier.mode == mode
    out = eng.generate([greedy("a", prompt, 6)])
    assert list(out["a"].token_ids) == want
    assert eng.streamer.tier.stats.passes >= 6


def test_bad_host_budget_names_the_field():
    with pytest.raises(ValueError, match="host_memory"):
        StreamConfig(host_memory_bytes=-1)


@LINUX_PROC
def test_codec_cache_is_mapped_read_only_and_streams_through_the_tier(tmp_path):
    from zostream.engine.codec_cache import open_codec_cache
    from zostream.engine.codecs import decode_block, get_codec
    from zostream.engine.config import CodecConfig

    d = _big_llama(tmp_path)
    store = WeightStore(d)
    cfg = CodecConfig("int8", cache_dir=str(tmp_path / "cache"))
    cache = open_codec_cache(store, cfg, progress=False)
    packed = cache.block(2)
    target = str(cache.block_path(2).resolve())
    perms = {ln.split()[1] for ln in Path("/proc/self/maps").read_text().splitlines() if ln.endswith(target)}
    assert perms == {"r--s"}, perms
    codec = get_codec(cfg)
    st = LayerStreamer(
        store,
        CPU,
        torch.float32,
        StreamConfig(gpu_memory_bytes=0, host_memory_bytes=0),
        source=cache.block,
        decoder=lambda p, dev, dt: decode_block(codec, p, dev, dt),
    )
    tier = st.tier
    assert tier is not None and tier.plan.streamed == tuple(range(6))
    # The tier's spans are the cache files' bytes (packed), not the base's.
    assert {s.path for s in tier.spans[2]} == {target}
    assert sum(s.nbytes for s in tier.spans[2]) == sum(t.numel() * t.element_size() for t in packed.values())
    want = {k: v.clone() for k, v in decode_block(codec, packed, CPU, torch.float32).items()}
    for i, w in st.blocks():
        if i == 2:
            assert all(torch.equal(w[k], want[k]) for k in want)
    tier.close()


@LINUX_PROC
def test_blocks_kept_in_ram_upload_from_registered_pages_the_rest_through_staging(tmp_path):
    """Under a host budget on a device that copies: the streamed blocks the tier keeps in RAM are registered
    (their whole pages; of the blocks read from the file every pass at most a page shared with a kept
    neighbour) and upload straight from the mapping, one copy per tensor; the others go through the pinned
    staging ring, one copy per block. Every upload's host side is page-locked, and the blocks reach the
    device as the file holds them."""
    import itertools
    import mmap

    from zostream.engine.emu import EmuDevice

    d = _big_llama(tmp_path)
    store = WeightStore(d)
    sizes = [store.block_nbytes(i) for i in range(6)]
    budget = store.outer_nbytes() + 3 * max(sizes) + sizes[0] + sizes[1] + 1000  # blocks 0-1 kept in RAM
    dev = EmuDevice()
    sc = StreamConfig(gpu_memory_bytes=0, host_memory_bytes=budget)
    st = LayerStreamer(store, CPU, torch.float32, sc, emu=dev)
    assert st.tier is not None and st.tier.plan.resident == (0, 1) and st.host_path() == "registered+staging"
    regs = [(p, p + n) for p, n in dev.registered.items()]

    def pinned_bytes(t: torch.Tensor) -> int:
        a, b = t.data_ptr(), t.data_ptr() + t.nbytes
        return sum(max(0, min(b, hi) - max(a, lo)) for lo, hi in regs)

    for i in range(6):
        block = store.block(i).values()
        got, full = sum(pinned_bytes(t) for t in block), sum(t.nbytes for t in block)
        assert got == full if i < 2 else got <= (mmap.PAGESIZE if i == 2 else 0), i
    with st.open_pass() as blocks:
        for i, w in blocks:
            for name, t in store.block(i).items():
                assert torch.equal(w[name], t.float()), (i, name)
    h2d = (r for r in dev.timeline if r.stream == "h2d")
    ups = [list(g) for _, g in itertools.groupby(h2d, lambda r: r.tag)]
    assert [u[0].tag for u in ups[:6]] == [f"h2d {i}" for i in range(6)]
    assert [len(u) for u in ups[:6]] == [len(store.block(0))] * 2 + [1] * 4
    assert all(r.pinned for u in ups for r in u)
    st.close()
    assert not dev.registered
