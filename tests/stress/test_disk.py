"""Storage faults: a full disk or a refused write while a job writes its data makes that job FAILED with a
clear error while the server keeps serving; a torn events.jsonl line is cut on restart; a truncated or
corrupt model file is refused at start with the tensor named.

The tests run as root, where chmod does not deny writes: refusals are injected by patching os.write /
os.open for paths inside the job directory (the calls the update log and the event log write through).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from tests.polling import wait_until
from tests.server.conftest import Stubs, server_config, thread_server
from zostream.engine.jobs import JobStore
from zostream.engine.update_log_tools import verify
from zostream.server.app import start_in_thread
from zostream.v1 import common_pb2 as Cm
from zostream.v1 import finetuning_pb2 as F
from zostream.v1 import generation_pb2 as G


def upload(s: Stubs, name: str = "d") -> None:
    data = "\n".join(
        json.dumps({"text": " ".join(str((i * 5 + j) % 90 + 1) for j in range(12))}) for i in range(16)
    )
    parts = [
        F.UploadDatasetRequest(metadata=F.DatasetMetadata(name=name)),
        F.UploadDatasetRequest(chunk=data.encode()),
    ]
    s.ft.UploadDataset(iter(parts), timeout=30)


def lora_job(s: Stubs, steps: int) -> str:
    hp = F.Hyperparameters(
        steps=steps,
        learning_rate=0.05,
        eps=0.05,
        batch_size=2,
        seed=3,
        max_len=32,
        checkpoint_every=10_000,
        lora=Cm.LoraConfig(r=2, alpha=4.0, target_modules=["q_proj"]),
    )
    return s.ft.CreateJob(
        F.CreateJobRequest(method=Cm.TUNING_METHOD_LORA, training_dataset="d", hyperparameters=hp), timeout=30
    ).id


def job(s: Stubs, job_id: str) -> F.Job:
    return s.ft.GetJob(F.GetJobRequest(job_id=job_id), timeout=10)


@contextlib.contextmanager
def refused(
    monkeypatch: pytest.MonkeyPatch, under: Path, err: int, call: str = "write", suffix: str = ""
) -> Iterator[list[str]]:
    """os.write (by the fd's path) or os.open (by path) fails with `err` for paths inside `under` ending in
    `suffix`; yields the paths hit."""
    hits: list[str] = []
    real = getattr(os, call)
    prefix = str(under.resolve()) + "/"

    def path_of(target: Any) -> str:
        if isinstance(target, int):
            try:
                return os.readlink(f"/proc/self/fd/{target}")
            except OSError:
                return ""
        return os.path.abspath(os.fspath(target))

    def patched(target: Any, *args: Any, **kw: Any) -> Any:
        p = path_of(target)
        if p.startswith(prefix) and p.endswith(suffix):
            hits.append(p)
            raise OSError(err, os.strerror(err), p if call == "open" else None)
        return real(target, *args, **kw)

    monkeypatch.setattr(os, call, patched)
    try:
        yield hits
    finally:
        monkeypatch.setattr(os, call, real)


def generate_in_thread(s: Stubs, n: int) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run() -> None:
        req = G.GenerateRequest(
            text="5 6 7", stream=True, stopping=G.StoppingCriteria(max_new_tokens=n, ignore_eos=True)
        )
        msgs = list(s.gen.Generate(req, timeout=120))
        out["tokens"] = sum(len(m.token_ids) for m in msgs)
        out["finish"] = msgs[-1].finish_reason

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_disk_full_fails_the_job_and_the_server_serves_on(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    with thread_server(server_config(tiny, data)) as srv:
        s = srv.stubs()
        upload(s)
        jid = lora_job(s, 100_000)
        wait_until(lambda: job(s, jid).progress.steps_done >= 2, 60, "two steps")
        gen, out = generate_in_thread(s, 120)  # generation in flight while the disk fills
        with refused(monkeypatch, data / "jobs" / jid, errno.ENOSPC) as hits:
            wait_until(lambda: job(s, jid).status == F.JOB_STATUS_FAILED, 30, "the job to fail")
            # The server serves while the disk is still full: a second generation completes.
            assert (
                sum(
                    len(m.token_ids)
                    for m in s.gen.Generate(
                        G.GenerateRequest(
                            text="8 9", stopping=G.StoppingCriteria(max_new_tokens=16, ignore_eos=True)
                        ),
                        timeout=60,
                    )
                )
                == 16
            )
        gen.join(120)
        assert out == {"tokens": 120, "finish": G.FINISH_REASON_MAX_TOKENS}  # not cut by the failure
        # The first write refused is the update-log append or, when the disk filled between a step's append
        # and its event line, that event; either way the job fails and its log stays whole (checked below).
        assert hits and hits[0].rsplit("/", 1)[1] in {"update.log", "events.jsonl"}, hits
        failed = job(s, jid)
        assert failed.error.code == "RESOURCE_EXHAUSTED"
        assert "No space left on device" in failed.error.message and str(tmp_path) not in failed.error.message
        # Every step the job reported is in its log, intact (the failed append left nothing behind).
        report = verify(data / "jobs" / jid / "update.log")
        assert report.ok and report.steps == failed.progress.steps_done
        # An RPC that writes the data dir on a full disk: RESOURCE_EXHAUSTED, no path in the message.
        from zostream.engine import jobs as jobs_module

        def full(path: Path, data: bytes) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

        monkeypatch.setattr(jobs_module, "_atomic_write", full)
        with pytest.raises(grpc.RpcError) as exc:
            upload(s, "another")
        assert (
            exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "no space left" in exc.value.details()
        )
        assert str(tmp_path) not in exc.value.details()
        monkeypatch.undo()
        # The disk has room again: the next job runs to the end.
        nxt = lora_job(s, 3)
        wait_until(lambda: job(s, nxt).status == F.JOB_STATUS_SUCCEEDED, 60, "the next job")
        s.channel.close()


def test_refused_write_fails_the_job_with_a_clear_error(
    tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    with thread_server(server_config(tiny, data)) as srv:
        s = srv.stubs()
        upload(s)
        with refused(monkeypatch, data / "jobs", errno.EACCES, call="open", suffix="/update.log") as hits:
            jid = lora_job(s, 5)
            wait_until(lambda: job(s, jid).status == F.JOB_STATUS_FAILED, 30, "the job to fail")
        failed = job(s, jid)
        assert hits and failed.error.code == "FAILED_PRECONDITION", failed.error
        assert "Permission denied" in failed.error.message
        assert f"jobs/{jid}/" in failed.error.message and str(tmp_path) not in failed.error.message
        last = lambda: s.ft.ListJobEvents(F.ListJobEventsRequest(job_id=jid)).events[-1].type  # noqa: E731
        wait_until(lambda: last() == "failed", 10, "the failed event")  # GetJob may see FAILED just before
        assert (
            s.health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        )
        msgs = s.gen.Generate(
            G.GenerateRequest(text="5", stopping=G.StoppingCriteria(max_new_tokens=4, ignore_eos=True)),
            timeout=30,
        )
        assert sum(len(m.token_ids) for m in msgs) == 4
        nxt = lora_job(s, 2)
        wait_until(lambda: job(s, nxt).status == F.JOB_STATUS_SUCCEEDED, 60, "the next job")
        s.channel.close()


def test_failing_job_goes_failed(tiny: Path, tmp_path: Path) -> None:
    """A job that cannot start (its dataset vanished) is FAILED with the reason, and the server serves on."""
    data = tmp_path / "data"
    with thread_server(server_config(tiny, data)) as srv:
        s = srv.stubs()
        upload(s)
        gate = threading.Event()  # hold the engine until the dataset is gone, so the job cannot start yet
        srv.app.engine.call_soon(lambda: gate.wait(60))
        try:
            jid = lora_job(s, 3)
            (data / "datasets" / "d.jsonl").unlink()
        finally:
            gate.set()
        wait_until(lambda: job(s, jid).status == F.JOB_STATUS_FAILED, 30, "the job to fail")
        err = job(s, jid).error
        assert err.code == "NOT_FOUND" and "no dataset 'd'" in err.message and err.field == "training_dataset"
        assert json.loads((data / "jobs" / jid / "status.json").read_text())["status"] == "failed"
        s.channel.close()


def test_a_status_is_on_disk_before_readers_see_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GetJob reads records without the store's lock: a status it can see must already be in status.json
    (else a crash right then would bring back the old status after a client was told the new one)."""
    import zostream.engine.jobs as jobs_mod

    store = JobStore(tmp_path)
    rec, _ = store.create({"method": "lora", "hyperparameters": {}})
    seen: list[str] = []
    real = jobs_mod._atomic_write

    def spy(path: Path, data: bytes) -> None:
        if path.name == "status.json":
            seen.append(rec.status)  # what a lock-free reader sees while the file is being written
        real(path, data)

    monkeypatch.setattr(jobs_mod, "_atomic_write", spy)
    store.set_status(rec, "running")
    store.set_status(rec, "failed", error={"code": "INTERNAL", "message": "x"})
    assert seen == ["queued", "running"] and rec.status == "failed" and rec.finished_at
    assert json.loads((tmp_path / "jobs" / rec.id / "status.json").read_text())["status"] == "failed"


def test_torn_event_line_is_cut_on_restart(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    rec, _ = store.create({"method": "lora", "hyperparameters": {}})
    store.event(rec.id, "step", "", 1)
    path = tmp_path / "jobs" / rec.id / "events.jsonl"
    with open(path, "ab") as f:
        f.write(b'{"id": 3, "job_id": "' + rec.id.encode() + b'", "ty')  # killed mid-append
    again = JobStore(tmp_path)
    ev = again.event(rec.id, "resumed", "after the crash")
    lines = path.read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == [1, 2, 3] and ev["id"] == 3
    assert [e["type"] for e in again.events(rec.id)] == ["created", "step", "resumed"]


# ---- the model file ----------------------------------------------------------------------------------
def header(path: Path) -> tuple[dict, int]:
    raw = path.read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    return json.loads(raw[8 : 8 + n]), n


def start_failing(model: Path, data: Path) -> Any:
    app, stop = start_in_thread(server_config(model, data), timeout=60)
    try:
        assert app.engine is None and app.engine_error
        channel = grpc.insecure_channel(f"127.0.0.1:{app.bound_port}")
        s = Stubs(channel)
        assert (
            s.health.Check(health_pb2.HealthCheckRequest()).status
            == health_pb2.HealthCheckResponse.NOT_SERVING
        )
        with pytest.raises(grpc.RpcError) as exc:
            s.gen.GetModelInfo(G.GetModelInfoRequest(), timeout=10)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        channel.close()
        return app.engine_error, exc.value.details()
    finally:
        stop()
        app.metrics.close()


@pytest.mark.parametrize("damage", ["truncated", "dtype", "offsets"])
def test_damaged_model_is_refused_at_start_with_the_tensor_named(
    tiny: Path, tmp_path: Path, damage: str
) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny, model)
    st = model / "model.safetensors"
    hdr, n = header(st)
    tensors = {k: v for k, v in hdr.items() if k != "__metadata__"}
    if damage == "truncated":
        # The independent reference: the tensor whose data ends last is the one the cut leaves short.
        want = max(tensors, key=lambda k: tensors[k]["data_offsets"][1])
        os.truncate(st, st.stat().st_size - 7)
    else:
        want = "model.layers.1.self_attn.q_proj.weight"
        if damage == "dtype":
            hdr[want]["dtype"] = "F16"  # half the bytes its offsets span
        else:
            a, b = hdr[want]["data_offsets"]
            hdr[want]["data_offsets"] = [a, b + 4]
        blob = json.dumps(hdr).encode()
        raw = st.read_bytes()
        st.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])
    error, details = start_failing(model, tmp_path / "data")
    assert want in error and want in details, (error, details)
