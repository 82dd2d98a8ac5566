"""Checkpoint model ids (`<job_id>:ckpt-step-<N>`) on a live server, over HTTP with the official `openai`
package and over gRPC.

The reference for a checkpoint's answers is independent of the replay that serves it: the PEFT files the
trainer itself saved at that step (checkpoint_every), loaded into transformers + peft, give the expected
log-probabilities. Expected statuses, params and list orders are written out by hand from OpenAI's API.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from tests.server.conftest import ThreadServer, server_config, thread_server
from zostream.v1 import adapters_pb2 as A
from zostream.v1 import finetuning_pb2 as F
from zostream.v1 import generation_pb2 as G

KEY = "tiny-key-0123456789abcdef"
AUTH = [("authorization", f"Bearer {KEY}")]
PROMPT = [5, 17, 3, 42]


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    cfg = server_config(model_dir, tmp_path_factory.mktemp("data"), api_key=KEY, http_port=0)
    with thread_server(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def client(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.app.http_port}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def job(server: ThreadServer, client: openai.OpenAI, model_dir: Path, tmp_path_factory) -> Any:
    """A 4-step LoRA job that checkpoints at step 2 (checkpoint_every: steps before the last)."""
    path = tmp_path_factory.mktemp("files") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i} {i + 1}", "completion": f" {i + 2}"}) + "\n"
                            for i in range(1, 9)))  # fmt: skip
    f = client.files.create(file=path.open("rb"), purpose="fine-tune")
    # A large learning rate (3x grzo's 1e-2): steps 2 and 4 answer measurably unlike each other and the base.
    hp = {"steps": 4, "batch_size": 4, "learning_rate_multiplier": 3.0, "eps": 0.01, "checkpoint_every": 2}
    j = client.fine_tuning.jobs.create(model=model_dir.name, training_file=f.id, hyperparameters=hp)
    deadline = time.monotonic() + 120
    while (j := client.fine_tuning.jobs.retrieve(j.id)).status != "succeeded":
        assert j.status in ("queued", "running"), j
        assert time.monotonic() < deadline, "the job did not end"
        time.sleep(0.2)
    return j


def logprobs(client: openai.OpenAI, model: str) -> tuple[list[str], list[float]]:
    r = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=5, temperature=0.8, seed=3, logprobs=1
    )
    lp = r.choices[0].logprobs
    return lp.tokens, lp.token_logprobs


def reference(model_dir: Path, adapter_dir: Path | None, tokens: list[str]) -> list[float]:
    """The tokens' log-probabilities under transformers (+ peft with the trainer's own saved factors)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir).convert_tokens_to_ids(tokens)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        ref = PeftModel.from_pretrained(ref, adapter_dir)
    with torch.no_grad():
        out = torch.log_softmax(ref.eval()(torch.tensor([PROMPT + ids])).logits[0, len(PROMPT) - 1 : -1], -1)
    return out.gather(1, torch.tensor(ids)[:, None])[:, 0].tolist()


def test_checkpoints_list_newest_first_and_each_answers_as_its_step(
    server: ThreadServer, client: openai.OpenAI, job: Any, model_dir: Path
) -> None:
    page = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert [c.step_number for c in page.data] == [4, 2] and not page.has_more
    c4, c2 = page.data
    assert c2.fine_tuned_model_checkpoint == f"{job.id}:ckpt-step-2"
    assert (c2.object, c2.fine_tuning_job_id, c2.metrics.step) == ("fine_tuning.job.checkpoint", job.id, 2)
    assert c2.metrics.train_loss is not None and c2.created_at >= job.created_at
    first = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)
    assert [c.id for c in first.data] == [c4.id] and first.has_more
    rest = client.fine_tuning.jobs.checkpoints.list(job.id, after=c4.id)
    assert [c.id for c in rest.data] == [c2.id] and not rest.has_more

    import torch

    ckpt = server.app.jobs.job_dir(job.id) / "checkpoints" / "step-000002"  # the trainer's own files
    tokens, got = logprobs(client, c2.fine_tuned_model_checkpoint)
    torch.testing.assert_close(
        torch.tensor(got), torch.tensor(reference(model_dir, ckpt, tokens)), rtol=0, atol=1e-4
    )
    base = torch.tensor(reference(model_dir, None, tokens))
    assert (torch.tensor(got) - base).abs().max() > 1e-3, "the checkpoint answers as the base model"
    # The last step answers as the job's result (its fine_tuned_model), and unlike step 2.
    assert c4.fine_tuned_model_checkpoint == f"{job.id}:ckpt-step-4"
    t4, got4 = logprobs(client, c4.fine_tuned_model_checkpoint)
    assert (t4, got4) == logprobs(client, job.fine_tuned_model)
    assert (t4, got4) != (tokens, got)
    # Rebuilt once and cached, not listed among the models (chat: tests/server/test_openai.py).
    assert c2.fine_tuned_model_checkpoint in server.app.engine.adapters.cached
    assert c2.fine_tuned_model_checkpoint not in {m.id for m in client.models.list()}
    assert client.models.retrieve(c2.fine_tuned_model_checkpoint).parent == job.id


