"""The OpenAI-compatible HTTP API on the tiny model: errors, auth, TLS, readiness, streaming edge cases,
files and fine-tuning jobs. Expected statuses and `param` names are written out by hand from OpenAI's
API; the stop cut is checked against the unstopped text cut by hand.
"""

from __future__ import annotations

import json
import signal
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import ThreadServer, server_config, thread_server

KEY = "tiny-key-0123456789abcdef"
PROMPT = "5 17 3 42"


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    cfg = server_config(model_dir, tmp_path_factory.mktemp("data"), api_key=KEY, http_port=0)
    with thread_server(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def url(server: ThreadServer) -> str:
    return f"http://127.0.0.1:{server.app.http_port}"


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def model(model_dir: Path) -> str:
    return model_dir.name


def post(url: str, path: str, body: Any, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers=headers, timeout=30)


def assert_error(
    r: httpx.Response, status: int, param: str | None, kind: str = "invalid_request_error"
) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["type"], err["param"]) == (kind, param), err


BAD_COMPLETIONS = [  # (change to a valid body, status, param)
    ({"temperature": "hot"}, 400, "temperature"),
    ({"temperature": 2.5}, 400, "temperature"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_tokens": 10**6}, 400, "max_tokens"),
    ({"max_tokens": 500, "prompt": " ".join(["7"] * 100)}, 400, "max_tokens"),  # 100 + 500 > 512
    ({"n": 0}, 400, "n"),
    ({"stop": [""]}, 400, "stop"),
    ({"seed": -1}, 400, "seed"),
    ({"prompt": None}, 400, "prompt"),
    ({"prompt": [1, 2, 1000]}, 400, "prompt"),  # a token id past the vocabulary
    ({"stream": "yes"}, 400, "stream"),
    ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ({"best_of": 3}, 400, "best_of"),
    ({"model": None}, 400, "model"),
    ({"model": "no-such-model"}, 404, "model"),
]


@pytest.mark.parametrize(("change", "status", "param"), BAD_COMPLETIONS)
def test_bad_completion_request_names_the_param(
    url: str, model: str, change: dict, status: int, param: str
) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, **change}
    assert_error(post(url, "/v1/completions", body), status, param)


def test_bad_chat_requests(url: str, model: str, client: openai.OpenAI) -> None:
    chat = {"model": model, "messages": [{"role": "user", "content": "1 2"}]}
    assert_error(post(url, "/v1/chat/completions", {**chat, "messages": []}), 400, "messages")
    bad_role = {**chat, "messages": [{"role": "user", "content": "1"}, {"role": "robot", "content": "2"}]}
    assert_error(post(url, "/v1/chat/completions", bad_role), 400, "messages[1].role")
    assert_error(post(url, "/v1/chat/completions", {**chat, "top_logprobs": 2}), 400, "top_logprobs")
    assert_error(post(url, "/v1/chat/completions", {**chat, "tools": [{"type": "function"}]}), 400, "tools")
    # the tiny tokenizer has no chat template: a precondition of the model, named on messages
    assert_error(post(url, "/v1/chat/completions", chat), 400, "messages")
    assert_error(post(url, "/v1/chat/completions", b"{not json"), 400, "body")
    deep = b'{"messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}"  # past the recursion limit
    assert_error(post(url, "/v1/chat/completions", deep), 400, "body")
    assert_error(post(url, "/v1/chat/completions", b'{"n": 1' + b"0" * 5000 + b"}"), 400, "body")
    assert_error(post(url, "/v1/chat/completions", b'{"model": "\xff"}'), 400, "body")  # not UTF-8
    with pytest.raises(openai.BadRequestError) as exc:  # the official client sees the same
        client.chat.completions.create(model=model, messages=chat["messages"], max_completion_tokens=0)
    assert exc.value.status_code == 400 and exc.value.body["param"] == "max_completion_tokens"
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="gpt-4o", prompt=PROMPT)
    assert nf.value.body["param"] == "model" and nf.value.body["code"] == "model_not_found"
    r = httpx.get(url + "/v1/nothing-here", headers={"Authorization": f"Bearer {KEY}"})
    assert_error(r, 404, None)


