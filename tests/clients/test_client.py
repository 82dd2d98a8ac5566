"""ZostreamClient and the remote CLI commands against a real gRPC server with fake servicers.

The fakes return canned responses written out here and record what they received (requests and
metadata), so every expectation is independent of the client code under test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from zostream.clients import cli, remote
from zostream.clients.client import GenerateChunk, GenerateResult, ZostreamClient, ZostreamError
from zostream.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    common_pb2,
    finetuning_pb2,
    finetuning_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
)

# The canned completion: three streamed pieces, then the final message.
PIECES = [("Hello", [15496]), (" world", [995]), ("!", [0])]
FINAL_SEED = 4242
PAGE = 2  # the fakes' largest page, so that every list spans several pages
JOB_IDS = [f"job-{i}" for i in range(5)]
LOG_BYTES = bytes(range(256)) * 10  # a fake 2560-byte update log


class State:
    """What the fakes received, and how they should misbehave."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.metadata: list[dict[str, str]] = []
        self.unavailable = 0  # fail the next N calls of any RPC with UNAVAILABLE
        self.drop_after_event = 3  # StreamJobEvents: first call ends with UNAVAILABLE after this id
        self.stream_calls = 0
        self.cancelled = threading.Event()

    def record(self, name: str, request: Any, context: grpc.ServicerContext) -> None:
        self.requests.append((name, request))
        self.metadata.append(dict(context.invocation_metadata()))
        if self.unavailable > 0:
            self.unavailable -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "server is restarting")

    def got(self, name: str) -> list[Any]:
        return [r for n, r in self.requests if n == name]


def _job(job_id: str, status: int = finetuning_pb2.JOB_STATUS_RUNNING) -> finetuning_pb2.Job:
    return finetuning_pb2.Job(
        id=job_id,
        status=status,
        method=common_pb2.TUNING_METHOD_LORA,
        progress=finetuning_pb2.JobProgress(steps_done=3, steps_total=10),
        metrics=finetuning_pb2.JobMetrics(step=3, train_loss=1.25),
        adapter_id=f"ad-{job_id}",
    )


def _events(job_id: str) -> list[finetuning_pb2.JobEvent]:
    """job-ok: started, 3 steps, succeeded. job-bad: started, 3 steps, failed."""
    final = "succeeded" if job_id == "job-ok" else "failed"
    types = ["started", "step", "step", "step", final]
    return [
        finetuning_pb2.JobEvent(
            id=i + 1,
            job_id=job_id,
            type=t,
            step=min(i, 3),
            metrics={"train_loss": 2.0 - 0.25 * i, "projected_grad": -0.5} if t == "step" else {},
        )
        for i, t in enumerate(types)
    ]


class FakeGeneration(generation_pb2_grpc.TextGenerationServicer):
    def __init__(self, state: State) -> None:
        self.s = state

    def Generate(self, request, context):  # noqa: N802 (gRPC method names)
        self.s.record("Generate", request, context)
        if request.text == "bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "sampling.temperature: must be in [0, 100]")
        if request.text == "long":  # one piece, then wait for the client to cancel
            context.add_callback(self.s.cancelled.set)
            yield generation_pb2.GenerateResponse(request_id="r-long", text="x", token_ids=[1])
            self.s.cancelled.wait(10)
            return
        seed = request.sampling.seed if request.sampling.HasField("seed") else FINAL_SEED
        final = generation_pb2.GenerateResponse(
            request_id=request.request_id or "srv-1",
            finish_reason=generation_pb2.FINISH_REASON_MAX_TOKENS,
            usage=common_pb2.Usage(prompt_tokens=4, completion_tokens=3),
            seed=seed,
        )
        if request.stream:
            for text, ids in PIECES:
                yield generation_pb2.GenerateResponse(request_id=final.request_id, text=text, token_ids=ids)
            yield final
        else:
            final.text = "".join(t for t, _ in PIECES)
            final.token_ids.extend(i for _, ids in PIECES for i in ids)
            yield final

    def Tokenize(self, request, context):  # noqa: N802
        self.s.record("Tokenize", request, context)
        return generation_pb2.TokenizeResponse(token_ids=[1, 2, 3], tokens=["a", "b", "c"])


