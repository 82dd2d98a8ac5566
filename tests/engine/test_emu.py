"""The emulated device (`--device emu`): the GPU's code path (slots, events, two copy streams, write-back)
run on the CPU with real copies.

Against independent references: the textbook MeZO loop and the uninterrupted run of test_trainer (kill -9
resume bitwise), the direct CPU path's logits (streamed == resident, now with real copies), plain Python
bookkeeping of bytes; ordering checked by the emulated device itself, with negative controls showing the
checks can fail."""

from __future__ import annotations

import itertools
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.engine import test_trainer as T
from tests.engine.test_trainer import (
    assert_same_tensors,
    base_cfg,
    crash,
    engine_logits,
    exported,
    partial_budget,
    run_job,
)
from zostream.engine.config import EngineConfig, StreamConfig
from zostream.engine.emu import (
    CopyRecord,
    EmuCopyError,
    EmuDevice,
    EmuOptions,
    overlapped,
    overlapped_with_compute,
)
from zostream.engine.residency import slot_layout
from zostream.engine.store import WeightStore
from zostream.engine.streamer import LayerStreamer
from zostream.engine.working_copy import WorkingCopy

pytestmark = pytest.mark.usefixtures("one_thread")


CPU = torch.device("cpu")


@pytest.fixture
def recorded_losses(monkeypatch: pytest.MonkeyPatch) -> list:
    """(step, [(L+, L-) per direction]) for every step the trainer commits."""
    rec: list = []
    orig = T.trainer.ZOStepWorkload.losses

    def losses(self):
        out = orig(self)
        rec.append((self.step, list(out)))
        return out

    monkeypatch.setattr(T.trainer.ZOStepWorkload, "losses", losses)
    return rec


def emu(delay: float = 0.0, seed: int = 0, register: bool = True) -> EmuDevice:
    return EmuDevice(EmuOptions(max_delay_s=delay, seed=seed, host_register=register))


# ---------------------------------------------------------------------------------------------- the device


def test_events_order_copies_across_streams():
    """Stream B waits on an event recorded after a slow copy on stream A: B's copy sees A's result."""
    dev = emu(delay=0.02)
    a, b = dev.stream("a"), dev.stream("b")
    src = torch.arange(1000, dtype=torch.float32)
    mid, dst = torch.zeros(1000), torch.zeros(1000)
    ev = dev.event()
    dev.copy(mid, src, a, "a")
    ev.record(a)
    b.wait_event(ev)
    dev.copy(dst, mid, b, "b")
    done = dev.event()
    done.record(b)
    done.synchronize()
    assert torch.equal(dst, src) and ev.query() and done.query()
    assert dev.bytes_by_stream == {"a": 4000, "b": 4000}
    assert dev.violations == []


def test_copies_are_asynchronous_and_query_does_not_block():
    dev = emu()
    s = dev.stream("s")
    blocker = threading.Event()
    never = dev.stream("blocked")
    never._submit(("wait", _FlagEvent(blocker, dev), 1))
    gate2 = dev.event()
    gate2.record(never)
    s.wait_event(gate2)
    dst = torch.zeros(4)
    dev.copy(dst, torch.ones(4), s, "x")
    time.sleep(0.05)
    assert not gate2.query() and torch.equal(dst, torch.zeros(4))  # the copy waits; the host did not
    blocker.set()
    with dev.cond:
        dev.cond.notify_all()
    s.synchronize()
    assert torch.equal(dst, torch.ones(4))


class _FlagEvent:
    """An event-like object completed by a threading.Event (to hold a stream at a known point)."""

    def __init__(self, flag: threading.Event, dev: EmuDevice) -> None:
        self.flag = flag

    @property
    def completed(self) -> int:
        return 1 if self.flag.is_set() else 0


def test_allocator_counts_device_bytes():
    dev = emu()
    a = dev.empty(1000)
    b = dev.upload(torch.zeros(10, dtype=torch.float32))
    assert a.numel() == 1000 and b.data_ptr() != 0
    assert dev.allocated == 1040 and dev.peak == 1040
    dev.free(1000)
    assert dev.allocated == 40 and dev.peak == 1040


