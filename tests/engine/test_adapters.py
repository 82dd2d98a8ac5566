"""The adapter registry: with fewer device slots than adapters in use every request is still served
with its own adapter, evictions are counted, and residency stays within the limit between passes.

The reference is the same engine without a limit (the LoRA math itself is checked against peft in
test_peft.py); what this checks is that eviction and reloading never change a request's tokens."""

from __future__ import annotations

import torch

from tests.engine.test_generation import PROMPTS, make_engine
from tests.tiny import make_tiny_model
from zostream.engine.adapters import AdapterRegistry
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
