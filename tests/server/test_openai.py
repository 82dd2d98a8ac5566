"""The OpenAI-compatible HTTP API on the demo model (SmolLM2-135M-Instruct), driven by the official
`openai` package and by langchain-openai, against a live server on a loopback port.

References are independent of the server: transformers' greedy generate for the chat text, the
tokenizer's own chat template for the prompt token count, the non-streamed answer for the streamed
one, a stop string cut by hand, a Prometheus sample per request.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch

from tests.server.conftest import ThreadServer, thread_server
from zostream.engine.config import EngineConfig, LimitsConfig
from zostream.server.app import ServerConfig

KEY = "test-key-0123456789abcdef"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    eng = EngineConfig(
        str(demo_model),
        device="cpu",
        compute_dtype="float32",
        limits=LimitsConfig(max_batch=8, max_seq_len=512, max_new_tokens=256),
    )
    cfg = ServerConfig(eng, str(tmp_path_factory.mktemp("data")), port=0, metrics_port=None, api_key=KEY,
                       http_port=0)  # fmt: skip
    with thread_server(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.app.http_port}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def base(server: ThreadServer) -> str:
    return Path(server.cfg.engine.model_dir).name


def http_requests(server: ThreadServer, reason: str) -> float:
    labels = {"finish_reason": reason, "api": "http"}
    return server.app.metrics.registry.get_sample_value("zostream_requests_total", labels) or 0


@pytest.fixture(scope="module")
def hf(demo_model: Path):
    """transformers' tokenizer and fp32 model: the independent reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_model)
    return tok, AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32).eval()


def prompt_ids(tok) -> list[int]:
    return list(tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_dict=True)["input_ids"])


def test_chat_answers_paris_like_transformers(client: openai.OpenAI, base: str, hf) -> None:
    tok, ref = hf
    r = client.chat.completions.create(model=base, messages=QUESTION, temperature=0, max_tokens=24)
    text = r.choices[0].message.content
    assert "Paris" in text
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    ids = torch.tensor([prompt_ids(tok)])
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
    assert text == tok.decode(out, skip_special_tokens=True)
    assert r.usage.prompt_tokens == ids.shape[1]
    assert r.usage.completion_tokens == len(out)
    assert r.usage.total_tokens == ids.shape[1] + len(out)
    assert r.choices[0].finish_reason == ("stop" if out[-1] == tok.eos_token_id else "length")