def test_missing_or_wrong_key_is_401_health_is_open(url: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong-key-wrong-key"}, {"Authorization": KEY}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert_error(r, 401, None, "authentication_error")
    assert_error(
        post(url, "/v1/completions", {"prompt": PROMPT}, key=None), 401, None, "authentication_error"
    )
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-key-wrong-key", max_retries=0).models.list()
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/ready").status_code == 200


def test_not_ready_while_draining(server: ThreadServer, url: str, model: str) -> None:
    server.app.draining = True
    try:
        r = httpx.get(url + "/ready")
        assert r.status_code == 503 and r.json()["reason"] == "draining"
        refused = post(url, "/v1/completions", {"model": model, "prompt": PROMPT})
        assert_error(refused, 503, None, "service_unavailable_error")
        assert refused.json()["error"]["code"] == "server_draining" and refused.headers["retry-after"] == "1"
    finally:
        server.app.draining = False
    assert httpx.get(url + "/ready").status_code == 200


def test_full_server_is_429_with_retry_after(server: ThreadServer, url: str, model: str) -> None:
    limit = server.app.max_inflight
    server.app.max_inflight = 0
    try:
        r = post(url, "/v1/completions", {"model": model, "prompt": PROMPT})
        assert_error(r, 429, None, "rate_limit_error")
        assert r.json()["error"]["code"] == "too_many_in_flight" and int(r.headers["retry-after"]) >= 1
    finally:
        server.app.max_inflight = limit
    m = httpx.get(f"{url}/v1/models/{model}", headers={"Authorization": f"Bearer {KEY}"})
    assert m.status_code == 200 and m.json()["id"] == model and m.json()["object"] == "model"
    assert_error(httpx.get(f"{url}/v1/models/nope", headers={"Authorization": f"Bearer {KEY}"}), 404, "model")


def test_completions_prompts_n_echo_and_stop(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt=[PROMPT, "8 9"], n=2, max_tokens=6, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text  # greedy
    assert r.usage.prompt_tokens == 4 + 2  # each prompt once, not once per choice
    full = r.choices[0].text
    words = full.split()
    assert len(words) >= 2, full
    stop = " " + words[1]
    want = full[: full.index(stop)]
    cut = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, stop=stop)
    assert cut.choices[0].text == want and cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, stop=stop,
                                         stream=True)  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == want
    echo = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, echo=True)
    assert echo.choices[0].text == PROMPT + full
    ids = client.completions.create(model=model, prompt=[5, 17, 3, 42], max_tokens=6, temperature=0)
    assert ids.choices[0].text == full  # the WordLevel tokenizer: text "i" is token i


def test_logprobs_after_a_stop_cut_cover_every_generated_token(client: openai.OpenAI, model: str) -> None:
    """As vLLM: the stop sequence is cut from the text, not from the logprobs, which cover every token
    generated (usage.completion_tokens), up to the one that completed the stop sequence."""
    full = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=1)
    words = full.choices[0].text.split()
    stop = " " + words[1]
    k = words.index(words[1]) + 1  # the WordLevel tokenizer: the k-th generated token completes the stop
    kw: dict[str, Any] = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stop": stop}
    cut = client.completions.create(**kw, logprobs=1)
    lp, want = cut.choices[0].logprobs, full.choices[0].logprobs
    assert cut.choices[0].text == full.choices[0].text[: full.choices[0].text.index(stop)]
    assert cut.usage.completion_tokens == k and lp.tokens == want.tokens[:k]
    assert lp.token_logprobs == want.token_logprobs[:k]
    streamed = [c.choices[0].logprobs for c in client.completions.create(**kw, logprobs=1, stream=True)]
    assert [t for x in streamed if x for t in x.tokens] == lp.tokens


