"""Generate over gRPC: logprobs equal transformers' log_softmax (fp32), streamed or not, greedy or sampled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.server.conftest import ThreadServer
from zostream.clients.client import ZostreamClient

TOL = 1e-4


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize(("temperature", "stream"), [(0.0, True), (0.9, False)])
def test_logprobs_over_grpc_match_transformers(
    server: ThreadServer, reference, temperature: float, stream: bool
) -> None:
    with ZostreamClient(f"127.0.0.1:{server.port}") as c:
        params = dict(
            temperature=temperature,
            seed=3,
            max_new_tokens=5,
            ignore_eos=True,
            logprobs=True,
            top_logprobs=3,
            prompt_logprobs=True,
        )
        if stream:
            chunks = list(c.generate_stream("4 8 15 16", **params))
            ids = [t for ch in chunks for t in ch.token_ids]
            lps = [x for ch in chunks for x in ch.logprobs]
            plps = next(ch.prompt_logprobs for ch in chunks if ch.prompt_logprobs)
        else:
            r = c.generate("4 8 15 16", **params)
            ids, lps, plps = list(r.token_ids), list(r.logprobs), r.prompt_logprobs
        prompt = c.tokenize("4 8 15 16")
    with torch.no_grad():
        want = torch.log_softmax(reference(torch.tensor([prompt + ids])).logits[0].float(), dim=-1)
    assert [x.token_id for x in lps] == ids and len(ids) == 5
    for k, x in enumerate(lps):
        row = want[len(prompt) - 1 + k]
        assert abs(x.logprob - row[x.token_id].item()) < TOL
        assert all(abs(v - row[t].item()) < TOL for t, v in x.top)  # each alternative's own logprob
        assert torch.allclose(torch.tensor([v for _, v in x.top]), row.topk(3).values, atol=TOL)  # the best 3
    assert [x.token_id for x in plps] == prompt[1:]
    for j, x in enumerate(plps):
        assert abs(x.logprob - want[j, prompt[j + 1]].item()) < TOL


def test_too_many_top_logprobs_names_the_field(server: ThreadServer) -> None:
    from zostream.clients.errors import InvalidArgumentError

    with ZostreamClient(f"127.0.0.1:{server.port}") as c, pytest.raises(InvalidArgumentError) as exc:
        c.generate("4", max_new_tokens=1, top_logprobs=21)
    assert exc.value.field == "logprobs.top_logprobs"


def test_n_completions_equal_single_requests_with_consecutive_seeds(server: ThreadServer) -> None:
    params = dict(temperature=1.0, max_new_tokens=6, ignore_eos=True)
    with ZostreamClient(f"127.0.0.1:{server.port}") as c:
        many = c.completions("4 8 15", n=3, seed=5, **params)
        singles = [c.generate("4 8 15", seed=5 + i, **params) for i in range(3)]
        unary = c.generate("4 8 15", seed=5, n=1, **params)
    assert [m.token_ids for m in many] == [s.token_ids for s in singles]
    assert [m.seed for m in many] == [5, 6, 7] and unary.token_ids == singles[0].token_ids
    assert len({m.token_ids for m in many}) > 1  # sampled: the completions differ
    assert all(m.finish_reason == "max_tokens" and m.completion_tokens == 6 for m in many)


def test_n_unary_sends_one_final_message_per_completion(stubs) -> None:
    from zostream.v1 import generation_pb2 as G

    req = G.GenerateRequest(
        text="4 8",
        n=2,
        sampling=G.SamplingParams(temperature=1.0, seed=9),
        stopping=G.StoppingCriteria(max_new_tokens=3, ignore_eos=True),
    )
    msgs = list(stubs.gen.Generate(req, timeout=30))
    assert sorted(m.index for m in msgs) == [0, 1]
    assert all(m.finish_reason == G.FINISH_REASON_MAX_TOKENS and len(m.token_ids) == 3 for m in msgs)
    assert len({m.request_id for m in msgs}) == 1
    with pytest.raises(Exception) as exc:
        list(stubs.gen.Generate(G.GenerateRequest(text="4", n=17), timeout=30))
    assert "n" in exc.value.details()