class FakeFineTuning(finetuning_pb2_grpc.FineTuningServicer):
    def __init__(self, state: State) -> None:
        self.s = state

    def UploadDataset(self, request_iterator, context):  # noqa: N802
        msgs = list(request_iterator)
        self.s.record("UploadDataset", msgs, context)
        data = b"".join(m.chunk for m in msgs[1:])
        return finetuning_pb2.Dataset(
            name=msgs[0].metadata.name, size_bytes=len(data), num_records=2, kind="completion"
        )

    def CreateJob(self, request, context):  # noqa: N802
        self.s.record("CreateJob", request, context)
        return _job("job-new", finetuning_pb2.JOB_STATUS_QUEUED)

    def GetJob(self, request, context):  # noqa: N802
        self.s.record("GetJob", request, context)
        status = {"job-ok": finetuning_pb2.JOB_STATUS_SUCCEEDED, "job-bad": finetuning_pb2.JOB_STATUS_FAILED}
        return _job(request.job_id, status.get(request.job_id, finetuning_pb2.JOB_STATUS_RUNNING))

    def ListJobs(self, request, context):  # noqa: N802
        self.s.record("ListJobs", request, context)
        start = int(request.page_token or 0)
        end = start + min(request.page_size or PAGE, PAGE)
        more = end < len(JOB_IDS)
        return finetuning_pb2.ListJobsResponse(
            jobs=[_job(j) for j in JOB_IDS[start:end]], next_page_token=str(end) if more else ""
        )

    def ListJobEvents(self, request, context):  # noqa: N802
        self.s.record("ListJobEvents", request, context)
        events, start = _events(request.job_id), int(request.page_token or 0)
        end = start + PAGE
        return finetuning_pb2.ListJobEventsResponse(
            events=events[start:end], next_page_token=str(end) if end < len(events) else ""
        )

    def StreamJobEvents(self, request, context):  # noqa: N802
        self.s.record("StreamJobEvents", request, context)
        self.s.stream_calls += 1
        for e in _events(request.job_id):
            if e.id <= request.after_event_id:
                continue
            if self.s.stream_calls == 1 and e.id > self.s.drop_after_event:
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection dropped")
            yield e


class FakeAdapters(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, state: State) -> None:
        self.s = state

    def ExportUpdateLog(self, request, context):  # noqa: N802
        self.s.record("ExportUpdateLog", request, context)
        for i in range(0, len(LOG_BYTES), 1000):
            yield adapters_pb2.ExportUpdateLogResponse(
                chunk=LOG_BYTES[i : i + 1000], total_bytes=len(LOG_BYTES)
            )

    def ImportUpdateLog(self, request_iterator, context):  # noqa: N802
        msgs = list(request_iterator)
        self.s.record("ImportUpdateLog", msgs, context)
        meta = msgs[0].metadata
        size = sum(len(m.chunk) for m in msgs[1:])
        return adapters_pb2.Adapter(
            id=meta.adapter_id or "ad-auto",
            display_name=meta.display_name,
            kind=common_pb2.TUNING_METHOD_LORA,
            update_log_bytes=size,
            status=adapters_pb2.ADAPTER_STATUS_READY,
        )


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, State]]:
    state = State()
    srv = grpc.server(ThreadPoolExecutor(max_workers=8))
    generation_pb2_grpc.add_TextGenerationServicer_to_server(FakeGeneration(state), srv)
    finetuning_pb2_grpc.add_FineTuningServicer_to_server(FakeFineTuning(state), srv)
    adapters_pb2_grpc.add_AdaptersServicer_to_server(FakeAdapters(state), srv)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, srv)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}", state
    srv.stop(None)


@pytest.fixture
def fake(server: tuple[str, State]) -> Iterator[tuple[str, State]]:
    addr, state = server
    state.reset()  # fresh records for each test
    yield addr, state


@pytest.fixture
def client(fake: tuple[str, State]) -> Iterator[ZostreamClient]:
    with ZostreamClient(fake[0], api_key="k-0123456789abcdef", timeout=10, backoff_s=0.01) as c:
        yield c


# ---- generation ----------------------------------------------------------------------------------
def test_generate_non_streaming(client: ZostreamClient, fake: tuple[str, State]) -> None:
    r = client.generate("Hi there", max_new_tokens=3, temperature=0.0, stop=["\n"], adapter_id="ad-1")
    assert r == GenerateResult(
        text="Hello world!",
        token_ids=(15496, 995, 0),
        finish_reason="max_tokens",
        prompt_tokens=4,
        completion_tokens=3,
        seed=FINAL_SEED,
        request_id="srv-1",
    )
    (req,) = fake[1].got("Generate")
    assert req.text == "Hi there" and not req.stream and req.adapter_id == "ad-1"
    assert req.stopping.max_new_tokens == 3 and list(req.stopping.stop) == ["\n"]
    assert req.sampling.HasField("temperature") and req.sampling.temperature == 0.0
    assert not req.sampling.HasField("top_p") and not req.sampling.HasField("seed")  # unset -> server default