def test_ignore_eos_runs_to_max_tokens(client: openai.OpenAI, url: str, model: str) -> None:
    """vLLM's ignore_eos extra: greedy decoding of PROMPT ends on EOS after a few tokens; with it, it
    runs to max_tokens."""
    kw: dict[str, Any] = {"model": model, "prompt": PROMPT, "max_tokens": 40, "temperature": 0}
    plain = client.completions.create(**kw)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens < 40
    full = client.completions.create(**kw, extra_body={"ignore_eos": True})
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 40
    assert_error(post(url, "/v1/completions", {**kw, "ignore_eos": "yes"}), 400, "ignore_eos")


def test_client_going_away_aborts_the_request(server: ThreadServer, url: str, model: str) -> None:
    labels = {"finish_reason": "cancelled", "api": "http"}
    before = server.app.metrics.registry.get_sample_value("zostream_requests_total", labels)
    # ignore_eos: the tiny model samples EOS within a few tokens, which would finish the request normally
    # before the server notices the client has gone (a race); without EOS it runs until cancelled.
    body = {"model": model, "prompt": PROMPT, "max_tokens": 500, "temperature": 1.0, "stream": True}
    body["ignore_eos"] = True
    with httpx.stream(
        "POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    deadline = time.monotonic() + 20
    while server.app.inflight or server.app.engine.seqs:
        assert time.monotonic() < deadline, "the request kept running after the client left"
        time.sleep(0.05)
    after = server.app.metrics.registry.get_sample_value("zostream_requests_total", labels)
    assert after == before + 1


def test_files_and_jobs(client: openai.OpenAI, url: str, model: str, tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i} {i + 1}", "completion": f" {i + 2}"}) + "\n"
                            for i in range(1, 9)))  # fmt: skip
    f = client.files.create(file=path.open("rb"), purpose="fine-tune")
    assert client.files.content(f.id).text == path.read_text()
    assert f.id in {x.id for x in client.files.list()}
    bad = post(url, "/v1/fine_tuning/jobs", {"model": model, "training_file": "file-nope"})
    assert_error(bad, 404, "training_file")
    bad = post(
        url, "/v1/fine_tuning/jobs", {"model": model, "training_file": f.id, "hyperparameters": {"x": 1}}
    )
    assert_error(bad, 400, "hyperparameters.x")
    bad = post(url, "/v1/fine_tuning/jobs", {"model": model, "training_file": f.id,
                                             "hyperparameters": {"lora_r": 0}})  # fmt: skip
    assert_error(bad, 400, "hyperparameters.lora_r")
    bad = post(url, "/v1/fine_tuning/jobs", {"model": model, "training_file": f.id,
                                             "hyperparameters": {"lora_init_scale": 0}})  # fmt: skip
    assert_error(bad, 400, "hyperparameters.lora_init_scale")
    assert_error(post(url, "/v1/fine_tuning/jobs", {"model": "other", "training_file": f.id}), 400, "model")
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("x.jsonl", b'{"prompt": "1"}\n'), purpose="fine-tune")
    assert exc.value.body["param"] == "file" and "line 1" in exc.value.body["message"]
    deep = b'{"messages": ' + b"[" * 20_000 + b"]" * 20_000 + b"}\n"  # past the recursion limit
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=("deep.jsonl", deep), purpose="fine-tune")
    assert exc.value.body["param"] == "file" and "line 1: JSON nested" in exc.value.body["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.files.create(file=path.open("rb"), purpose="assistants")
    assert exc.value.body["param"] == "purpose"

    # 8 records, 2 epochs, batch 4 -> 4 steps; learning_rate_multiplier 2 -> twice grzo's default lr
    hp = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 2.0, "eps": 0.01, "average_decay": 0.5}
    hp["lora_init_scale"] = 2.0
    job = client.fine_tuning.jobs.create(model=model, training_file=f.id, suffix="pairs", hyperparameters=hp)
    assert (
        job.hyperparameters.model_extra["steps"] == 4 and job.hyperparameters.learning_rate_multiplier == 2.0
    )
    assert job.hyperparameters.model_extra["average_decay"] == 0.5
    assert job.hyperparameters.model_extra["lora_init_scale"] == 2.0
    long = client.fine_tuning.jobs.create(model=model, training_file=f.id, hyperparameters={"steps": 100000})
    jobs = client.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in jobs.data] == [long.id] and jobs.has_more
    with pytest.raises(openai.BadRequestError):  # in use by a job that has not finished
        client.files.delete(f.id)
    cancelled = client.fine_tuning.jobs.cancel(long.id)
    assert cancelled.status in ("queued", "running", "cancelled")
    deadline = time.monotonic() + 120
    while {client.fine_tuning.jobs.retrieve(j).status for j in (job.id, long.id)} - {
        "succeeded",
        "cancelled",
    }:
        assert time.monotonic() < deadline, "the jobs did not end"
        time.sleep(0.2)
    assert client.fine_tuning.jobs.retrieve(long.id).status == "cancelled"
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.fine_tuned_model == job.id
    assert done.user_provided_suffix == "pairs"
    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    steps = [e.data["step"] for e in events if e.type == "metrics"]
    assert steps == [4, 3, 2, 1]  # newest first
    r = client.completions.create(model=done.fine_tuned_model, prompt=PROMPT, max_tokens=4, temperature=0)
    assert r.model == done.fine_tuned_model and r.choices[0].finish_reason in ("stop", "length")
    assert client.files.delete(f.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_tls_with_the_grpc_certificate(model_dir: Path, tmp_path: Path) -> None:
    from tests.server.test_server import self_signed

    cert, pkey = self_signed(tmp_path)
    cfg = server_config(model_dir, tmp_path / "data", api_key=KEY, tls_cert=str(cert), tls_key=str(pkey),
                        http_port=0)  # fmt: skip
    with thread_server(cfg) as srv:
        port = srv.app.http_port
        trust = httpx.Client(verify=ssl.create_default_context(cafile=str(cert)))
        c = openai.OpenAI(
            base_url=f"https://localhost:{port}/v1", api_key=KEY, max_retries=0, http_client=trust
        )
        r = c.completions.create(model=model_dir.name, prompt=PROMPT, max_tokens=3, temperature=0)
        assert r.choices[0].text
        with pytest.raises(httpx.HTTPError):  # plaintext HTTP to the TLS port
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)


