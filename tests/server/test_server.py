"""Acceptance tests of the gRPC server against real servers on loopback ports.

References are independent of the server: the in-process Engine for generation, the job's own update
log replayed by a fresh server for adapters, an uninterrupted run for crash recovery, hand-written
status codes and field names for bad requests, and a real Prometheus scraping /metrics.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import math
import re
import shutil
import signal
import statistics
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from tests.polling import wait_until
from tests.server.conftest import (
    VOCAB,
    ProcServer,
    Stubs,
    ThreadServer,
    engine_config,
    free_port,
    server_config,
    start_process,
    stop_process,
    thread_server,
    unready_thread_server,
)
from zostream.clients.errors import status_details
from zostream.engine.engine import Engine
from zostream.engine.generation import GenerateRequest, StopParams
from zostream.engine.metrics import Metrics
from zostream.engine.sampling import SamplingParams
from zostream.engine.update_log import UpdateLog
from zostream.v1 import adapters_pb2 as A
from zostream.v1 import common_pb2 as Cm
from zostream.v1 import finetuning_pb2 as F
from zostream.v1 import generation_pb2 as G

ROOT = Path(__file__).resolve().parents[2]
# JobEvent.type values the proto documents
EVENT_TYPES = {
    "created",
    "started",
    "step",
    "eval",
    "checkpoint",
    "log_repaired",
    "resumed",
    "cancelling",
    "succeeded",
    "failed",
    "cancelled",
    "best",
    "early_stop",
}
ZOSTREAM_SERVICES = {"zostream.v1.TextGeneration", "zostream.v1.FineTuning", "zostream.v1.Adapters"}


# ---- helpers --------------------------------------------------------------------------------------
def gen_request(
    text: str = "5 17 3 42",
    n: int = 12,
    stream: bool = False,
    request_id: str = "",
    adapter_id: str = "",
    temperature: float = 0.0,
    seed: int | None = None,
) -> G.GenerateRequest:
    sampling = G.SamplingParams(temperature=temperature)
    if seed is not None:
        sampling.seed = seed
    return G.GenerateRequest(
        text=text,
        request_id=request_id,
        adapter_id=adapter_id,
        stream=stream,
        sampling=sampling,
        stopping=G.StoppingCriteria(max_new_tokens=n, ignore_eos=True),
    )


def collect(messages) -> tuple[list[int], str, Any, int]:
    """(token ids, text, last message, number of messages) of a Generate call."""
    ids: list[int] = []
    texts: list[str] = []
    last, count = None, 0
    for m in messages:
        assert last is None or last.finish_reason == G.FINISH_REASON_UNSPECIFIED, (
            "a message after the final one"
        )
        ids.extend(m.token_ids)
        texts.append(m.text)
        last, count = m, count + 1
    assert last is not None and last.finish_reason != G.FINISH_REASON_UNSPECIFIED, "no final message"
    return ids, "".join(texts), last, count


def text_records(n: int = 24, words: int = 10, offset: int = 0) -> bytes:
    lines = [
        {"text": " ".join(str((i * 7 + j * 3 + offset) % 90 + 1) for j in range(words))} for i in range(n)
    ]
    return "\n".join(json.dumps(x) for x in lines).encode()


def upload(stubs: Stubs, name: str, data: bytes, chunk: int = 100) -> F.Dataset:
    parts = [F.UploadDatasetRequest(metadata=F.DatasetMetadata(name=name))]
    parts += [F.UploadDatasetRequest(chunk=data[i : i + chunk]) for i in range(0, len(data), chunk)]
    return stubs.ft.UploadDataset(iter(parts), timeout=30)


def lora_job_request(
    dataset: str,
    steps: int,
    seed: int,
    lr: float = 0.5,
    eps: float = 0.1,
    checkpoint_every: int = 2,
    batch_size: int = 4,
) -> F.CreateJobRequest:
    hp = F.Hyperparameters(
        steps=steps,
        learning_rate=lr,
        eps=eps,
        batch_size=batch_size,
        seed=seed,
        checkpoint_every=checkpoint_every,
        max_len=64,
        lora=Cm.LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]),
    )
    return F.CreateJobRequest(method=Cm.TUNING_METHOD_LORA, training_dataset=dataset, hyperparameters=hp)


def follow_events(stubs: Stubs, job_id: str, after: int = 0, timeout: float = 60) -> list[F.JobEvent]:
    return list(
        stubs.ft.StreamJobEvents(
            F.StreamJobEventsRequest(job_id=job_id, after_event_id=after), timeout=timeout
        )
    )


def get_job(stubs: Stubs, job_id: str) -> F.Job:
    return stubs.ft.GetJob(F.GetJobRequest(job_id=job_id), timeout=10)


def export_log(stubs: Stubs, **source: str) -> bytes:
    parts = list(stubs.ad.ExportUpdateLog(A.ExportUpdateLogRequest(**source), timeout=30))
    data = b"".join(p.chunk for p in parts)
    assert {p.total_bytes for p in parts} == {len(data)}
    return data


def import_log(stubs: Stubs, adapter_id: str, data: bytes, chunk: int = 64) -> A.Adapter:
    parts = [A.ImportUpdateLogRequest(metadata=A.ImportUpdateLogMetadata(adapter_id=adapter_id))]
    parts += [A.ImportUpdateLogRequest(chunk=data[i : i + chunk]) for i in range(0, len(data), chunk)]
    return stubs.ad.ImportUpdateLog(iter(parts), timeout=30)


def reference_tokens(
    model_dir: Path, text: str, n: int, temperature: float = 0.0, seed: int | None = None
) -> tuple[list[int], str]:
    """The in-process engine on the same model: the reference every server answer is held to."""
    eng = Engine(engine_config(model_dir))
    req = GenerateRequest(
        "ref",
        eng.encode_prompt(text),
        SamplingParams(temperature=temperature, seed=seed),
        StopParams(n, ignore_eos=True),
    )
    ev = eng.generate([req])["ref"]
    return list(ev.token_ids), ev.text


def ttft(stubs: Stubs, n: int = 7) -> float:
    """Median seconds from sending a streamed Generate to its first token (after one warm-up call)."""
    collect(stubs.gen.Generate(gen_request(n=2, stream=True), timeout=30))
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        call = stubs.gen.Generate(gen_request(f"{i + 3} 8 9", n=2, stream=True), timeout=30)
        first = next(call)
        times.append(time.perf_counter() - t0)
        assert len(first.token_ids) == 1
        collect(call)
    return statistics.median(times)


# ==== 1. Generate ====================================================================================
def test_generate_stream_and_unary_match_the_engine(
    server: ThreadServer, stubs: Stubs, model_dir: Path
) -> None:
    text, n = "5 17 3 42 8", 24
    want_ids, want_text = reference_tokens(model_dir, text, n)
    assert len(want_ids) == n

    ids, got_text, last, count = collect(stubs.gen.Generate(gen_request(text, n, stream=True), timeout=30))
    assert ids == want_ids
    assert got_text == want_text
    assert count == n + 1  # one message per token, then the final one
    assert last.finish_reason == G.FINISH_REASON_MAX_TOKENS
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, n)
    assert last.request_id.startswith("req-")

    ids, got_text, last, count = collect(stubs.gen.Generate(gen_request(text, n), timeout=30))
    assert (ids, got_text, count) == (want_ids, want_text, 1)
    assert last.usage.completion_tokens == n

    # Tokenize sees the prompt exactly as Generate does.
    assert list(stubs.gen.Tokenize(G.TokenizeRequest(text=text)).token_ids) == [5, 17, 3, 42, 8]

    # Sampling with a seed: the same tokens as the engine with that seed, streamed or not; the seed is echoed.
    want_ids, _ = reference_tokens(model_dir, text, n, temperature=0.9, seed=1234)
    streamed = collect(stubs.gen.Generate(gen_request(text, n, True, temperature=0.9, seed=1234), timeout=30))
    unary = collect(stubs.gen.Generate(gen_request(text, n, temperature=0.9, seed=1234), timeout=30))
    assert streamed[0] == unary[0] == want_ids
    assert streamed[2].seed == unary[2].seed == 1234


def wait_freed(server: ThreadServer) -> None:
    engine = server.app.engine
    wait_until(
        lambda: (
            not server.app.inflight
            and not engine.seqs
            and not engine.scheduler.running
            and not engine.scheduler.waiting
        ),
        5,
        "the request to be freed",
    )


def requests_total(server: ThreadServer, reason: str) -> float:
    return (
        server.app.metrics.registry.get_sample_value(
            "zostream_requests_total", {"finish_reason": reason, "api": "grpc"}
        )
        or 0
    )


def test_abort_ends_the_stream_with_cancelled(server: ThreadServer, stubs: Stubs) -> None:
    call = stubs.gen.Generate(gen_request(n=480, stream=True, request_id="abort-me"), timeout=30)
    first = next(call)
    assert first.request_id == "abort-me" and len(first.token_ids) == 1
    resp = stubs.gen.Abort(G.AbortRequest(request_ids=["abort-me", "never-existed"]), timeout=5)
    assert list(resp.aborted_request_ids) == ["abort-me"]
    ids, _, last, _ = collect(call)
    assert last.finish_reason == G.FINISH_REASON_CANCELLED
    assert 0 < last.usage.completion_tokens < 480
    assert last.usage.completion_tokens == 1 + len(ids)  # every generated token reached the client
    wait_freed(server)


def test_client_cancel_frees_the_request(server: ThreadServer, stubs: Stubs) -> None:
    before = requests_total(server, "cancelled")
    call = stubs.gen.Generate(gen_request(n=480, stream=True, request_id="cancel-me"), timeout=30)
    next(call)
    assert "cancel-me" in server.app.inflight and "cancel-me" in server.app.engine.seqs
    call.cancel()
    with pytest.raises(grpc.RpcError) as exc:
        list(call)
    assert exc.value.code() == grpc.StatusCode.CANCELLED
    wait_freed(server)
    wait_until(lambda: requests_total(server, "cancelled") == before + 1, 5, "the cancel to be counted")


def test_deadline_ends_a_long_generation(server: ThreadServer, stubs: Stubs) -> None:
    t0 = time.monotonic()
    ids: list[int] = []
    try:
        for m in stubs.gen.Generate(gen_request(n=480, stream=True), timeout=0.5):
            ids.extend(m.token_ids)
            last = m
        # The server ends the request just before the deadline, with a final message.
        assert last.finish_reason == G.FINISH_REASON_TIME_LIMIT
        assert last.usage.completion_tokens == len(ids) < 480
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 1.5
    wait_freed(server)


def test_32_concurrent_streams_complete(server: ThreadServer, stubs: Stubs, model_dir: Path) -> None:
    tok = server.app.engine.tokenizer

    def one(i: int) -> tuple[int, list[int], str, Any]:
        n = 3 + i % 6
        text = " ".join(str((i * 13 + k) % 90 + 1) for k in range(1 + i % 5))
        ids, out, last, count = collect(stubs.gen.Generate(gen_request(text, n, True, f"c-{i}"), timeout=60))
        assert count == n + 1
        return n, ids, out, last

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    for i, (n, ids, out, last) in enumerate(results):
        assert last.request_id == f"c-{i}"
        assert len(ids) == last.usage.completion_tokens == n
        assert last.usage.prompt_tokens == 1 + i % 5
        assert last.finish_reason == G.FINISH_REASON_MAX_TOKENS
        assert out == tok.decode(ids, skip_special_tokens=True)
    wait_freed(server)


# ==== 2. A LoRA job through the API ==================================================================
JOB_STEPS = 6


@pytest.fixture(scope="module")
def finished_job(server: ThreadServer, stubs: Stubs) -> dict[str, Any]:
    """A LoRA job run to SUCCEEDED with its events streamed from the start."""
    ds = upload(stubs, "tiny", text_records())
    assert (ds.name, ds.num_records, ds.kind) == ("tiny", 24, "text")
    job = stubs.ft.CreateJob(lora_job_request("tiny", JOB_STEPS, seed=7), timeout=10)
    assert job.status in (F.JOB_STATUS_QUEUED, F.JOB_STATUS_RUNNING)
    events = follow_events(stubs, job.id)
    return {"job": job, "events": events}


def test_lora_job_events_and_adapter(
    server: ThreadServer, stubs: Stubs, finished_job: dict[str, Any]
) -> None:
    job, events = finished_job["job"], finished_job["events"]
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert all(e.job_id == job.id for e in events)
    types = [e.type for e in events]
    assert types[:2] == ["created", "started"] and types[-1] == "succeeded"
    assert set(types) <= EVENT_TYPES
    steps = [e for e in events if e.type == "step"]
    assert [e.step for e in steps] == list(range(1, JOB_STEPS + 1))  # steps done so far
    assert all(math.isfinite(e.metrics["train_loss"]) for e in steps)  # JobMetrics' names
    # checkpoint_every=2: after steps 2 and 4 (the last step exports instead)
    assert [e.step for e in events if e.type == "checkpoint"] == [2, 4]
    assert events[-1].step == JOB_STEPS

    # Resumable: after_event_id gives exactly the rest; ListJobEvents agrees with the stream.
    rest = follow_events(stubs, job.id, after=3)
    assert [(e.id, e.type, e.step) for e in rest] == [(e.id, e.type, e.step) for e in events[3:]]
    listed = stubs.ft.ListJobEvents(F.ListJobEventsRequest(job_id=job.id)).events
    assert [(e.id, e.type) for e in listed] == [(e.id, e.type) for e in events]

    done = get_job(stubs, job.id)
    assert done.status == F.JOB_STATUS_SUCCEEDED
    assert (done.progress.steps_done, done.progress.steps_total) == (JOB_STEPS, JOB_STEPS)
    assert done.adapter_id == job.id and done.hyperparameters.seed == 7
    assert done.hyperparameters.learning_rate == 0.5
    ad = stubs.ad.GetAdapter(A.GetAdapterRequest(adapter_id=job.id))
    assert ad.status == A.ADAPTER_STATUS_READY and ad.steps == JOB_STEPS and ad.source_job_id == job.id

    # The adapter changes greedy output; the base is unchanged by it.
    base = collect(stubs.gen.Generate(gen_request(n=16), timeout=30))[0]
    tuned = collect(stubs.gen.Generate(gen_request(n=16, adapter_id=job.id), timeout=30))[0]
    assert tuned != base
    assert collect(stubs.gen.Generate(gen_request(n=16), timeout=30))[0] == base


def test_update_log_export_import_reproduces_the_adapter(
    server: ThreadServer,
    stubs: Stubs,
    finished_job: dict[str, Any],
    model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exported log imported on a fresh server replays to the trained factors, bitwise. The replay
    runs off the engine thread: held inside it, the server still generates."""
    from zostream.engine import stored_adapters

    job_id = finished_job["job"].id
    data = export_log(stubs, job_id=job_id)
    assert data == (server.app.jobs.job_dir(job_id) / "update.log").read_bytes()
    assert export_log(stubs, adapter_id=job_id) == data
    trained = server.app.engine.adapters[job_id].tensors
    tuned = collect(stubs.gen.Generate(gen_request(n=16, adapter_id=job_id), timeout=30))[0]
    base_tokens = collect(stubs.gen.Generate(gen_request(n=16), timeout=30))[0]

    with thread_server(server_config(model_dir, tmp_path / "fresh")) as fresh:
        fs = fresh.stubs()
        gate, held, replay = threading.Event(), threading.Event(), stored_adapters.replay_lora

        def held_replay(*a: Any, **k: Any) -> Any:
            held.set()
            assert gate.wait(60)
            return replay(*a, **k)

        monkeypatch.setattr(stored_adapters, "replay_lora", held_replay)
        parts = [A.ImportUpdateLogRequest(metadata=A.ImportUpdateLogMetadata(adapter_id="from-elsewhere"))]
        parts += [A.ImportUpdateLogRequest(chunk=data[i : i + 4096]) for i in range(0, len(data), 4096)]
        pending = fs.ad.ImportUpdateLog.future(iter(parts), timeout=60)
        try:
            assert held.wait(30), "the import never reached its replay"
            assert collect(fs.gen.Generate(gen_request(n=16), timeout=10))[0] == base_tokens
        finally:
            gate.set()
        ad = pending.result()
        assert (ad.id, ad.steps, ad.source_job_id, ad.status) == (
            "from-elsewhere",
            JOB_STEPS,
            "",
            A.ADAPTER_STATUS_READY,
        )
        assert ad.base_fingerprint == stubs.gen.GetModelInfo(G.GetModelInfoRequest()).base_fingerprint
        replayed = fresh.app.engine.adapters["from-elsewhere"].tensors
        assert replayed.keys() == trained.keys() and replayed
        for name, t in trained.items():
            assert torch.equal(replayed[name], t), name
        assert (
            collect(fs.gen.Generate(gen_request(n=16, adapter_id="from-elsewhere"), timeout=30))[0] == tuned
        )
        # The imported log is served back unchanged, and the id cannot be taken twice.
        assert export_log(fs, adapter_id="from-elsewhere") == data
        with pytest.raises(grpc.RpcError) as exc:
            import_log(fs, "from-elsewhere", data)
        assert exc.value.code() == grpc.StatusCode.ALREADY_EXISTS
        assert "adapter_id" in exc.value.details()
        fs.channel.close()