def test_generate_stream_reassembles(client: ZostreamClient, fake: tuple[str, State]) -> None:
    chunks = list(client.generate_stream(messages=[{"role": "user", "content": "Hi"}], seed=7))
    assert chunks == [
        GenerateChunk(text="Hello", token_ids=(15496,), request_id="srv-1"),
        GenerateChunk(text=" world", token_ids=(995,), request_id="srv-1"),
        GenerateChunk(text="!", token_ids=(0,), request_id="srv-1"),
        GenerateChunk(
            text="",
            token_ids=(),
            finish_reason="max_tokens",
            prompt_tokens=4,
            completion_tokens=3,
            seed=7,
            request_id="srv-1",
        ),
    ]
    (req,) = fake[1].got("Generate")
    assert req.stream and req.WhichOneof("prompt") == "chat"
    assert [(m.role, m.content) for m in req.chat.messages] == [("user", "Hi")]


def test_closing_the_stream_cancels_the_call(client: ZostreamClient, fake: tuple[str, State]) -> None:
    it = client.generate_stream("long")
    assert next(it).text == "x"
    it.close()
    assert fake[1].cancelled.wait(2), "the server never saw the call end"


def test_authorization_metadata_on_every_call(client: ZostreamClient, fake: tuple[str, State]) -> None:
    client.generate("Hi")
    list(client.list_jobs())
    client.upload_dataset("d", b'{"text": "a"}\n')
    assert len(fake[1].metadata) == 1 + 3 + 1  # Generate, three ListJobs pages, UploadDataset
    assert {m.get("authorization") for m in fake[1].metadata} == {"Bearer k-0123456789abcdef"}


def test_retries_unavailable_then_succeeds(client: ZostreamClient, fake: tuple[str, State]) -> None:
    fake[1].unavailable = 2
    assert client.generate("Hi").text == "Hello world!"
    assert len(fake[1].got("Generate")) == 3
    fake[1].unavailable = 2
    assert client.get_job("job-1")["id"] == "job-1"
    assert len(fake[1].got("GetJob")) == 3


def test_gives_up_after_retries(client: ZostreamClient, fake: tuple[str, State]) -> None:
    fake[1].unavailable = 10
    with pytest.raises(ZostreamError) as err:
        client.get_job("job-1")
    assert err.value.code == "UNAVAILABLE" and err.value.message == "server is restarting"
    assert len(fake[1].got("GetJob")) == 4  # the first try + retries=3


def test_invalid_argument_maps_to_error_without_retry(
    client: ZostreamClient, fake: tuple[str, State]
) -> None:
    with pytest.raises(ZostreamError) as err:
        client.generate("bad")
    assert (err.value.code, err.value.message) == (
        "INVALID_ARGUMENT",
        "sampling.temperature: must be in [0, 100]",
    )
    assert str(err.value) == "INVALID_ARGUMENT: sampling.temperature: must be in [0, 100]"
    assert len(fake[1].got("Generate")) == 1


def test_tokenize_and_health(client: ZostreamClient) -> None:
    assert client.tokenize("abc") == [1, 2, 3]
    assert client.health() == "SERVING"


# ---- datasets, jobs, events, adapters ---------------------------------------------------------------
def test_upload_dataset_chunks_a_3mib_file(
    client: ZostreamClient, fake: tuple[str, State], tmp_path: Path
) -> None:
    data = random.Random(0).randbytes(3 * 1024 * 1024 + 17)
    path = tmp_path / "train.jsonl"
    path.write_bytes(data)
    ds = client.upload_dataset("train-1", path, kind="completion")
    assert ds["name"] == "train-1" and ds["size_bytes"] == len(data)  # uint64 arrives as an int
    (msgs,) = fake[1].got("UploadDataset")
    assert msgs[0].WhichOneof("part") == "metadata"
    assert (msgs[0].metadata.name, msgs[0].metadata.kind, msgs[0].metadata.overwrite) == (
        "train-1",
        "completion",
        False,
    )
    chunks = [m.chunk for m in msgs[1:]]
    assert all(m.WhichOneof("part") == "chunk" for m in msgs[1:])
    assert len(chunks) >= 3 and max(map(len, chunks)) <= 1024 * 1024
    assert b"".join(chunks) == data


