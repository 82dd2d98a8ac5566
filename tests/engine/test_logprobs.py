"""Logprobs (chosen token, top-k, prompt) equal transformers' log_softmax of its own forward pass.

The reference runs the transformers model on prompt + generated tokens and takes log_softmax of its
logits at each position; the engine's values come from its streamed, batched, KV-cached passes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.engine.test_generation import PROMPTS, make_engine
from tests.tiny import make_tiny_model
from zostream.engine.generation import GenerateRequest, StopParams
from zostream.engine.sampling import SamplingParams

TOL = 1e-4


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = make_tiny_model(tmp_path_factory.mktemp("lp"), "llama")
    return d, AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


@pytest.mark.parametrize("temperature", [0.0, 1.3])
def test_logprobs_match_transformers(model, temperature: float) -> None:
    d, ref = model
    eng = make_engine(d)
    reqs = [
        GenerateRequest(
            str(i),
            p,
            SamplingParams(temperature=temperature, top_k=20 if temperature else 0, seed=7 + i),
            StopParams(max_new_tokens=6, ignore_eos=True),
            logprobs=5,
            prompt_logprobs=True,
        )
        for i, p in enumerate(PROMPTS)
    ]
    out = eng.generate(reqs)
    for i, p in enumerate(PROMPTS):
        ev = out[str(i)]
        seq = p + list(ev.token_ids)
        with torch.no_grad():
            want = torch.log_softmax(ref(torch.tensor([seq])).logits[0].float(), dim=-1)  # [T,V]
        assert [x.token_id for x in ev.logprobs] == list(ev.token_ids)
        for k, x in enumerate(ev.logprobs):
            row = want[len(p) - 1 + k]
            assert abs(x.logprob - row[x.token_id].item()) < TOL
            ids, vals = zip(*x.top, strict=True)
            assert list(vals) == sorted(vals, reverse=True) and len(ids) == 5
            assert torch.allclose(torch.tensor(vals), row.topk(5).values, atol=TOL)
            assert all(abs(v - row[t].item()) < TOL for t, v in x.top)
        # prompt logprobs: tokens 1.. of the prompt, each under the position before it
        assert [x.token_id for x in ev.prompt_logprobs] == p[1:]
        for j, x in enumerate(ev.prompt_logprobs):
            assert abs(x.logprob - want[j, p[j + 1]].item()) < TOL


def test_no_logprobs_unless_asked(model) -> None:
    d, _ = model
    eng = make_engine(d)
    req = GenerateRequest("a", PROMPTS[0], SamplingParams(), StopParams(max_new_tokens=3, ignore_eos=True))
    ev = eng.generate([req])["a"]
    assert ev.logprobs == () and ev.prompt_logprobs == ()
    only = GenerateRequest(
        "b",
        PROMPTS[0],
        SamplingParams(),
        StopParams(max_new_tokens=3, ignore_eos=True),
        logprobs=0,
    )
    ev = eng.generate([only])["b"]
    assert len(ev.logprobs) == 3 and all(x.top == () for x in ev.logprobs) and ev.prompt_logprobs == ()