def test_lists_are_newest_first_and_paged(
    server: ThreadServer, stubs: Stubs, finished_job: dict[str, Any]
) -> None:
    created = [stubs.ft.CreateJob(lora_job_request("tiny", 1, seed=i), timeout=10).id for i in range(3)]
    for job_id in created:
        assert follow_events(stubs, job_id)[-1].type == "succeeded"
    pages, token = [], ""
    while True:
        resp = stubs.ft.ListJobs(F.ListJobsRequest(page_size=2, page_token=token), timeout=10)
        assert len(resp.jobs) <= 2
        pages += list(resp.jobs)
        token = resp.next_page_token
        if not token:
            break
    ids = [j.id for j in pages]
    assert len(ids) == len(set(ids)) == len(server.app.jobs.jobs)
    assert ids[:3] == created[::-1] and finished_job["job"].id in ids
    times = [j.created_at.ToNanoseconds() for j in pages]
    assert times == sorted(times, reverse=True)
    done = stubs.ft.ListJobs(F.ListJobsRequest(statuses=[F.JOB_STATUS_SUCCEEDED]), timeout=10).jobs
    assert {j.id for j in done} == {j.id for j in pages if j.status == F.JOB_STATUS_SUCCEEDED} >= set(created)
    assert not stubs.ft.ListJobs(F.ListJobsRequest(statuses=[F.JOB_STATUS_FAILED]), timeout=10).jobs
    adapters = [a.id for a in stubs.ad.ListAdapters(A.ListAdaptersRequest(), timeout=10).adapters]
    assert adapters[:3] == created[::-1] and finished_job["job"].id in adapters