def test_list_jobs_follows_page_tokens(client: ZostreamClient, fake: tuple[str, State]) -> None:
    jobs = list(client.list_jobs(page_size=50, statuses=["running", "queued"]))
    assert [j["id"] for j in jobs] == JOB_IDS
    assert jobs[0]["status"] == "JOB_STATUS_RUNNING" and jobs[0]["progress"]["steps_done"] == 3
    reqs = fake[1].got("ListJobs")
    assert [r.page_token for r in reqs] == ["", "2", "4"]
    assert list(reqs[0].statuses) == [finetuning_pb2.JOB_STATUS_RUNNING, finetuning_pb2.JOB_STATUS_QUEUED]


def test_create_job_request(client: ZostreamClient, fake: tuple[str, State]) -> None:
    client.create_job(
        "lora",
        "ds",
        steps=20,
        learning_rate=1e-3,
        lr_schedule="cosine",
        noise="rademacher",
        lora_r=4,
        lora_target_modules=["q_proj"],
    )
    (req,) = fake[1].got("CreateJob")
    hp = req.hyperparameters
    assert req.method == common_pb2.TUNING_METHOD_LORA and req.training_dataset == "ds"
    assert (hp.steps, hp.learning_rate, hp.lr_schedule, hp.noise) == (
        20,
        1e-3,
        finetuning_pb2.LR_SCHEDULE_COSINE,
        finetuning_pb2.NOISE_KIND_RADEMACHER,
    )
    assert not hp.HasField("eps") and not hp.HasField("seed")
    assert (hp.lora.r, list(hp.lora.target_modules), hp.lora.HasField("alpha")) == (4, ["q_proj"], False)
    assert req.idempotency_key.startswith("client-")  # a retry can never create a second job
    with pytest.raises(TypeError, match="lerning_rate"):
        client.create_job("lora", "ds", steps=1, lerning_rate=1.0)


def test_job_events_paged_and_filtered(client: ZostreamClient) -> None:
    assert [e["id"] for e in client.job_events("job-ok", after_event_id=2)] == [3, 4, 5]


def test_stream_job_events_resumes_after_a_drop(client: ZostreamClient, fake: tuple[str, State]) -> None:
    events = list(client.stream_job_events("job-ok"))
    assert [e["id"] for e in events] == [1, 2, 3, 4, 5]
    assert [e["type"] for e in events] == ["started", "step", "step", "step", "succeeded"]
    assert [r.after_event_id for r in fake[1].got("StreamJobEvents")] == [0, 3]


def test_export_and_import_update_log(
    client: ZostreamClient, fake: tuple[str, State], tmp_path: Path
) -> None:
    assert client.export_update_log(adapter_id="ad-1") == LOG_BYTES
    out = tmp_path / "a.zlog"
    assert client.export_update_log_to(out, job_id="job-1") == len(LOG_BYTES)
    assert out.read_bytes() == LOG_BYTES and [p.name for p in tmp_path.iterdir()] == ["a.zlog"]
    reqs = fake[1].got("ExportUpdateLog")
    assert [r.WhichOneof("source") for r in reqs] == ["adapter_id", "job_id"]
    ad = client.import_update_log(LOG_BYTES, adapter_id="mine", display_name="Mine")
    assert (ad["id"], ad["display_name"], ad["update_log_bytes"]) == ("mine", "Mine", len(LOG_BYTES))


# ---- CLI ---------------------------------------------------------------------------------------------
def test_cli_jobs_list_json(fake: tuple[str, State], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["jobs", "list", "--server", fake[0], "--json", "--status", "running"]) == 0
    jobs = json.loads(capsys.readouterr().out)
    assert [j["id"] for j in jobs] == JOB_IDS
    assert jobs[0]["metrics"]["train_loss"] == 1.25


def test_cli_jobs_list_table(fake: tuple[str, State], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["jobs", "list", "--server", fake[0]]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "STATUS", "METHOD", "STEPS", "LOSS", "NAME"]
    assert [ln.split() for ln in lines[1:]] == [[j, "running", "lora", "3/10", "1.2500"] for j in JOB_IDS]


@pytest.mark.parametrize(("job_id", "code"), [("job-ok", 0), ("job-bad", 1)])
def test_cli_jobs_events_follow_exit_code(
    fake: tuple[str, State], capsys: pytest.CaptureFixture[str], job_id: str, code: int
) -> None:
    fake[1].drop_after_event = 99  # no drop here
    assert cli.main(["jobs", "events", job_id, "--follow", "--server", fake[0]]) == code
    out = capsys.readouterr()
    types = [ln.split()[1] for ln in out.out.splitlines()]  # step events only feed the progress bar
    assert types == ["started", "succeeded" if code == 0 else "failed"]
    assert ("failed" in out.err) == (code == 1)