def test_compute_memory_counts_what_compute_allocates_until_it_dies():
    """Inside track_compute every new tensor is device memory until its storage dies; views and in-place
    results are not new memory; the device's own buffers are counted once (explicitly)."""
    dev = emu()
    host = torch.zeros(10, dtype=torch.float32)
    with dev.track_compute():
        a = torch.ones(1000, dtype=torch.float32)  # 4000 B
        v = a.view(10, 100)[2:5]  # a view: no new memory
        a.mul_(2)  # in place: none
        assert dev.allocated == 4000
        b = a.to(torch.float64)  # 8000 B more
        assert dev.allocated == 12000 and dev.peak == 12000
        del b
        c = torch.zeros(250, dtype=torch.int32)  # 1000 B, counted after b's 8000 are swept
        assert dev.allocated == 5000
        d = dev.upload(host)  # 40 B, explicit, not also tracked
        assert dev.allocated == 5040 and dev.compute_bytes == 5000
    assert dev.peak == 12000 and dev.compute_peak == 12000
    del a, v, c
    dev.sweep()
    assert dev.allocated == 40 and dev.compute_bytes == 0 and d.numel() == 10
    with dev.track_compute(), dev.track_compute():  # reentrant; leaving the outer one stops tracking
        e = torch.ones(10, dtype=torch.float32) + 1  # the temporary ones(10) dies: swept on leaving
    assert dev.allocated == 80
    f = torch.ones(10, dtype=torch.float32) + 1
    assert dev.allocated == 80 and e.numel() == f.numel()


def test_emu_counts_kv_pools_and_activations_of_a_pass(models, monkeypatch):
    """An engine on emu: the KV pools are device memory from the start, and a generation pass's
    activations raise the peak by at least the prompt's hidden states (B x S x hidden, fp32)."""
    from tests.engine.test_generation import greedy, make_engine
    from zostream.engine import engine_setup

    dev = emu()  # its own device: the process-wide one carries other tests' buffers
    monkeypatch.setattr(engine_setup, "emu_device", lambda name: dev if name == "emu" else None)
    eng = make_engine(models("llama"), "emu", gpu_memory_bytes=0)
    kv = eng.cache.nbytes()
    slots = eng.streamer.depth * eng.streamer.plan.slot_bytes
    outer = sum(t.numel() * t.element_size() for t in eng.streamer.outer().values())
    assert dev.allocated == kv + slots + outer
    prompt = list(range(1, 41))
    eng.generate([greedy(str(i), prompt, 2) for i in range(3)])
    hidden = 3 * len(prompt) * eng.spec.hidden * 4
    assert dev.peak - (kv + slots + outer) >= hidden
    dev.sweep()
    assert dev.allocated == kv + slots + outer  # nothing compute made outlives the passes


def test_host_waits_are_spans_in_the_timeline():
    """The host blocking on an unfinished copy leaves a "host-wait" span that ends after the copy; waiting
    on a finished one leaves none. Copy time while the host was not waiting is what overlapped compute."""
    dev = emu(delay=0.05)
    s = dev.stream("h2d")
    dst, src = torch.empty(1000), torch.ones(1000)
    dev.copy(dst, src, s, "kv h2d 0")
    ev = dev.event()
    ev.record(s)
    dev.compute.wait_event(ev)
    copy = next(r for r in dev.timeline if r.stream == "h2d")
    waits = [r for r in dev.timeline if r.stream == "host-wait"]
    assert len(waits) == 1 and waits[0].end >= copy.end and torch.equal(dst, src)
    ev.synchronize()  # already complete: no new span
    assert len([r for r in dev.timeline if r.stream == "host-wait"]) == 1
    # By hand: a copy over [0, 4] while the host waited over [1, 2] and [3, 5]: 4 s busy, 2 s with compute.
    tl = [
        CopyRecord("d2h", "kv d2h 1", 8, 0.0, 4.0),
        CopyRecord("d2h", "d2h 1", 8, 0.0, 9.0),  # another tag: not counted
        CopyRecord("host-wait", "wait_event", 0, 1.0, 2.0),
        CopyRecord("host-wait", "synchronize", 0, 3.0, 5.0),
    ]
    assert overlapped_with_compute(tl, "d2h", "kv ") == (4.0, 2.0)