def test_cancel_a_running_job(server: ThreadServer, stubs: Stubs, finished_job: dict[str, Any]) -> None:
    job_id = stubs.ft.CreateJob(lora_job_request("tiny", 100_000, seed=5), timeout=10).id
    wait_until(lambda: get_job(stubs, job_id).progress.steps_done >= 1, 30, "a step")
    assert stubs.ft.CancelJob(F.CancelJobRequest(job_id=job_id), timeout=10).status in (
        F.JOB_STATUS_CANCELLING,
        F.JOB_STATUS_CANCELLED,
    )
    events = follow_events(stubs, job_id)
    assert [e.type for e in events][-2:] == ["checkpoint", "cancelled"] and "cancelling" in [
        e.type for e in events
    ]
    job = get_job(stubs, job_id)
    assert job.status == F.JOB_STATUS_CANCELLED and 1 <= job.progress.steps_done < 100_000
    ad = stubs.ad.GetAdapter(A.GetAdapterRequest(adapter_id=job_id), timeout=10)
    assert ad.status == A.ADAPTER_STATUS_STOPPED and ad.steps == job.progress.steps_done
    with UpdateLog.open(server.app.jobs.job_dir(job_id) / "update.log", repair=False) as log:
        assert len(log) == job.progress.steps_done  # the steps it took are kept
    again = stubs.ft.CancelJob(F.CancelJobRequest(job_id=job_id), timeout=10)  # documented: changes nothing
    assert (again.status, again.finished_at) == (job.status, job.finished_at)