@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 0.8, "seed": 3}])
def test_logprobs_match_transformers(client: openai.OpenAI, base: str, hf, sampling: dict) -> None:
    tok, ref = hf
    r = client.chat.completions.create(
        model=base, messages=QUESTION, max_tokens=10, logprobs=True, top_logprobs=3, **sampling
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    ids = tok(r.choices[0].message.content, add_special_tokens=False)["input_ids"]
    ids += [tok.eos_token_id] * (len(content) - len(ids))  # an EOS at the end has no text
    assert [c.token for c in content] == [tok.decode([i]) for i in ids]  # the tokens line up
    prompt = prompt_ids(tok)
    with torch.no_grad():
        logits = ref(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
    want = torch.log_softmax(logits, dim=-1)  # [T, V]
    got = torch.tensor([c.logprob for c in content])
    torch.testing.assert_close(got, want.gather(1, torch.tensor(ids)[:, None])[:, 0], rtol=0, atol=1e-4)
    top_v, top_i = want.topk(3, dim=-1)
    for c, v, i in zip(content, top_v, top_i, strict=True):
        assert [t.token for t in c.top_logprobs] == [tok.decode([j]) for j in i.tolist()]
        torch.testing.assert_close(torch.tensor([t.logprob for t in c.top_logprobs]), v, rtol=0, atol=1e-4)
    streamed = client.chat.completions.create(
        model=base, messages=QUESTION, max_tokens=10, logprobs=True, top_logprobs=3, stream=True, **sampling
    )
    chunks = [
        x.logprob
        for ch in streamed
        for x in (ch.choices[0].logprobs.content if ch.choices[0].logprobs else [])
    ]
    assert chunks == [c.logprob for c in content]


def test_stream_concatenates_to_the_non_streamed_text(client: openai.OpenAI, base: str) -> None:
    kw = dict(model=base, messages=QUESTION, temperature=0.9, seed=11, max_completion_tokens=32)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()


def test_stop_string_is_cut_streamed_or_not(client: openai.OpenAI, base: str) -> None:
    kw = dict(model=base, messages=QUESTION, temperature=0, max_tokens=24)
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = full.split()[2]  # a word inside the answer
    want = full[: full.index(stop)]
    r = client.chat.completions.create(**kw, stop=[stop])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    chunks = client.chat.completions.create(**kw, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want


def test_same_seed_same_text(client: openai.OpenAI, base: str) -> None:
    kw = dict(model=base, messages=QUESTION, temperature=1.0, top_p=0.95, max_tokens=24)
    a = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    b = client.chat.completions.create(**kw, seed=1234).choices[0].message.content
    assert a == b and a


def test_n_choices_and_completions(client: openai.OpenAI, base: str) -> None:
    r = client.chat.completions.create(
        model=base, messages=QUESTION, n=3, temperature=1.0, seed=5, max_tokens=8
    )
    assert [c.index for c in r.choices] == [0, 1, 2]
    one = client.chat.completions.create(model=base, messages=QUESTION, temperature=1.0, seed=5, max_tokens=8)
    assert r.choices[0].message.content == one.choices[0].message.content  # choice 0 uses the seed itself
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    c = client.completions.create(model=base, prompt="The capital of France is", max_tokens=4, temperature=0)
    assert c.object == "text_completion" and "Paris" in c.choices[0].text


def test_sixteen_concurrent_streams_complete(server: ThreadServer, client: openai.OpenAI, base: str) -> None:
    before = sum(http_requests(server, r) for r in ("max_tokens", "eos_token", "stop_sequence"))
    prompts = [f"Count from {i} to {i + 5}:" for i in range(16)]

    def stream(p: str) -> tuple[str, str | None]:
        s = client.completions.create(model=base, prompt=p, max_tokens=8, temperature=0, stream=True)
        parts = list(s)
        return "".join(c.choices[0].text for c in parts), parts[-1].choices[0].finish_reason

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(stream, prompts))
    assert all(text and finish in ("stop", "length") for text, finish in results)
    for p, (text, _) in zip(prompts[:3], results[:3], strict=True):  # batched == alone
        alone = client.completions.create(model=base, prompt=p, max_tokens=8, temperature=0)
        assert alone.choices[0].text == text
    after = sum(http_requests(server, r) for r in ("max_tokens", "eos_token", "stop_sequence"))
    assert after - before == 16 + 3
    assert not server.app.inflight


def test_langchain_openai_gets_an_answer(server: ThreadServer, base: str) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=base, base_url=f"http://127.0.0.1:{server.app.http_port}/v1", api_key=KEY,
                     temperature=0, max_tokens=24, max_retries=0)  # fmt: skip
    assert "Paris" in llm.invoke("What is the capital of France?").content


def test_upload_fine_tune_and_chat_with_the_result(client: openai.OpenAI, base: str, tmp_path: Path) -> None:
    import json

    lines = [
        {"messages": [{"role": "system", "content": "You answer with one word."},
                      {"role": "user", "content": f"What is {a} plus {b}?"},
                      {"role": "assistant", "content": str(a + b), "weight": 1}]}
        for a, b in [(1, 2), (3, 4), (2, 2)]
    ] + [{"messages": [{"role": "user", "content": "What is 5 plus 1?"},
                       {"role": "assistant", "content": "7", "weight": 0},  # context only, not trained on
                       {"role": "user", "content": "Again?"},
                       {"role": "assistant", "content": "6"}]}]  # fmt: skip
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    f = client.files.create(file=path.open("rb"), purpose="fine-tune")
    assert f.object == "file" and f.filename == "train.jsonl" and f.bytes > 0
    assert client.files.retrieve(f.id).id == f.id
    job = client.fine_tuning.jobs.create(model=base, training_file=f.id, seed=3,
                                         hyperparameters={"n_epochs": 1, "batch_size": 2})  # fmt: skip
    assert job.status in ("queued", "running") and job.fine_tuned_model is None
    assert job.hyperparameters.batch_size == 2
    deadline = time.monotonic() + 300
    while job.status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, "the job did not finish in 300 s"
        time.sleep(0.5)
        job = client.fine_tuning.jobs.retrieve(job.id)
    assert job.status == "succeeded", job.error
    assert job.trained_tokens > 0 and job.fine_tuned_model
    assert job.fine_tuned_model in {m.id for m in client.models.list()}
    assert job.id in {j.id for j in client.fine_tuning.jobs.list()}
    events = client.fine_tuning.jobs.list_events(job.id).data
    assert events[0].message and any(e.type == "metrics" for e in events)
    # 4 records, 1 epoch, batch 2 -> 2 ZO steps
    assert sum(1 for e in events if e.type == "metrics") == 2
    r = client.chat.completions.create(
        model=job.fine_tuned_model, messages=QUESTION, temperature=0, max_tokens=8
    )
    assert r.model == job.fine_tuned_model and r.choices[0].message.content
    # Its checkpoints: the result's step (no checkpoint_every); each answers as a chat model, and any step.
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [(c.step_number, c.fine_tuned_model_checkpoint) for c in ckpts] == [(2, f"{job.id}:ckpt-step-2")]
    last = client.chat.completions.create(
        model=ckpts[0].fine_tuned_model_checkpoint, messages=QUESTION, temperature=0, max_tokens=8
    )
    assert last.choices[0].message.content == r.choices[0].message.content  # the same weights
    first = client.chat.completions.create(
        model=f"{job.id}:ckpt-step-1", messages=QUESTION, temperature=0, max_tokens=8
    )
    assert first.model == f"{job.id}:ckpt-step-1" and first.choices[0].message.content