def test_emu_is_accepted_as_a_device():
    assert EngineConfig(model_dir="m", device="emu").device == "emu"
    from zostream.clients.common import device_arg

    assert device_arg("emu") == "emu"
    with pytest.raises(ValueError, match="auto, cpu, emu"):
        EngineConfig(model_dir="m", device="tpu")


# ---------------------------------------------------------------------------------------------- slots


def test_slot_layout_sizes_what_it_fills():
    """The slot must hold every tensor at its 256-byte-aligned offset (the size was once the unaligned
    sum: the last tensor overflowed by up to 255 bytes)."""
    ts = {"a": torch.zeros(33, dtype=torch.float32), "b": torch.zeros(7, dtype=torch.bfloat16)}
    lay = slot_layout(ts)
    assert lay.items == (("a", 0, 132), ("b", 256, 14))
    assert lay.nbytes >= 256 + 14
    assert lay.nbytes > sum(t.numel() * t.element_size() for t in ts.values())


@pytest.mark.parametrize("name", ["llama", "opt", "qwen3"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_streamed_equals_resident_with_real_copies(models, name, depth):
    """Logits through emu slots (every block streamed, delays on) == the direct CPU path, bitwise."""
    model = models(name)
    store = WeightStore(model)
    ids = torch.randint(1, 101, (2, 9), generator=torch.Generator().manual_seed(3))
    direct = LayerStreamer(store, CPU, torch.float32, StreamConfig())
    want = engine_logits(direct, store.family, store.spec, ids)
    for budget in (None, 0):
        dev = emu(delay=0.002, seed=depth)
        st = LayerStreamer(store, CPU, torch.float32, StreamConfig(budget, depth), emu=dev)
        assert st.copies and bool(st.plan.streamed) == (budget == 0)
        for _ in range(2):  # the second pass starts from the blocks prefetched at the end of the first
            got = engine_logits(st, store.family, store.spec, ids)
            assert torch.equal(got, want), (budget, depth)
        assert dev.violations == []
        # Every weight is a copy in device memory, never the host mapping.
        host = {t.untyped_storage().data_ptr() for t in store.outer().values()}
        assert not host & {t.untyped_storage().data_ptr() for t in st.outer().values()}


def test_timeline_records_block_compute_spans(models):
    """Each streamed block's use by compute is a "kernels" span in the timeline, after its upload ended."""
    store = WeightStore(models("llama"))
    dev = emu()
    st = LayerStreamer(store, CPU, torch.float32, StreamConfig(0, 2), emu=dev)
    for _ in range(2):
        with st.open_pass() as blocks:
            for _i, _w in blocks:
                time.sleep(0.001)
    spans = [r for r in dev.timeline if r.stream == "kernels"]
    assert [r.tag.split(" in ")[0] for r in spans] == [f"block {i}" for i in range(3)] * 2
    ups = [r for r in dev.timeline if r.stream == "h2d"]
    for k, span in enumerate(spans):
        assert span.end - span.start >= 0.001
        assert span.start >= [u for u in ups if u.tag == f"h2d {k % 3}"][k // 3].end


@pytest.mark.parametrize("register", [True, False])
def test_transfer_seconds_are_the_uploads_time_on_the_copy_stream(models, register):
    """stats.transfer_seconds (zostream_layer_transfer_seconds_total) on the slot path: each upload's span
    on the H2D stream, from timed events read once they completed (plus the staging ring's host copies).
    Checked against the copy engine's own timeline: at least the copies of the two passes' uploads, at most
    every upload issued (the next pass's prefetches may be counted already) with scheduling slack."""
    store = WeightStore(models("llama"))
    dev = emu(delay=0.002, register=register)
    st = LayerStreamer(store, CPU, torch.float32, StreamConfig(0, 2), emu=dev)
    assert st.host_path() == ("registered" if register else "staging")
    assert st.stats.transfer_seconds == 0
    for _ in range(2):
        with st.open_pass() as blocks:
            for _i, _w in blocks:
                pass
    ups = [
        list(g) for _, g in itertools.groupby((r for r in dev.timeline if r.stream == "h2d"), lambda r: r.tag)
    ]
    assert [u[0].tag for u in ups[:6]] == [f"h2d {i}" for i in range(3)] * 2
    copies = sum(r.end - r.start for u in ups[:6] for r in u)
    spans = sum(u[-1].end - u[0].start for u in ups)
    # The staging path adds the host copies into the ring, which the copy timeline does not hold and which a
    # loaded CPU stretches: there the bound only catches gross miscounts (milliseconds taken for seconds).
    slack = 0.005 * len(ups) if register else 0.5
    assert copies > 0.002 and copies <= st.stats.transfer_seconds <= spans + slack
    st.close()


def test_release_on_exception(models):
    """A workload raising mid-pass: the block in use is released, the next pass runs normally."""
    from zostream.engine.forward import run_pass

    store = WeightStore(models("llama"))
    dev = emu()
    st = LayerStreamer(store, CPU, torch.float32, StreamConfig(0, 2), emu=dev)
    ids = torch.randint(1, 101, (1, 5), generator=torch.Generator().manual_seed(1))
    want = engine_logits(st, store.family, store.spec, ids)

    class Boom(T.LogitsWorkload):
        def block(self, i, w):
            if i == 1:
                raise RuntimeError("boom")
            super().block(i, w)

    with pytest.raises(RuntimeError, match="boom"):
        run_pass(st, [Boom(store.family, store.spec, ids)])
    assert dev._in_use == {}  # nothing left marked as in use by compute
    assert torch.equal(engine_logits(st, store.family, store.spec, ids), want)
    assert dev.violations == []


def test_ordering_checks_can_fail(models, monkeypatch):
    """Negative control: compute that does not wait for the ready event is caught."""
    store = WeightStore(models("llama"))
    dev = emu(delay=0.02)
    st = LayerStreamer(store, CPU, torch.float32, StreamConfig(0, 2), emu=dev)
    monkeypatch.setattr(type(dev.compute), "wait_event", lambda self, ev: None)
    ids = torch.ones(1, 4, dtype=torch.long)
    engine_logits(st, store.family, store.spec, ids)
    assert any("read before the copy into it completed" in v for v in dev.violations)


# ------------------------------------------------------------------------------------------- full-parameter


def test_full_step_moves_each_block_once_each_way_and_overlaps(models, tmp_path):
    """Every block streamed: one step uploads each block's bytes once and writes them back once (counted by
    the device, not the streamer); the copy-engine timeline shows H2D and D2H running at the same time."""
    model = models("llama")
    dev = emu(delay=0.01)
    tr = T.open_job(model, tmp_path / "job", base_cfg("full", steps=3), budget=0, emu=dev)
    slots = tr.streamer._slots
    tr.run_step()  # step 0: nothing to catch up (no write-back is needed)
    store = WeightStore(model)
    block_bytes = sum(store.block_nbytes(i) for i in range(store.num_layers))
    slots.h2d.synchronize()  # the next pass's first blocks, prefetched at the end of this one, are in
    before = dict(dev.bytes_by_stream)
    tr.run_step()
    slots.h2d.synchronize()
    moved = {k: v - before.get(k, 0) for k, v in dev.bytes_by_stream.items()}
    assert moved["h2d"] == block_bytes and moved["d2h"] == block_bytes
    assert overlapped(dev.timeline, "h2d", "d2h") > 0
    assert dev.violations == []
    tr.log.close()


def test_counter_never_moves_before_its_write_back_landed(models, tmp_path, monkeypatch):
    model = models("llama")
    dev = emu(delay=0.005)
    checked: list[int] = []
    orig = WorkingCopy.end_write

    def end_write(self: WorkingCopy, g: int, step: int) -> None:
        assert not any(dev.writes_pending(t) for t in self.group_tensors(g).values()), g
        checked.append(g)
        orig(self, g, step)

    monkeypatch.setattr(WorkingCopy, "end_write", end_write)
    budget = partial_budget(model, depth=3)
    tr = run_job(model, tmp_path / "job", base_cfg("full", steps=4), 4, budget, emu=dev)
    assert set(checked) == set(range(4))  # every group's counter moved, outer and resident at flush
    assert dev.violations == []
    tr.log.close()


def _budgets(model: Path) -> list[int | None]:
    return [None, 0, partial_budget(model, depth=3)]


@pytest.mark.parametrize("budget_kind", [0, 1, 2])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_kill_and_resume_is_bitwise_uninterrupted(models, tmp_path, method, budget_kind):
    """Killed after step 3 with masters on the device (outer and resident copies dirty, never flushed),
    resumed to 6: bitwise the uninterrupted run and the textbook loop. With counters that moved when the
    update reached the device copy, 30 of 30 tensors differed."""
    model = models("llama")
    cfg = base_cfg(method, steps=6)
    kill_resume_uninterrupted(model, tmp_path, cfg, _budgets(model)[budget_kind], kill_after=3)
    assert_same_tensors(exported(tmp_path / "job", method), T.TextbookMeZO(model, cfg).run(6).served())


def kill_resume_uninterrupted(model: Path, tmp_path: Path, cfg, budget: int | None, kill_after: int) -> None:
    """tmp_path/job: killed after `kill_after` steps with the device's copies dirty (never flushed), then
    resumed to cfg.steps; its log and export equal tmp_path/ref's, which ran uninterrupted."""
    ref = run_job(model, tmp_path / "ref", cfg, cfg.steps, budget, emu=emu())
    dev = emu(delay=0.002)
    crash(run_job(model, tmp_path / "job", cfg, kill_after, budget, finish=False, emu=dev))
    dev.kill()
    tr = run_job(model, tmp_path / "job", cfg, cfg.steps, budget, emu=emu())
    assert (tmp_path / "job" / "update.log").read_bytes() == (tmp_path / "ref" / "update.log").read_bytes()
    assert_same_tensors(exported(tmp_path / "job", cfg.method), exported(tmp_path / "ref", cfg.method))
    ref.log.close()
    tr.log.close()


def test_full_parameter_grzo_kill_and_resume_in_emu(models, tmp_path):
    """Full-parameter grzo (each group's micro-batch through its own direction, one direction's block copies
    at a time) streamed through the emulated device, killed after step 2 with dirty device copies, resumed
    to 4: bitwise the uninterrupted run and the all-resident textbook grzo loop."""
    from tests.engine.test_grzo import TextbookGRZO

    model = models("llama")
    cfg = base_cfg("full", steps=4, estimator="grzo", q=2, lr_schedule="constant")
    kill_resume_uninterrupted(model, tmp_path, cfg, _budgets(model)[1], kill_after=2)
    assert_same_tensors(exported(tmp_path / "job", "full"), TextbookGRZO(model, cfg).run(4).master)


@pytest.mark.parametrize("where", ["mid-pass", "after-landing"])
def test_kill_inside_the_pass_resumes_bitwise(models, tmp_path, monkeypatch, where):
    """Killed in step 4's pass: mid-pass (block 1's forward raises after its update was applied), or
    between a write-back landing and its counter moving (the hook dies). Queued copies never run."""
    model = models("llama")
    cfg = base_cfg("full", steps=6)
    ref = run_job(model, tmp_path / "ref", cfg, 6, 0, emu=emu())
    dev = emu(delay=0.002)
    tr = T.open_job(model, tmp_path / "job", cfg, budget=0, emu=dev)
    for _ in range(4):
        tr.run_step()

    class Killed(BaseException):
        pass

    if where == "mid-pass":
        orig_block = T.trainer.ZOStepWorkload.block

        def block(self, i, w):
            orig_block(self, i, w)
            if i == 1:
                dev.kill()
                raise Killed

        monkeypatch.setattr(T.trainer.ZOStepWorkload, "block", block)
    else:
        hook = tr.streamer.on_write_back

        def dying(g, tag, landed):
            if landed and g == 2:
                dev.kill()
                raise Killed
            hook(g, tag, landed)

        tr.streamer.on_write_back = dying
    with pytest.raises((Killed, EmuCopyError)):  # after the kill, the device's next wait fails too
        tr.run_step()
    monkeypatch.undo()
    crash(tr)
    tr = run_job(model, tmp_path / "job", cfg, 6, 0, emu=emu())
    assert_same_tensors(exported(tmp_path / "job", "full"), exported(tmp_path / "ref", "full"))
    ref.log.close()
    tr.log.close()


@pytest.mark.parametrize("method", ["full", "lora"])
def test_textbook_mezo_bitwise_in_emu(models, tmp_path, recorded_losses, method):
    """Streamed (any budget) lazy-update ZO2 on the emulated device == all-resident textbook MeZO."""
    T.check_against_textbook(
        models("llama"), tmp_path, recorded_losses, base_cfg(method, q=2), emu=lambda: emu(delay=0.001)
    )


def test_staging_path_when_registration_is_refused(models, tmp_path):
    """Registration refused (memlock, a kernel refusing a writable pin): the staging ring, same bits."""
    model = models("llama")
    cfg = base_cfg("full", steps=3)
    ref = run_job(model, tmp_path / "ref", cfg, 3, 0, emu=emu())
    dev = emu(delay=0.002, register=False)
    tr = run_job(model, tmp_path / "job", cfg, 3, 0, emu=dev)
    assert tr.streamer.host_path() == "staging" and not dev.registered
    assert_same_tensors(exported(tmp_path / "job", "full"), exported(tmp_path / "ref", "full"))
    ref.log.close()
    tr.log.close()


def test_registration_refuses_overlaps_and_copies_record_their_host_memory():
    """As CUDA: registering a range that overlaps a registered one fails, all or nothing; each copy's
    record says whether its host side was page-locked (registered or pinned()) or pageable."""
    dev = emu()
    host = torch.arange(4096, dtype=torch.uint8)
    p = host.data_ptr()
    assert dev.register([(p, 1024)], read_only=True) == [p]
    assert dev.register([(p + 2048, 512), (p + 512, 1024)], read_only=True) == []  # the second overlaps
    assert dev.registered == {p: 1024}
    slot, staging = dev.empty(1024), dev.pinned(1024)
    s = dev.stream("h2d")
    dev.copy(slot, host[:1024], s, "registered")
    dev.copy(slot, staging, s, "staged")
    dev.copy(slot, host[1024:2048], s, "pageable")
    s.synchronize()
    assert [(r.tag, r.pinned) for r in dev.timeline if r.stream == "h2d"] == [
        ("registered", True),
        ("staged", True),
        ("pageable", False),
    ]
    dev.unregister([p])
    assert not dev.registered


def test_streamer_unregisters_host_memory(models):
    store = WeightStore(models("llama"))
    dev = emu()
    st = LayerStreamer(store, CPU, torch.float32, StreamConfig(0, 2), emu=dev)
    assert dev.registered
    st.close()
    assert not dev.registered


# ------------------------------------------------------------------------------------------- durability


@pytest.mark.parametrize("restart", [True, False])
def test_after_a_restart_the_working_copy_is_rebuilt_from_the_log(models, tmp_path, restart):
    """Power loss: pages of the shared mapping reach the disk in any order (here: a counter says step 3,
    the block's tensors hold garbage). After a restart (another boot id) every group is rebuilt from the
    base and the log replayed: bitwise the uninterrupted run. Without a restart the copy is trusted as it
    is (process death keeps the page cache), so the same garbage survives: the check is real."""
    import numpy as np

    model = models("llama")
    cfg = base_cfg("full", steps=6)
    run_job(model, tmp_path / "ref", cfg, 6).log.close()
    crash(run_job(model, tmp_path / "job", cfg, 3, finish=False))
    working = tmp_path / "job" / "working"
    assert (working / "boot_id").exists()
    assert list(np.fromfile(working / "applied.bin", dtype=np.int64)) == [2] * 4
    store = WeightStore(working, writable=True)
    for t in store.block(1).values():
        t.fill_(0.5)  # what reached the disk of this block: not step 2's tensors
    del store
    if restart:
        (working / "boot_id").write_text("a-boot-before-the-power-cut")
    tr = run_job(model, tmp_path / "job", cfg, 6)
    got, want = exported(tmp_path / "job", "full"), exported(tmp_path / "ref", "full")
    if restart:
        assert_same_tensors(got, want)
    else:
        assert any(not torch.equal(got[n], want[n]) for n in want)
    tr.log.close()


# ------------------------------------------------------------------------------------------- sync lint


class HostSync(AssertionError):
    pass


@pytest.fixture
def sync_lint(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Inside a pass's block loop (between a block being handed out and the next one being asked for),
    .item() / .tolist() / .cpu() / torch.tensor(..., device=...) raise HostSync: on a GPU each is a host
    synchronisation that stalls the copy streams. Returns the places that were checked."""
    inside: list[int] = []
    checked: list[str] = []
    orig_iterate = LayerStreamer._iterate

    def _iterate(self):
        for i, w in orig_iterate(self):
            inside.append(i)
            try:
                yield i, w
            finally:
                inside.pop()

    def guard(name, fn):
        def wrapper(*a, **kw):
            if inside and (name != "torch.tensor" or kw.get("device") is not None):
                raise HostSync(f"{name} inside blocks() (block {inside[-1]})")
            return fn(*a, **kw)

        return wrapper

    monkeypatch.setattr(LayerStreamer, "_iterate", _iterate)
    for meth in ("item", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, meth, guard(f".{meth}()", getattr(torch.Tensor, meth)))
    monkeypatch.setattr(torch, "tensor", guard("torch.tensor", torch.tensor))
    return checked


def test_sync_lint_catches_a_sync(models, sync_lint):
    """Negative control: a workload calling .item() per block fails."""
    store = WeightStore(models("llama"))
    st = LayerStreamer(store, CPU, torch.float32, StreamConfig(0, 2), emu=emu())

    class Syncing(T.LogitsWorkload):
        def block(self, i, w):
            super().block(i, w)
            self.h.sum().item()

    from zostream.engine.forward import run_pass

    with pytest.raises(HostSync, match=r"\.item\(\)"):
        run_pass(st, [Syncing(store.family, store.spec, torch.ones(1, 4, dtype=torch.long))])


@pytest.mark.parametrize("method", ["full", "lora"])
def test_no_host_sync_inside_a_training_pass(models, tmp_path, sync_lint, method):
    tr = T.open_job(models("llama"), tmp_path / "job", base_cfg(method, steps=3), budget=0, emu=emu())
    for _ in range(3):
        tr.run_step()
    tr.log.close()


def test_no_host_sync_inside_a_generation_pass(models, sync_lint):
    from tests.engine.test_generation import PROMPTS, greedy, make_engine

    eng = make_engine(models("llama"), "emu", gpu_memory_bytes=0)
    assert eng.streamer.copies and eng.streamer.plan.streamed
    out = eng.generate([greedy(str(i), p, 4) for i, p in enumerate(PROMPTS)])
    assert all(len(r.token_ids) == 4 for r in out.values())


@pytest.mark.parametrize("codec", ["int8", "nf4"])
def test_codec_blocks_through_emu_slots_match_the_cpu_path(models, tmp_path, codec):
    """Packed codec blocks uploaded into slots and decoded there == decoded from the host cache, bitwise."""
    from tests.engine.test_generation import FakeTok
    from zostream.engine.config import CodecConfig, LimitsConfig
    from zostream.engine.engine import Engine

    def logits(device: str) -> torch.Tensor:
        cfg = EngineConfig(
            str(models("llama")),
            device=device,
            compute_dtype="float32",
            stream=StreamConfig(gpu_memory_bytes=0),
            codec=CodecConfig(name=codec, cache_dir=str(tmp_path / "codecs")),
            limits=LimitsConfig(max_batch=2, max_seq_len=32),
        )
        eng = Engine(cfg, tokenizer=FakeTok())
        assert eng.streamer.copies == (device == "emu")
        ids = torch.randint(1, 101, (2, 7), generator=torch.Generator().manual_seed(2))
        return engine_logits(eng.streamer, eng.family, eng.spec, ids)

    assert torch.equal(logits("emu"), logits("cpu"))


def test_no_host_sync_inside_a_generation_pass_with_an_adapter(models, sync_lint):
    """A batch mixing an adapter's rows and base rows (per-layer row indices for the LoRA gather)."""
    import dataclasses

    from tests.engine.test_generation import greedy, make_engine
    from zostream.engine.peft import LoraAdapter, LoraSpec

    eng = make_engine(models("llama"), "emu", gpu_memory_bytes=0)
    eng.adapters["a"] = LoraAdapter.init(LoraSpec(), eng.family, eng.spec, eng.device)
    reqs = [greedy("base", [5, 6, 7], 3), dataclasses.replace(greedy("lora", [8, 9], 3), adapter_id="a")]
    out = eng.generate(reqs)
    assert all(len(r.token_ids) == 3 for r in out.values())