def test_a_cancel_while_the_job_starts_is_kept(
    server: ThreadServer, stubs: Stubs, finished_job: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """CancelJob lands between the engine reading QUEUED and the job going RUNNING (forced here by cancelling
    from inside the trainer's opening): the job ends CANCELLED with no step run, not RUNNING to the end."""
    from zostream.engine import session

    real = session.finetune.open_trainer

    def open_then_cancel(cfg, job_dir, *args, **kw):
        assert stubs.ft.CancelJob(F.CancelJobRequest(job_id=job_dir.name), timeout=10).status == (
            F.JOB_STATUS_CANCELLING
        )
        return real(cfg, job_dir, *args, **kw)

    monkeypatch.setattr(session.finetune, "open_trainer", open_then_cancel)
    job_id = stubs.ft.CreateJob(lora_job_request("tiny", 100_000, seed=6), timeout=10).id
    types = [e.type for e in follow_events(stubs, job_id)]
    job = get_job(stubs, job_id)
    assert job.status == F.JOB_STATUS_CANCELLED and job.progress.steps_done == 0, types
    assert "started" not in types and "step" not in types and types[-1] == "cancelled"


# ==== 3. kill -9 and SIGTERM =========================================================================
CRASH_STEPS = 300  # run 2 must still be training when SIGTERM lands, on an idle machine too


def test_job_survives_kill_9_and_sigterm(model_dir: Path, tmp_path: Path) -> None:
    data = text_records(32, words=16, offset=5)
    req = lora_job_request("crash", CRASH_STEPS, seed=11, lr=0.05, eps=0.05, checkpoint_every=7, batch_size=8)
    d1 = tmp_path / "d1"
    procs: list[ProcServer] = []
    try:
        # Run 1: kill -9 once at least 10 steps are logged, while Generate requests share the passes.
        p = start_process(model_dir, d1, tmp_path)
        procs.append(p)
        s = p.stubs()
        idle_ttft = ttft(s)
        upload(s, "crash", data)
        job_id = s.ft.CreateJob(req, timeout=10).id
        wait_until(lambda: get_job(s, job_id).progress.steps_done >= 1, 30, "the first step")
        busy_ttft = ttft(s)
        print(
            f"\nTTFT on the tiny model (subprocess server, CPU): idle {idle_ttft * 1e3:.1f} ms, "
            f"while a LoRA job trains {busy_ttft * 1e3:.1f} ms"
        )
        wait_until(lambda: get_job(s, job_id).progress.steps_done >= 10, 60, "10 steps", interval=0.02)
        assert p.kill(signal.SIGKILL) == -signal.SIGKILL
        assert json.loads((d1 / "jobs" / job_id / "status.json").read_text())["status"] == "running"
        with UpdateLog.open(d1 / "jobs" / job_id / "update.log", repair=False) as log:
            logged = len(log)
        assert 10 <= logged < CRASH_STEPS  # every step GetJob reported is in the log

        # Run 2: resumes; SIGTERM (as soon as it has taken a step) exits 0 promptly and leaves the job
        # RUNNING on disk with a checkpoint.
        p = start_process(model_dir, d1, tmp_path)
        procs.append(p)
        s = p.stubs()
        wait_until(lambda: get_job(s, job_id).progress.steps_done > logged, 60, "a step after resuming")
        # A client following the job's events (raw stub, no reconnects) while SIGTERM lands.
        followed: list[int] = []
        ended: list[grpc.RpcError] = []
        own = grpc.insecure_channel(f"127.0.0.1:{p.port}")  # p.kill closes the test's channel

        def follow() -> None:
            try:
                for ev in Stubs(own).ft.StreamJobEvents(F.StreamJobEventsRequest(job_id=job_id), timeout=60):
                    followed.append(ev.id)
            except grpc.RpcError as exc:
                ended.append(exc)

        follower = threading.Thread(target=follow)
        follower.start()
        wait_until(lambda: len(followed) > 0, 30, "the follower's first event")
        t0 = time.monotonic()
        p.kill(signal.SIGTERM)
        assert p.proc.wait(20) == 0, p.output()
        assert time.monotonic() - t0 < 20
        follower.join(10)
        own.close()
        # The stream ended as the proto says: UNAVAILABLE / SERVER_DRAINING, naming where to follow again,
        # not cancelled under the server's stop (which logged a traceback per open stream).
        assert ended and ended[0].code() == grpc.StatusCode.UNAVAILABLE, ended
        assert status_details(ended[0].trailing_metadata())["reason"] == "SERVER_DRAINING"
        assert f"after_event_id={followed[-1]}" in ended[0].details()
        assert followed == list(range(1, len(followed) + 1))
        assert "Exception not handled" not in p.output()
        on_disk = json.loads((d1 / "jobs" / job_id / "status.json").read_text())
        assert on_disk["status"] == "running", "the job finished before SIGTERM; make its steps slower"
        events = [json.loads(x) for x in (d1 / "jobs" / job_id / "events.jsonl").read_text().splitlines()]
        assert events[-1]["type"] == "checkpoint" and events[-1]["step"] > logged
        assert (d1 / "jobs" / job_id / "checkpoints" / f"step-{events[-1]['step']:06d}").is_dir()
        types = [e["type"] for e in events]
        assert types.count("resumed") == 1
        # No logged step is lost or repeated: training goes on at the step after the last logged one.
        after = events[types.index("resumed") :]
        assert [e["step"] for e in after if e["type"] == "step"][0] == logged + 1
    finally:
        for p in procs:
            stop_process(p)

    # Run 3 (in this process, to save a start-up): resumes again and finishes.
    with thread_server(server_config(model_dir, d1)) as run3:
        s = run3.stubs()
        rest = follow_events(s, job_id, after=len(events))
        assert rest[0].type == "resumed" and rest[-1].type == "succeeded"
        assert [e.id for e in rest] == list(range(len(events) + 1, len(events) + len(rest) + 1))
        assert get_job(s, job_id).status == F.JOB_STATUS_SUCCEEDED
        s.channel.close()

    # The same job uninterrupted, on a fresh data dir: the update log is bitwise the same.
    with thread_server(server_config(model_dir, tmp_path / "d2")) as ref:
        rs = ref.stubs()
        upload(rs, "crash", data)
        ref_id = rs.ft.CreateJob(req, timeout=10).id
        assert follow_events(rs, ref_id, timeout=120)[-1].type == "succeeded"
        rs.channel.close()
        ref_dir = ref.app.jobs.job_dir(ref_id)
    got, want = (d1 / "jobs" / job_id / "update.log").read_bytes(), (ref_dir / "update.log").read_bytes()
    assert len(got) == len(want) and got == want
    from safetensors.torch import load_file

    a = load_file(d1 / "jobs" / job_id / "adapter" / "adapter_model.safetensors")
    b = load_file(ref_dir / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ==== 4. Bad requests ================================================================================
def _gen(stubs: Stubs, **kw: Any) -> None:
    list(stubs.gen.Generate(G.GenerateRequest(**kw), timeout=10))


def _job(stubs: Stubs, method: int = Cm.TUNING_METHOD_LORA, dataset: str = "tiny", **hp: Any) -> None:
    stubs.ft.CreateJob(
        F.CreateJobRequest(
            method=method, training_dataset=dataset, hyperparameters=F.Hyperparameters(**{"steps": 1, **hp})
        ),
        timeout=10,
    )


def _upload(stubs: Stubs, *parts: F.UploadDatasetRequest) -> None:
    stubs.ft.UploadDataset(iter(parts), timeout=10)


def _import(stubs: Stubs, data: bytes) -> None:
    import_log(stubs, "garbage", data)


INV, NF, FP = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION
META = F.UploadDatasetRequest(metadata=F.DatasetMetadata(name="bad-upload"))
# (case id, call(stubs, finished job id), status code, text the message must contain)
BAD_REQUESTS: list[tuple[str, Any, grpc.StatusCode, str]] = [
    ("no-prompt", lambda s, j: _gen(s), INV, "prompt"),
    ("empty-text", lambda s, j: _gen(s, text=""), INV, "text"),
    ("token-id-past-vocab", lambda s, j: _gen(s, token_ids=G.TokenIds(ids=[1, VOCAB])), INV, "token_ids"),
    ("empty-token-ids", lambda s, j: _gen(s, token_ids=G.TokenIds()), INV, "token_ids"),
    (
        "negative-temperature",
        lambda s, j: _gen(s, text="5", sampling=G.SamplingParams(temperature=-1)),
        INV,
        "sampling.temperature",
    ),
    ("top-p-zero", lambda s, j: _gen(s, text="5", sampling=G.SamplingParams(top_p=0)), INV, "sampling.top_p"),
    (
        "top-p-above-one",
        lambda s, j: _gen(s, text="5", sampling=G.SamplingParams(top_p=1.5)),
        INV,
        "sampling.top_p",
    ),
    (
        "seed-above-int63",
        lambda s, j: _gen(s, text="5", sampling=G.SamplingParams(seed=2**63)),
        INV,
        "sampling.seed",
    ),
    (
        "max-new-tokens-past-server-limit",
        lambda s, j: _gen(s, text="5 6", stopping=G.StoppingCriteria(max_new_tokens=501)),
        INV,
        "stopping.max_new_tokens: at most 500",
    ),
    (
        "max-new-tokens-past-max-seq-len",
        lambda s, j: _gen(s, text=" ".join(["7"] * 20), stopping=G.StoppingCriteria(max_new_tokens=500)),
        INV,
        "stopping.max_new_tokens: prompt (20 tokens) + max_new_tokens (500) exceeds the maximum sequence",
    ),
    (
        "nan-time-limit",
        lambda s, j: _gen(s, text="5", stopping=G.StoppingCriteria(time_limit_seconds=math.nan)),
        INV,
        "stopping.time_limit_seconds",
    ),
    ("unknown-adapter", lambda s, j: _gen(s, text="5", adapter_id="no-such-adapter"), NF, "adapter_id"),
    (
        "chat-bad-role",
        lambda s, j: _gen(s, chat=G.Chat(messages=[G.ChatMessage(role="wizard", content="5")])),
        INV,
        "chat.messages[0].role",
    ),
    (
        "chat-without-template",
        lambda s, j: _gen(s, chat=G.Chat(messages=[G.ChatMessage(role="user", content="5")])),
        FP,
        "chat",
    ),
    ("job-method-unspecified", lambda s, j: _job(s, Cm.TUNING_METHOD_UNSPECIFIED), INV, "method"),
    ("job-zero-steps", lambda s, j: _job(s, steps=0), INV, "hyperparameters.steps"),
    ("job-dataset-path", lambda s, j: _job(s, dataset="../tiny"), INV, "training_dataset"),
    ("job-unknown-dataset", lambda s, j: _job(s, dataset="nope"), NF, "training_dataset"),
    ("job-nan-lr", lambda s, j: _job(s, learning_rate=math.nan), INV, "hyperparameters.learning_rate"),
    ("job-q-too-big", lambda s, j: _job(s, q=65), INV, "hyperparameters.q"),
    ("job-bad-lora-rank", lambda s, j: _job(s, lora=Cm.LoraConfig(r=100000)), INV, "hyperparameters.lora.r"),
    (
        "job-unknown-lora-target",
        lambda s, j: _job(s, lora=Cm.LoraConfig(target_modules=["nope_proj"])),
        INV,
        "hyperparameters.lora.target_modules",
    ),
    (
        "job-all-linear-not-alone",
        lambda s, j: _job(s, lora=Cm.LoraConfig(target_modules=["all-linear", "q_proj"])),
        INV,
        "hyperparameters.lora.target_modules",
    ),
    (
        "job-warmup-past-steps",
        lambda s, j: _job(s, steps=3, warmup_steps=4),
        INV,
        "hyperparameters.warmup_steps",
    ),
    (
        "upload-chunk-before-metadata",
        lambda s, j: _upload(s, F.UploadDatasetRequest(chunk=b"{}")),
        INV,
        "metadata",
    ),
    (
        "upload-bad-json-line",
        lambda s, j: _upload(s, META, F.UploadDatasetRequest(chunk=b'{"text": "1 2"}\n{"text": oops}\n')),
        INV,
        "line 2",
    ),
    (
        "upload-bad-name",
        lambda s, j: _upload(s, F.UploadDatasetRequest(metadata=F.DatasetMetadata(name="a/b"))),
        INV,
        "metadata.name",
    ),
    (
        "upload-existing-name",
        lambda s, j: _upload(
            s,
            F.UploadDatasetRequest(metadata=F.DatasetMetadata(name="tiny")),
            F.UploadDatasetRequest(chunk=b'{"text": "1 2"}'),
        ),
        grpc.StatusCode.ALREADY_EXISTS,
        "metadata.name",
    ),
    ("get-unknown-job", lambda s, j: s.ft.GetJob(F.GetJobRequest(job_id="job-nope")), NF, "job_id"),
    (
        "list-jobs-bad-page-token",
        lambda s, j: s.ft.ListJobs(F.ListJobsRequest(page_token="zzz")),
        INV,
        "page_token",
    ),
    ("list-jobs-bad-status", lambda s, j: s.ft.ListJobs(F.ListJobsRequest(statuses=[0])), INV, "statuses"),
    (
        "stream-events-unknown-job",
        lambda s, j: list(s.ft.StreamJobEvents(F.StreamJobEventsRequest(job_id="job-nope"), timeout=5)),
        NF,
        "job_id",
    ),
    (
        "export-unknown-id",
        lambda s, j: list(s.ad.ExportUpdateLog(A.ExportUpdateLogRequest(job_id="job-nope"), timeout=5)),
        NF,
        "job_id",
    ),
    (
        "export-no-source",
        lambda s, j: list(s.ad.ExportUpdateLog(A.ExportUpdateLogRequest(), timeout=5)),
        INV,
        "source",
    ),
    ("import-garbage", lambda s, j: _import(s, b"this is not an update log" * 10), INV, "chunk"),
    ("import-truncated-header", lambda s, j: _import(s, b"ZOLOG\0\x01\x00\xff\xff"), INV, "chunk"),
    (
        "import-torn-log",
        lambda s, j: _import(s, export_log(s, job_id=j)[:-3]),
        INV,
        "chunk: the log is damaged",
    ),
    (
        "delete-unknown-adapter",
        lambda s, j: s.ad.DeleteAdapter(A.DeleteAdapterRequest(adapter_id="nope")),
        NF,
        "adapter_id",
    ),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request(server: ThreadServer, stubs: Stubs, finished_job: dict[str, Any], case) -> None:
    _, call, code, field = case
    with pytest.raises(grpc.RpcError) as exc:
        call(stubs, finished_job["job"].id)
    details = exc.value.details()
    assert (exc.value.code(), field in details) == (code, True), details
    # The status details (google.rpc.Status): an ErrorInfo always, a BadRequest naming the field path.
    rich = status_details(exc.value.trailing_metadata())
    assert rich.get("reason"), rich
    path = field.split(":")[0]
    if re.fullmatch(r"[\w.\[\]]+", path):
        assert [v.field for v in rich.get("field_violations", ())] == [path], rich
    assert (
        server.cfg.data_dir not in details and server.cfg.engine.model_dir not in details
    )  # no server paths
    assert server.app.engine is not None and not server.app.inflight
    assert not (Path(server.cfg.data_dir) / "adapters" / "garbage").exists()


def test_server_with_nf4_codec_and_another_base(
    other_model_dir: Path, tmp_path: Path, server: ThreadServer, stubs: Stubs, finished_job: dict[str, Any]
) -> None:
    """Full-parameter jobs refuse a lossy codec; a log made on another base is refused at import."""
    cfg = server_config(
        other_model_dir,
        tmp_path / "data",
        engine=engine_config(other_model_dir, codec="nf4", cache_dir=tmp_path / "cache"),
    )
    with thread_server(cfg) as nf4:
        s = nf4.stubs()
        with pytest.raises(grpc.RpcError) as exc:
            _job(s, Cm.TUNING_METHOD_FULL)
        assert exc.value.code() == FP and "method" in exc.value.details() and "nf4" in exc.value.details()
        with pytest.raises(grpc.RpcError) as exc:
            import_log(s, "wrong-base", export_log(stubs, job_id=finished_job["job"].id))
        assert exc.value.code() == FP and "base" in exc.value.details()
        assert str(other_model_dir) not in exc.value.details()  # no server paths in messages
        assert not (Path(cfg.data_dir) / "adapters" / "wrong-base").exists()
        s.channel.close()


# ==== 5. Auth and TLS ================================================================================
def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate for localhost / 127.0.0.1 (cryptography, or the openssl CLI without it)."""
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        openssl = shutil.which("openssl")
        assert openssl, "a TLS test certificate needs the cryptography package or the openssl CLI"
        subprocess.run(
            [
                openssl,
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(key_path),
                "-out",
                str(cert_path),
                "-days",
                "1",
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost,IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def _reflection_services(channel: grpc.Channel, metadata=None) -> set[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    resp = next(iter(stub.ServerReflectionInfo(iter([req]), metadata=metadata, timeout=5)))
    return {s.name for s in resp.list_services_response.service}


def test_api_key_and_tls(model_dir: Path, tmp_path: Path) -> None:
    key = "k" * 24
    cert, pkey = self_signed(tmp_path)
    cfg = server_config(model_dir, tmp_path / "data", api_key=key, tls_cert=str(cert), tls_key=str(pkey))
    creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    with thread_server(cfg) as srv:
        channel = grpc.secure_channel(
            f"127.0.0.1:{srv.port}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
        )
        s = srv.stubs(channel)
        rpcs = {
            "GetModelInfo": lambda md: s.gen.GetModelInfo(G.GetModelInfoRequest(), metadata=md, timeout=5),
            "Generate": lambda md: list(s.gen.Generate(gen_request(n=2), metadata=md, timeout=10)),
            "ListJobs": lambda md: s.ft.ListJobs(F.ListJobsRequest(), metadata=md, timeout=5),
            "UploadDataset": lambda md: s.ft.UploadDataset(
                iter(
                    [
                        F.UploadDatasetRequest(metadata=F.DatasetMetadata(name="auth", overwrite=True)),
                        F.UploadDatasetRequest(chunk=b'{"text": "1 2 3"}'),
                    ]
                ),
                metadata=md,
                timeout=5,
            ),
            "ListAdapters": lambda md: s.ad.ListAdapters(A.ListAdaptersRequest(), metadata=md, timeout=5),
            "reflection": lambda md: _reflection_services(channel, md),
        }
        for name, call in rpcs.items():
            for md in (
                None,
                [("authorization", "Bearer wrong-key-wrong-key")],
                [("authorization", key)],
                [("authorization", f"Bearer {key}x")],
                [("authorization", f"bearer{key}")],
            ):
                with pytest.raises(grpc.RpcError) as exc:
                    call(md)
                assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED, (name, md)
                assert "authorization: Bearer" in exc.value.details()
            call([("authorization", f"Bearer {key}")])  # OK
        assert (
            s.gen.GetModelInfo(
                G.GetModelInfoRequest(), metadata=[("authorization", f"Bearer {key}")], timeout=5
            ).family
            == "llama"
        )
        # Health needs no key (load balancers probe it).
        assert (
            s.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            == health_pb2.HealthCheckResponse.SERVING
        )
        # A plaintext client cannot talk to the TLS port.
        plain = grpc.insecure_channel(f"127.0.0.1:{srv.port}")
        with pytest.raises(grpc.RpcError) as exc:
            srv.stubs(plain).gen.GetModelInfo(G.GetModelInfoRequest(), timeout=3)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        plain.close()
        channel.close()


# ==== 6. Reflection and health =======================================================================
def test_reflection_lists_the_services(server: ThreadServer, stubs: Stubs) -> None:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    db = ProtoReflectionDescriptorDatabase(stubs.channel)
    services = set(db.get_services())
    assert ZOSTREAM_SERVICES | {"grpc.health.v1.Health"} <= services
    pool = DescriptorPool(db)
    gen = pool.FindServiceByName("zostream.v1.TextGeneration")
    assert {"Generate", "Abort", "Tokenize", "GetModelInfo"} <= set(gen.methods_by_name)
    assert gen.methods_by_name["Generate"].output_type.full_name == "zostream.v1.GenerateResponse"
    assert "CreateJob" in pool.FindServiceByName("zostream.v1.FineTuning").methods_by_name


def test_health_goes_from_not_serving_to_serving(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = Engine.__init__
    loading = threading.Event()

    def slow_init(self, *a: Any, **kw: Any) -> None:
        loading.wait(10)  # the test releases it once it has seen NOT_SERVING
        original(self, *a, **kw)

    monkeypatch.setattr(Engine, "__init__", slow_init)
    with unready_thread_server(server_config(model_dir, tmp_path / "data")) as (app, ready, port):
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        s = Stubs(channel)
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        for svc in ("", *sorted(ZOSTREAM_SERVICES)):
            assert s.health.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5).status == not_serving
        # While loading, work is refused with a retryable status, not an internal error.
        with pytest.raises(grpc.RpcError) as exc:
            list(s.gen.Generate(gen_request(n=2), timeout=5))
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in exc.value.details()
        time.sleep(1.0)  # a slow load
        loading.set()
        assert ready.wait(30) and app.engine is not None
        wait_until(
            lambda: (
                s.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.SERVING
            ),
            10,
            "SERVING",
        )
        for svc in sorted(ZOSTREAM_SERVICES):
            assert (
                s.health.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        assert len(collect(s.gen.Generate(gen_request(n=2), timeout=10))[0]) == 2
        channel.close()


# ==== 7. Prometheus scrapes /metrics ================================================================
def dashboard_metrics() -> set[str]:
    path = ROOT / "deploy" / "grafana" / "zostream.json"
    assert path.exists(), f"{path} (the Grafana dashboard) is missing"
    names = set(re.findall(r"zostream_[a-z0-9_]+", path.read_text()))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


def prom_query(port: int, query: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def test_prometheus_scrapes_every_dashboard_metric(
    server: ThreadServer, stubs: Stubs, tmp_path: Path
) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (CI installs it: apt-get install -y prometheus)")
    names = dashboard_metrics()
    assert names, "the dashboard queries no zostream_ metric"
    web = free_port()
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: zostream\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{server.app.metrics.port}']}}]\n"
    )
    log = open(tmp_path / "prometheus.log", "wb")  # noqa: SIM115 - closed in finally
    prom = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        # Work for every panel while Prometheus starts: generations and a short LoRA job.
        for i in range(3):
            collect(stubs.gen.Generate(gen_request(f"{i + 4} 9", n=4, stream=True), timeout=30))
        upload(stubs, "prom", text_records(8))
        job = stubs.ft.CreateJob(lora_job_request("prom", 3, seed=3), timeout=10)
        assert follow_events(stubs, job.id)[-1].type == "succeeded"

        # A scrape after the job: Prometheus has every step the server has counted so far.
        steps_now = server.app.metrics.registry.get_sample_value(
            "zostream_finetune_steps_total", {"method": "lora"}
        )
        assert steps_now >= 3

        def scraped() -> bool:
            if prom.poll() is not None:
                raise AssertionError(
                    f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-2000:]}"
                )
            try:
                res = prom_query(web, 'zostream_finetune_steps_total{method="lora"}')
            except OSError:
                return False
            return bool(res) and float(res[0]["value"][1]) >= steps_now

        wait_until(scraped, 30, "Prometheus to scrape the job's steps", interval=0.2)
        unknown = names - set(Metrics.METRIC_NAMES)
        assert not unknown, f"the dashboard queries metrics the engine never exports: {sorted(unknown)}"
        # Device memory exists only on a CUDA engine (a CPU engine exports no such series).
        expected = names - (
            {"zostream_gpu_memory_bytes"} if server.app.engine.device.type == "cpu" else set()
        )
        missing = [n for n in sorted(expected) if not prom_query(web, f'{{__name__=~"{n}|{n}_count"}}')]
        assert not missing, f"the dashboard queries metrics Prometheus does not have: {missing}"
        up = prom_query(web, "zostream_engine_up")
        assert float(up[0]["value"][1]) == 1.0
        for q in (
            "zostream_time_to_first_token_seconds_count",
            "zostream_generation_tokens_total",
            'zostream_requests_total{finish_reason="max_tokens",api="grpc"}',
            "zostream_update_log_bytes_total",
        ):
            assert float(prom_query(web, q)[0]["value"][1]) > 0, q
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
            prom.wait(10)
        log.close()