def test_completion_logprobs_match_transformers(client: openai.OpenAI, model: str, model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=6, temperature=0.7, seed=2, logprobs=2
    )
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.convert_tokens_to_ids(lp.tokens)
    prompt = [5, 17, 3, 42]
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = torch.log_softmax(ref(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1], dim=-1)
    torch.testing.assert_close(
        torch.tensor(lp.token_logprobs), want.gather(1, torch.tensor(ids)[:, None])[:, 0], rtol=0, atol=1e-4
    )
    for top, row in zip(lp.top_logprobs, want, strict=True):
        v, i = row.topk(2)
        assert list(top) == tok.convert_ids_to_tokens(i.tolist())
        torch.testing.assert_close(torch.tensor(list(top.values())), v, rtol=0, atol=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])


def test_serve_http_port_flag_and_sigterm_drain(model_dir: Path, tmp_path: Path) -> None:
    """`zostream serve --http-port` in a subprocess: a stream in flight at SIGTERM runs to its end."""
    from tests.server.conftest import free_port, start_process, stop_process

    port = free_port()
    p = start_process(model_dir, tmp_path / "data", tmp_path, "--http-port", str(port))
    try:
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/ready").status_code == 200
        body = {"model": model_dir.name, "prompt": PROMPT, "max_tokens": 200, "temperature": 1.0, "seed": 1,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
            p.kill(signal.SIGTERM)
            rest = [x for x in lines if x]
        assert rest[-1] == "data: [DONE]" and len(rest) > 20, len(rest)  # a long stream, cut by nothing
        last = json.loads(rest[-2].removeprefix("data: "))
        assert last["choices"][0]["finish_reason"] in ("stop", "length")
        assert p.proc.wait(30) == 0
        assert "OpenAI-compatible HTTP API on 127.0.0.1:" in p.output()
    finally:
        stop_process(p)


def test_echo_with_logprobs_reports_the_prompt(client: openai.OpenAI, model: str, model_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    kw = dict(model=model, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1, echo=True)
    lp = client.completions.create(**kw).choices[0].logprobs
    assert (
        lp.tokens[:4] == ["5", "17", "3", "42"]
        and lp.token_logprobs[0] is None
        and lp.top_logprobs[0] is None
    )
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = [int(t) for t in lp.tokens if t.isdigit()]
    with torch.no_grad():
        want = torch.log_softmax(ref(torch.tensor([ids])).logits[0, :-1], dim=-1)  # [T-1, V]
    got = torch.tensor(lp.token_logprobs[1 : len(ids)])
    torch.testing.assert_close(got, want.gather(1, torch.tensor(ids[1:])[:, None])[:, 0], rtol=0, atol=1e-4)
    streamed = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True)]
    tokens = [t for x in streamed if x for t in x.tokens]
    assert tokens == lp.tokens


