"""The adapter registry: with fewer device slots than adapters in use every request is still served
with its own adapter, evictions are counted, and residency stays within the limit between passes.

The reference is the same engine without a limit (the LoRA math itself is checked against peft in
test_peft.py); what this checks is that eviction and reloading never change a request's tokens."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_generation import PROMPTS, make_engine
from tests.tiny import make_tiny_model
from zostream.engine.adapters import AdapterRegistry
from zostream.engine.errors import ResourceExhaustedError
from zostream.engine.generation import GenerateRequest, StopParams
from zostream.engine.peft import LoraAdapter, LoraSpec
from zostream.engine.sampling import SamplingParams


def adapters(eng, n: int) -> dict[str, LoraAdapter]:
    out = {}
    for i in range(n):
        ad = LoraAdapter.init(
            LoraSpec(4, 8.0, ("q_proj", "v_proj"), init_seed=i), eng.family, eng.spec, eng.device
        )
        g = torch.Generator().manual_seed(100 + i)
        for k, v in ad.tensors.items():
            if ".lora_B." in k:  # nonzero B: each adapter changes the logits its own way
                v.copy_(torch.randn(v.shape, generator=g) * 0.5)
        out[f"ad{i}"] = ad
    return out


def run(eng, ads, limit=None):
    eng.adapters = AdapterRegistry(eng.device, limit)
    for aid, ad in ads.items():
        eng.adapters[aid] = ad.clone()
    reqs = [
        GenerateRequest(
            aid,
            PROMPTS[i % len(PROMPTS)],
            SamplingParams(),
            StopParams(max_new_tokens=6, ignore_eos=True),
            aid,
        )
        for i, aid in enumerate(ads)
    ]
    for r in reqs:
        eng.submit(r)
    tokens: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    for r in reqs:
        r.callback = lambda ev: tokens[ev.request_id].extend(ev.token_ids)
    resident = []
    while eng.has_work():
        eng.step()
        resident.append(len(eng.adapters.resident))
    assert eng.adapters.evictions == 0 or limit is not None
    run.last = eng.adapters  # type: ignore[attr-defined]
    return tokens, resident


def test_limit_2_with_5_adapters_in_use(tmp_path) -> None:
    d = make_tiny_model(tmp_path, "llama")
    eng = make_engine(d)
    ads = adapters(eng, 5)
    want, _ = run(eng, ads)
    got, resident = run(make_engine(d), ads, limit=2)
    assert got == want and all(len(t) == 6 for t in got.values())
    assert len({tuple(t) for t in want.values()}) > 1  # the adapters differ, so a mix-up would show
    assert max(resident) <= 2  # between passes
    assert run.last.evictions > 0 and run.last.loads > 0  # type: ignore[attr-defined]
    # fewer slots than adapters in use: some were evicted and loaded again
    reg = AdapterRegistry(torch.device("cpu"), 2)
    for aid, ad in ads.items():
        reg[aid] = ad
    assert reg.evictions == 3 and reg.resident == ["ad3", "ad4"]
    reg.acquire("ad0")
    assert (reg.loads, reg.evictions, reg.resident) == (1, 4, ["ad4", "ad0"])


def test_pinned_adapters_are_not_evicted() -> None:
    class Fake:
        device = torch.device("cpu")

        def to(self, device):
            return self

    reg = AdapterRegistry(torch.device("cpu"), 1)
    reg["a"], reg["b"] = Fake(), Fake()
    reg.prepare(["a", "b"])  # one pass needs both: both stay for it
    assert sorted(reg.resident) == ["a", "b"]
    reg.shrink()
    assert len(reg.resident) == 1 and "a" in reg and "b" in reg


def test_cached_adapters_beyond_the_cap_leave_the_host_unless_in_use() -> None:
    class Fake:
        device = torch.device("cpu")

        def to(self, device):
            return self

    reg = AdapterRegistry(torch.device("cpu"), None)
    reg.max_cached = 2
    reg["served"] = Fake()  # a registered adapter is never dropped by the cache
    reg.cache("c1", Fake())
    reg.cache("c2", Fake())
    reg.acquire("c1")  # c1 used more recently than c2
    reg.cache("c3", Fake(), in_use=())
    assert reg.cached == ["c1", "c3"] and "c2" not in reg and "served" in reg
    reg.cache("c4", Fake(), in_use=["c1"])  # c1 is generating: c3 goes instead
    assert reg.cached == ["c1", "c4"] and "c3" not in reg
    reg["c4"] = Fake()  # registered for good: no longer cached
    assert reg.cached == ["c1"] and "c4" in reg


class HeldBuilds:
    """An adapter_source whose builds wait for `gate` (a long replay) and whose `fail` ids raise as a
    damaged log does; `built` counts builds per id."""

    def __init__(self, ads: dict[str, LoraAdapter], fail: tuple[str, ...] = ()) -> None:
        import threading

        self.ads, self.fail, self.gate, self.built = ads, fail, threading.Event(), {}

    def check(self, aid: str, field: str = "adapter_id") -> None:
        pass

    def build(self, aid: str, field: str = "adapter_id") -> LoraAdapter:
        assert self.gate.wait(60)
        self.built[aid] = self.built.get(aid, 0) + 1
        if aid in self.fail:
            raise OSError(f"/secret/path/{aid}: truncated")
        return self.ads[aid].clone()


def test_checkpoints_build_off_the_engine_thread_while_generation_goes_on(tmp_path) -> None:
    """A checkpoint id's first use rebuilds it on a worker thread: base requests finish while it builds,
    its requests then run with it (the same tokens as the adapter served directly), a request cancelled
    while waiting ends CANCELLED and never runs, and a failed build ends its requests with an error that
    names no server path. Every parked request leaves the queued count."""
    from zostream.engine.generation import FinishReason
    from zostream.engine.loop import EngineLoop

    eng = make_engine(make_tiny_model(tmp_path, "llama"))
    ads = {f"job:ckpt-step-{i}": ad for i, ad in enumerate(adapters(eng, 3).values())}
    want = {}
    for aid, ad in ads.items():  # reference: each adapter served under a plain id
        eng.put_adapter("ref", ad.clone())
        want[aid] = list(eng.generate([req("ref", PROMPTS[0], "ref")])["ref"].token_ids)
        eng.drop_adapter("ref")
    src = eng.adapter_source = HeldBuilds(ads, fail=("job:ckpt-step-2",))
    finals, tokens = {}, {}

    def on_event(ev) -> None:
        tokens.setdefault(ev.request_id, []).extend(ev.token_ids)
        if ev.finish_reason is not None:
            finals[ev.request_id] = ev

    def submit(rid: str, adapter: str | None) -> None:
        r = req(rid, PROMPTS[0], adapter)
        r.callback = on_event
        eng.submit(r)

    loop = EngineLoop(eng)
    submit("a", "job:ckpt-step-0")
    submit("a2", "job:ckpt-step-0")  # the same checkpoint: one build serves both
    submit("c", "job:ckpt-step-1")
    submit("f", "job:ckpt-step-2")
    submit("base", None)
    loop.run_until(lambda: "base" in finals)  # the base request ran while the builds were held
    assert set(finals) == {"base"}
    eng.abort("c")
    loop.run_until(lambda: "c" in finals)
    assert finals["c"].finish_reason == FinishReason.CANCELLED
    src.gate.set()
    loop.run_until(lambda: {"a", "a2", "f"} <= set(finals))
    assert tokens["a"] == tokens["a2"] == want["job:ckpt-step-0"] != tokens["base"]
    assert finals["f"].finish_reason == FinishReason.ERROR and "could not be rebuilt" in finals["f"].error
    assert "/secret" not in finals["f"].error
    assert src.built == {"job:ckpt-step-0": 1, "job:ckpt-step-1": 1, "job:ckpt-step-2": 1}
    loop.run_until(lambda: not eng.has_work())
    assert "c" not in eng.seqs and "job:ckpt-step-1" in eng.adapters  # built, cached, never used by "c"
    for i in range(eng.limits.max_waiting):  # the queue is empty again: all of max_waiting fits
        eng.submit(req(f"q{i}", PROMPTS[1], None))
    with pytest.raises(ResourceExhaustedError):
        eng.submit(req("one-too-many", PROMPTS[1], None))
    for i in range(eng.limits.max_waiting):
        eng.abort(f"q{i}")
    loop.run_until(lambda: not eng.has_work())


def req(rid: str, prompt: list[int], adapter: str | None) -> GenerateRequest:
    return GenerateRequest(
        rid, prompt, SamplingParams(), StopParams(max_new_tokens=6, ignore_eos=True), adapter
    )