def test_cli_jobs_create_uploads_then_creates(
    fake: tuple[str, State], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    data = b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n'
    (tmp_path / "train.jsonl").write_bytes(data)
    rc = cli.main(
        [
            "jobs",
            "create",
            "--server",
            fake[0],
            "--method",
            "lora",
            "--data",
            str(tmp_path / "train.jsonl"),
            "--steps",
            "7",
            "--lr",
            "0.01",
            "--lora-targets",
            "q_proj,o_proj",
            "--idempotency-key",
            "key-1",
            "--eval-dataset",
            "held-out",
            "--eval-every",
            "5",
            "--keep-best",
            "--early-stopping-patience",
            "3",
            "--average-decay",
            "0",
        ]
    )
    assert rc == 0 and capsys.readouterr().out == "job-new\n"
    (msgs,) = fake[1].got("UploadDataset")
    name = f"sha256-{hashlib.sha256(data).hexdigest()[:16]}"
    assert msgs[0].metadata.name == name and b"".join(m.chunk for m in msgs[1:]) == data
    (req,) = fake[1].got("CreateJob")
    assert (req.training_dataset, req.hyperparameters.steps, req.idempotency_key) == (name, 7, "key-1")
    assert list(req.hyperparameters.lora.target_modules) == ["q_proj", "o_proj"]
    hp = req.hyperparameters
    assert (req.validation_dataset, hp.eval_every, hp.keep_best, hp.early_stopping_patience) == (
        "held-out",
        5,
        True,
        3,
    )
    assert hp.HasField("average_decay") and hp.average_decay == 0  # 0 is sent: the last step's factors


def _generate_args(addr: str, **kw: Any) -> argparse.Namespace:
    base = dict(
        prompts=["Hi"],
        chat=False,
        system=None,
        max_new_tokens=3,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        seed=None,
        stop=[],
        ignore_eos=False,
        json=True,
        stream=False,
        adapter=None,
        server=addr,
        api_key_file=None,
        adapter_id="",
        timeout=None,
    )
    return argparse.Namespace(**(base | kw))


def test_remote_generate_json_fields(
    fake: tuple[str, State], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    key = tmp_path / "key"
    key.write_text("k-from-file-0123456\n")
    assert remote.generate(_generate_args(fake[0], api_key_file=str(key), seed=10, prompts=["a", "b"])) == 0
    objs = json.loads(capsys.readouterr().out)
    expected = {
        "text": "Hello world!",
        "token_ids": [15496, 995, 0],
        "finish_reason": "max_tokens",
        "prompt_tokens": 4,
        "completion_tokens": 3,
    }
    assert objs == [expected | {"seed": 10}, expected | {"seed": 11}]  # prompt i gets seed S+i
    assert {m["authorization"] for m in fake[1].metadata} == {"Bearer k-from-file-0123456"}


def test_remote_generate_stream_and_chat(fake: tuple[str, State], capsys: pytest.CaptureFixture[str]) -> None:
    assert remote.generate(_generate_args(fake[0], json=False, stream=True, system="Be brief.")) == 0
    assert capsys.readouterr().out == "Hello world!\n"
    (req,) = fake[1].got("Generate")
    assert [(m.role, m.content) for m in req.chat.messages] == [("system", "Be brief."), ("user", "Hi")]


def test_cli_generate_server_json(fake: tuple[str, State], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["generate", "--server", fake[0], "--json", "Hi"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert set(obj) == {"text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "seed"}
    assert (obj["text"], obj["seed"]) == ("Hello world!", FINAL_SEED)


def test_cli_server_error_message(fake: tuple[str, State], capsys: pytest.CaptureFixture[str]) -> None:
    assert remote.generate(_generate_args(fake[0], prompts=["bad"])) == 1
    assert capsys.readouterr().err == (
        "zostream generate: error: INVALID_ARGUMENT: sampling.temperature: must be in [0, 100]\n"
    )


def test_cli_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert cli.main(["jobs", "list", "--server", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"zostream jobs list: error: cannot reach the server at 127.0.0.1:{port}")


def test_cli_adapters_export_and_import(
    fake: tuple[str, State], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "x.zlog"
    assert cli.main(["adapters", "export", "ad-1", "--out", str(out), "--server", fake[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"path": str(out), "bytes": len(LOG_BYTES)}
    assert out.read_bytes() == LOG_BYTES
    assert cli.main(["adapters", "import", str(out), "--id", "copy", "--server", fake[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "copy"