def test_serve_refuses_a_bad_http_port(model_dir: Path, tmp_path: Path, capsys) -> None:
    from zostream.clients import cli

    base = ["serve", "--model", str(model_dir), "--data-dir", str(tmp_path), "--metrics-port", "-1"]
    assert cli.main([*base, "--port", "50999", "--http-port", "50999"]) == 2
    assert "--http-port 50999: the gRPC server listens there" in capsys.readouterr().err
    assert cli.main([*base, "--http-port", "70000"]) == 2
    assert "--http-port 70000: use a port in 0..65535" in capsys.readouterr().err


def test_tokenizing_runs_off_the_event_loops(server: ThreadServer, url: str, model: str, monkeypatch) -> None:
    """A prompt being tokenized (a 1 MB one takes about a second) holds up no other request: a gRPC
    Tokenize and an HTTP completion wait inside the tokenizer while GetModelInfo and GET /v1/models answer,
    then both finish with the real tokens."""
    import concurrent.futures
    import threading

    from zostream.v1 import generation_pb2

    engine = server.app.engine
    real, gate, entered = engine.encode_prompt, threading.Event(), threading.Semaphore(0)

    def held(*a: Any, **k: Any) -> list[int]:
        entered.release()
        assert gate.wait(60)
        return real(*a, **k)

    monkeypatch.setattr(engine, "encode_prompt", held)
    stubs = server.stubs()
    meta = [("authorization", f"Bearer {KEY}")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        try:
            tok = stubs.gen.Tokenize.future(
                generation_pb2.TokenizeRequest(text=PROMPT), metadata=meta, timeout=60
            )
            assert entered.acquire(timeout=30), "Tokenize never reached the tokenizer"
            info = stubs.gen.GetModelInfo(generation_pb2.GetModelInfoRequest(), metadata=meta, timeout=10)
            assert info.model_id
            body = {"model": model, "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
            done = pool.submit(post, url, "/v1/completions", body)
            assert entered.acquire(timeout=30), "the completion never reached the tokenizer"
            r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
            assert r.status_code == 200 and not tok.done() and not done.done()
        finally:
            gate.set()
        assert list(tok.result().token_ids) == real(PROMPT)
        r = done.result()
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == len(real(PROMPT))
    stubs.channel.close()
