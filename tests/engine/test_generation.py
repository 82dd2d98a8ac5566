"""Greedy generation vs transformers; batched ≡ one-at-a-time; streamed ≡ resident."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.tiny import make_tiny_model
from zostream.engine.config import EngineConfig, LimitsConfig, StreamConfig
from zostream.engine.engine import Engine
from zostream.engine.generation import FinishReason, GenerateRequest, StopParams
from zostream.engine.sampling import SamplingParams


class FakeTok:
    """Enough of a tokenizer for token-id level tests on tiny random models."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids)

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(t) for t in text.split()]}


def make_engine(d, device: str = "cpu", **stream) -> Engine:
    cfg = EngineConfig(
        str(d),
        device=device,
        compute_dtype="float32",
        stream=StreamConfig(**stream),
        limits=LimitsConfig(max_batch=4, max_seq_len=64),
    )
    return Engine(cfg, tokenizer=FakeTok())


def greedy(rid: str, prompt: list[int], n: int = 8) -> GenerateRequest:
    return GenerateRequest(rid, prompt, SamplingParams(), StopParams(max_new_tokens=n, ignore_eos=True))


PROMPTS = [[5, 17, 3, 99, 42], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [60, 61]]


def hf_greedy(ref, prompt: list[int], n: int = 8) -> list[int]:
    """transformers' greedy continuation of `prompt`: exactly n tokens (the independent reference)."""
    out = ref.generate(
        torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n, pad_token_id=0
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    ("name", "device", "budget"),
    [
        ("llama", "cpu", None),
        ("opt", "cpu", None),
        ("qwen3", "cpu", None),
        ("llama", "emu", 0),
        ("qwen3", "emu", 0),
    ],
)
def test_greedy_matches_transformers_generate(tmp_path, name, device, budget):
    """emu: every block streamed through the emulated device's slots (real copies, events)."""
    d = make_tiny_model(tmp_path, name)
    ref = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    eng = make_engine(d, device, gpu_memory_bytes=budget)
    out = eng.generate([greedy(str(i), p) for i, p in enumerate(PROMPTS)])
    for i, p in enumerate(PROMPTS):
        assert list(out[str(i)].token_ids) == hf_greedy(ref, p), (i, p)
        assert out[str(i)].finish_reason is FinishReason.MAX_TOKENS


def test_batched_equals_one_at_a_time(tmp_path):
    d = make_tiny_model(tmp_path, "llama")
    eng = make_engine(d)
    batched = eng.generate([greedy(str(i), p, 12) for i, p in enumerate(PROMPTS)])
    for i, p in enumerate(PROMPTS):
        alone = make_engine(d).generate([greedy("x", p, 12)])["x"]
        assert alone.token_ids == batched[str(i)].token_ids


@pytest.mark.parametrize("budget", [0, 1, 20_000, None])
def test_streamed_equals_resident_bitwise(tmp_path, budget):
    d = make_tiny_model(tmp_path, "llama")
    ref = make_engine(d)
    eng = make_engine(d, gpu_memory_bytes=budget)
    reqs = lambda: [
        GenerateRequest(
            str(i),
            p,
            SamplingParams(temperature=0.9, top_p=0.9, seed=i),
            StopParams(max_new_tokens=6, ignore_eos=True),
        )
        for i, p in enumerate(PROMPTS)
    ]
    logits = {}
    for e in (ref, eng):
        e.generate(reqs())
        # last pass's logits are compared bitwise through a fresh prefill
        wl_logits = []
        orig = e._commit

        def grab(plan, workloads, *rest, orig=orig, wl_logits=wl_logits):
            wl_logits.extend(wl.logits.clone() for _, wl in workloads)
            return orig(plan, workloads, *rest)

        e._commit = grab
        e.generate([greedy("p", PROMPTS[2], 3)])
        logits[id(e)] = torch.cat(wl_logits)
    assert torch.equal(logits[id(ref)], logits[id(eng)])
    if budget == 0:
        assert eng.streamer.plan.resident == ()
    a = ref.generate(reqs())
    b = eng.generate(reqs())
    assert {k: v.token_ids for k, v in a.items()} == {k: v.token_ids for k, v in b.items()}


def test_seeded_sampling_reproducible_and_stop_token(tmp_path):
    d = make_tiny_model(tmp_path, "llama")
    eng = make_engine(d)
    r = lambda rid, seed: GenerateRequest(
        rid,
        PROMPTS[0],
        SamplingParams(temperature=1.0, seed=seed),
        StopParams(max_new_tokens=10, ignore_eos=True),
    )
    a, b, c = (eng.generate([r("a", 1)])["a"], eng.generate([r("b", 1)])["b"], eng.generate([r("c", 2)])["c"])
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    first = a.token_ids[3]
    stop = GenerateRequest(
        "s",
        PROMPTS[0],
        SamplingParams(temperature=1.0, seed=1),
        StopParams(max_new_tokens=10, stop_token_ids=(first,), ignore_eos=True),
    )
    out = eng.generate([stop])["s"]
    assert out.finish_reason is FinishReason.EOS_TOKEN  # stop_token_ids end like EOS (proto)
    assert out.token_ids == a.token_ids[: a.token_ids.index(first) + 1]