def test_bad_checkpoint_ids_are_404_naming_model(client: openai.OpenAI, job: Any) -> None:
    for bad in (f"{job.id}:ckpt-step-5", f"{job.id}:ckpt-step-0", "nojob:ckpt-step-1", f"{job.id}:step-2",
                f"{job.id}:ckpt-step-02"):  # fmt: skip
        with pytest.raises(openai.NotFoundError) as exc:
            client.completions.create(model=bad, prompt="1", max_tokens=1)
        assert exc.value.body["param"] == "model", bad
    with pytest.raises(openai.NotFoundError) as exc:
        client.fine_tuning.jobs.checkpoints.list("nojob")
    assert exc.value.body["param"] == "job_id"
    r = httpx.get(
        f"{client.base_url}fine_tuning/jobs/{job.id}/checkpoints?limit=0",
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "limit"


def test_grpc_generate_and_list_checkpoints(server: ThreadServer, client: openai.OpenAI, job: Any) -> None:
    s = server.stubs()
    cps = s.ft.ListCheckpoints(F.ListCheckpointsRequest(job_id=job.id), metadata=AUTH).checkpoints
    assert [(c.step, c.adapter_id) for c in cps] == [(2, f"{job.id}:ckpt-step-2")]
    req = G.GenerateRequest(token_ids=G.TokenIds(ids=PROMPT), adapter_id=f"{job.id}:ckpt-step-2")
    req.sampling.temperature = 0
    req.stopping.max_new_tokens = 5
    got = list(s.gen.Generate(req, metadata=AUTH))[-1]
    http = client.completions.create(
        model=f"{job.id}:ckpt-step-2", prompt=PROMPT, max_tokens=5, temperature=0
    )
    assert got.text == http.choices[0].text
    with pytest.raises(grpc.RpcError) as exc:
        list(
            s.gen.Generate(
                G.GenerateRequest(token_ids=G.TokenIds(ids=PROMPT), adapter_id=f"{job.id}:ckpt-step-9"),
                metadata=AUTH,
            )
        )
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND and "adapter_id" in exc.value.details()
    ad = s.ad.GetAdapter(A.GetAdapterRequest(adapter_id=f"{job.id}:ckpt-step-3"), metadata=AUTH)
    assert (ad.id, ad.steps, ad.source_job_id, ad.status) == (
        f"{job.id}:ckpt-step-3",
        3,
        job.id,
        A.ADAPTER_STATUS_READY,
    )
    assert ad.lora.r == s.ad.GetAdapter(A.GetAdapterRequest(adapter_id=job.id), metadata=AUTH).lora.r
    listed = s.ad.ListAdapters(A.ListAdaptersRequest(), metadata=AUTH).adapters
    assert [a.id for a in listed if a.source_job_id == job.id] == [job.id]
    with pytest.raises(grpc.RpcError) as exc:
        s.ad.GetAdapter(A.GetAdapterRequest(adapter_id=f"{job.id}:ckpt-step-99"), metadata=AUTH)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as exc:  # nothing stored under a checkpoint id
        s.ad.DeleteAdapter(A.DeleteAdapterRequest(adapter_id=f"{job.id}:ckpt-step-2"), metadata=AUTH)
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_cli_lists_checkpoints(
    server: ThreadServer, job: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`zostream jobs checkpoints`: the gRPC list as JSON, and a table naming the servable adapter id."""
    from zostream.clients import cli

    key = tmp_path / "key"
    key.write_text(KEY + "\n")
    argv = ["jobs", "checkpoints", job.id, "--server", f"127.0.0.1:{server.port}", "--api-key-file", str(key)]
    assert cli.main([*argv, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(c["step"], c["adapter_id"], c["name"]) for c in listed] == [
        (2, f"{job.id}:ckpt-step-2", "step-000002")
    ]
    assert cli.main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["STEP", "NAME"] and table[1].split()[:2] == ["2", "step-000002"]
    assert table[1].split()[-1] == f"{job.id}:ckpt-step-2"
    assert cli.main(["jobs", "checkpoints", "no-such-job", *argv[3:]]) == 1  # NOT_FOUND: exit 1, no trace


def test_a_full_parameter_job_has_no_servable_checkpoints(
    server: ThreadServer, client: openai.OpenAI
) -> None:
    from zostream.clients.client import ZostreamClient

    with ZostreamClient(f"127.0.0.1:{server.port}", api_key=KEY) as c:
        c.upload_dataset("full-pairs", b"".join(b'{"prompt": "%d", "completion": " %d"}\n' % (i, i + 1)
                                                for i in range(1, 9)))  # fmt: skip
        job = c.create_job("full", "full-pairs", steps=2, batch_size=2, seed=1, checkpoint_every=1)
        deadline = time.monotonic() + 120
        while (rec := c.get_job(job["id"]))["status"] != "JOB_STATUS_SUCCEEDED":
            assert "FAILED" not in rec["status"] and time.monotonic() < deadline, rec
            time.sleep(0.1)
    assert client.fine_tuning.jobs.checkpoints.list(job["id"]).data == []
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model=f"{job['id']}:ckpt-step-1", prompt="1", max_tokens=1)
    assert exc.value.body["param"] == "model" and "DownloadWeights" in exc.value.body["message"]
