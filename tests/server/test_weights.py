"""Weights in and out through the API, checked with peft itself.

- An adapter made by peft in the test imports (ImportPeftAdapter) and serves: Generate's logprobs
  equal the PeftModel's log_softmax.
- A job's adapter downloaded through DownloadWeights loads with PeftModel.from_pretrained and gives
  the logits Generate uses (fp32, 1e-4); checkpoints and a FULL job's result download too.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import grpc
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.server.conftest import ThreadServer, server_config, thread_server
from zostream.clients.client import ZostreamClient
from zostream.clients.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

peft = pytest.importorskip("peft")
TOL = 1e-4
PROMPT = "4 8 15 16 23"


def base(model_dir: Path):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def make_peft_adapter(
    model_dir: Path, out: Path, r: int = 4, targets: tuple[str, ...] | str = ("q_proj", "v_proj")
) -> Path:
    torch.manual_seed(0)
    targets = targets if isinstance(targets, str) else list(targets)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    model = peft.get_peft_model(base(model_dir), cfg)
    model.save_pretrained(out)
    return out


def check_generate_matches(c: ZostreamClient, model, adapter_id: str) -> None:
    """Generate's prompt and token logprobs (with adapter_id) equal `model`'s log_softmax."""
    r = c.generate(
        PROMPT,
        adapter_id=adapter_id,
        max_new_tokens=4,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=5,
        prompt_logprobs=True,
    )
    prompt = c.tokenize(PROMPT)
    seq = prompt + list(r.token_ids)
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), dim=-1)
    for j, x in enumerate(r.prompt_logprobs):
        assert abs(x.logprob - want[j, prompt[j + 1]].item()) < TOL
    for k, x in enumerate(r.logprobs):
        row = want[len(prompt) - 1 + k]
        assert x.token_id == int(row.argmax())  # greedy
        assert torch.allclose(torch.tensor([v for _, v in x.top]), row.topk(5).values, atol=TOL)


def wait_job(c: ZostreamClient, job_id: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        job = c.get_job(job_id)
        if job["status"] in ("JOB_STATUS_SUCCEEDED", "JOB_STATUS_FAILED", "JOB_STATUS_CANCELLED"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job did not finish: {c.get_job(job_id)['status']}")


@pytest.fixture(scope="module")
def client(server: ThreadServer):
    with ZostreamClient(f"127.0.0.1:{server.port}") as c:
        yield c


@pytest.fixture(scope="module")
def dataset(client: ZostreamClient) -> str:
    data = b"".join(b'{"prompt": "%d %d", "completion": " %d"}\n' % (i, i + 1, i + 2) for i in range(1, 30))
    client.upload_dataset("w", data)
    return "w"


def test_peft_made_adapter_imports_and_serves(
    client: ZostreamClient, model_dir: Path, tmp_path: Path
) -> None:
    d = make_peft_adapter(model_dir, tmp_path / "peft")
    ad = client.import_peft(d, adapter_id="from-peft")
    assert ad["id"] == "from-peft" and ad["lora"]["r"] == 4 and ad["status"] == "ADAPTER_STATUS_READY"
    assert any(a["id"] == "from-peft" for a in client.list_adapters())
    ref = peft.PeftModel.from_pretrained(base(model_dir), d).eval()
    check_generate_matches(client, ref, "from-peft")
    # and it downloads back as files PeftModel loads, giving the same logits
    out = tmp_path / "back"
    assert sorted(client.download_weights(out, adapter_id="from-peft")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    check_generate_matches(client, peft.PeftModel.from_pretrained(base(model_dir), out).eval(), "from-peft")


def test_peft_adapter_targeted_by_a_pattern_imports_and_serves(
    client: ZostreamClient, model_dir: Path, tmp_path: Path
) -> None:
    """PEFT keeps a string target_modules as the pattern it was given; the import reads it as PEFT does
    (fullmatched against module names) and serves PEFT's logits."""
    d = make_peft_adapter(model_dir, tmp_path / "pattern", targets=r".*\.(k_proj|o_proj)")
    ad = client.import_peft(d, adapter_id="from-pattern")
    assert sorted(ad["lora"]["target_modules"]) == ["k_proj", "o_proj"]
    check_generate_matches(client, peft.PeftModel.from_pretrained(base(model_dir), d).eval(), "from-pattern")


def test_an_import_cut_short_by_a_crash_is_not_served_after_restart(model_dir: Path, tmp_path: Path) -> None:
    """A crash between staging an import (adapters/<id>.importing/) and its rename leaves a directory that
    was never acknowledged: the next start removes it and serves only the adapters that were imported."""
    data = tmp_path / "data"
    for name in ("kept", "cut.importing"):
        make_peft_adapter(model_dir, data / "adapters" / name / "adapter")
    with thread_server(server_config(model_dir, data)) as srv, ZostreamClient(f"127.0.0.1:{srv.port}") as c:
        ids = {a["id"] for a in c.list_adapters()}
    assert "kept" in ids and not any("importing" in i for i in ids), ids
    assert not (data / "adapters" / "cut.importing").exists()


def test_import_refuses_an_adapter_that_does_not_fit(
    client: ZostreamClient, model_dir: Path, tmp_path: Path
) -> None:
    d = make_peft_adapter(model_dir, tmp_path / "bad")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["r"] = 8  # the tensors are rank 4
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArgumentError) as exc:
        client.import_peft(d, adapter_id="bad-fit")
    assert exc.value.field == "file" and str(tmp_path) not in exc.value.message
    assert "bad-fit" not in [a["id"] for a in client.list_adapters()]


def test_job_adapter_and_checkpoint_download(
    client: ZostreamClient, dataset: str, model_dir: Path, tmp_path: Path
) -> None:
    job = client.create_job(
        "lora", dataset, steps=3, checkpoint_every=1, batch_size=2, learning_rate=0.05, eps=0.05, seed=1
    )
    with pytest.raises((FailedPreconditionError, NotFoundError)):
        client.download_weights(tmp_path / "early", job_id=job["id"], checkpoint="step-999999")
    done = wait_job(client, job["id"])
    assert done["status"] == "JOB_STATUS_SUCCEEDED"
    out = tmp_path / "job"
    client.download_weights(out, job_id=job["id"])
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert "/" not in cfg.get("base_model_name_or_path", "")  # never a server path
    check_generate_matches(client, peft.PeftModel.from_pretrained(base(model_dir), out).eval(), job["id"])
    cp = tmp_path / "cp"
    client.download_weights(cp, job_id=job["id"], checkpoint="step-000002")
    assert (cp / "adapter_model.safetensors").stat().st_size > 0


def test_full_job_result_downloads_as_a_model_directory(
    client: ZostreamClient, dataset: str, tmp_path: Path
) -> None:
    job = client.create_job("full", dataset, steps=1, batch_size=2, seed=2)
    assert wait_job(client, job["id"])["status"] == "JOB_STATUS_SUCCEEDED"
    out = tmp_path / "full"
    names = client.download_weights(out, job_id=job["id"])
    assert "config.json" in names and any(n.endswith(".safetensors") for n in names)
    AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)  # a loadable HF directory


def test_get_and_delete_datasets_and_jobs(client: ZostreamClient, stubs, tmp_path: Path) -> None:
    from zostream.v1 import finetuning_pb2 as F

    client.upload_dataset("gone", b'{"prompt": "1 2", "completion": " 3"}\n' * 4)
    ds = stubs.ft.GetDataset(F.GetDatasetRequest(name="gone"), timeout=10)
    assert (ds.name, ds.num_records) == ("gone", 4)
    job = client.create_job("lora", "gone", steps=2, batch_size=2, seed=4)
    assert wait_job(client, job["id"])["status"] == "JOB_STATUS_SUCCEEDED"
    assert any(a["id"] == job["id"] for a in client.list_adapters())
    stubs.ft.DeleteDataset(F.DeleteDatasetRequest(name="gone"), timeout=10)  # finished jobs keep records
    with pytest.raises(grpc.RpcError) as nf:
        stubs.ft.GetDataset(F.GetDatasetRequest(name="gone"), timeout=10)
    assert nf.value.code() == grpc.StatusCode.NOT_FOUND
    stubs.ft.DeleteJob(F.DeleteJobRequest(job_id=job["id"]), timeout=10)
    with pytest.raises(NotFoundError):
        client.get_job(job["id"])
    assert all(a["id"] != job["id"] for a in client.list_adapters())
    with pytest.raises(grpc.RpcError) as again:
        stubs.ft.DeleteJob(F.DeleteJobRequest(job_id=job["id"]), timeout=10)
    assert again.value.code() == grpc.StatusCode.NOT_FOUND


def test_delete_dataset_in_use_is_refused(client: ZostreamClient, stubs, dataset: str) -> None:
    from zostream.v1 import finetuning_pb2 as F

    job = client.create_job("lora", dataset, steps=100_000, batch_size=2, seed=5)
    deadline = time.monotonic() + 60  # running (a cancel racing the job's start is another matter)
    while client.get_job(job["id"])["progress"].get("steps_done", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        with pytest.raises(grpc.RpcError) as exc:
            stubs.ft.DeleteDataset(F.DeleteDatasetRequest(name=dataset), timeout=10)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.RpcError) as exc:
            stubs.ft.DeleteJob(F.DeleteJobRequest(job_id=job["id"]), timeout=10)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        stubs.ft.CancelJob(F.CancelJobRequest(job_id=job["id"]), timeout=10)
        wait_job(client, job["id"])


def test_cli_datasets_adapters_download_import_peft_jobs_delete(
    server: ThreadServer, client: ZostreamClient, dataset: str, model_dir: Path, tmp_path: Path, capsys
) -> None:
    from zostream.clients import cli

    addr = ["--server", f"127.0.0.1:{server.port}"]
    data = tmp_path / "cli-ds.jsonl"
    data.write_text('{"prompt": "1 2", "completion": " 3"}\n' * 3)
    assert cli.main(["datasets", "upload", str(data), *addr, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_records"] == 3
    assert cli.main(["datasets", "get", "cli-ds", *addr, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "cli-ds"
    assert cli.main(["datasets", "list", *addr, "--json"]) == 0
    assert "cli-ds" in [d["name"] for d in json.loads(capsys.readouterr().out)]
    assert cli.main(["datasets", "delete", "cli-ds", *addr]) == 0
    assert cli.main(["datasets", "get", "cli-ds", *addr]) == 1  # NOT_FOUND, reported
    capsys.readouterr()

    peft_dir = make_peft_adapter(model_dir, tmp_path / "cli-peft")
    assert cli.main(["adapters", "import-peft", str(peft_dir), "--id", "cli-peft", *addr, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "cli-peft"
    out = tmp_path / "cli-out"
    assert cli.main(["adapters", "download", "cli-peft", "--out", str(out), *addr, "--json"]) == 0
    assert sorted(json.loads(capsys.readouterr().out)["files"]) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    ours = peft.PeftModel.from_pretrained(base(model_dir), out).eval()
    check_generate_matches(client, ours, "cli-peft")

    job = client.create_job("lora", dataset, steps=1, batch_size=2, seed=8)
    wait_job(client, job["id"])
    assert cli.main(["jobs", "delete", job["id"], *addr]) == 0
    with pytest.raises(NotFoundError):
        client.get_job(job["id"])


def test_any_step_downloads_and_exports_upto(client: ZostreamClient, dataset: str, tmp_path: Path) -> None:
    """DownloadWeights / ExportUpdateLog `upto`: the weights replayed to step N equal the checkpoint the
    trainer saved at N (an independent path: the trainer's tensors vs a replay from the base)."""
    from safetensors.torch import load_file

    from zostream.engine.update_log import UpdateLog

    job = client.create_job(
        "lora", dataset, steps=3, checkpoint_every=1, batch_size=2, learning_rate=0.05, eps=0.05, seed=5
    )
    assert wait_job(client, job["id"])["status"] == "JOB_STATUS_SUCCEEDED"
    client.download_weights(tmp_path / "cp", job_id=job["id"], checkpoint="step-000002")
    client.download_weights(tmp_path / "two", job_id=job["id"], upto=2)
    client.download_weights(tmp_path / "all", job_id=job["id"], upto=3)
    client.download_weights(tmp_path / "res", job_id=job["id"])
    for a, b in (("cp", "two"), ("res", "all")):
        x = load_file(tmp_path / a / "adapter_model.safetensors")
        y = load_file(tmp_path / b / "adapter_model.safetensors")
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert json.loads((tmp_path / "two" / "adapter_config.json").read_text())["r"] == 8
    with pytest.raises(InvalidArgumentError) as err:
        client.download_weights(tmp_path / "x", job_id=job["id"], upto=4)
    assert err.value.field == "upto"
    with pytest.raises(InvalidArgumentError):
        client.download_weights(tmp_path / "y", job_id=job["id"], upto=1, checkpoint="step-000002")
    whole = client.export_update_log(job_id=job["id"])
    two = client.export_update_log(job_id=job["id"], upto=2)
    (tmp_path / "two.log").write_bytes(two)
    with UpdateLog.open(tmp_path / "two.log", repair=False) as log:
        assert len(log) == 2 and not log.damage
    q = job["hyperparameters"]["q"]  # records per step: one 20-byte record per direction (format 3)
    assert two == whole[: len(whole) - 20 * q]  # a plain log's prefix


def test_keep_best_and_early_stopping_jobs(client: ZostreamClient, tmp_path: Path) -> None:
    recs = [{"prompt": f"{i} {i + 1}", "candidates": [" a", " b"], "answer": i % 2} for i in range(12)]
    client.upload_dataset("choices", "".join(json.dumps(r) + "\n" for r in recs).encode())
    with pytest.raises(InvalidArgumentError) as err:
        client.create_job("lora", "choices", steps=4, keep_best=True)
    assert err.value.field == "hyperparameters.keep_best"
    with pytest.raises(InvalidArgumentError) as err:
        client.create_job("lora", "choices", validation_dataset="choices", steps=4, early_stopping_patience=1)
    assert err.value.field == "hyperparameters.early_stopping_patience"
    job = client.create_job(
        "lora",
        "choices",
        validation_dataset="choices",
        steps=12,
        batch_size=2,
        learning_rate=0.5,
        eps=0.05,
        seed=3,
        eval_every=1,
        keep_best=True,
        early_stopping_patience=2,
    )
    assert job["hyperparameters"]["keep_best"] and job["hyperparameters"]["early_stopping_patience"] == 2
    done = wait_job(client, job["id"])
    assert done["status"] == "JOB_STATUS_SUCCEEDED", done
    events = list(client.job_events(job["id"]))
    acc = [(e["step"], e["metrics"]["eval_accuracy"]) for e in events if e["type"] == "eval"]
    # The rules, written out: the first highest accuracy is the best; stop at the 2nd miss in a row.
    best, misses, stop = acc[0], 0, None
    for step, a in acc[1:]:
        best, misses = ((step, a), 0) if a > best[1] else (best, misses + 1)
        if misses == 2:
            stop = step
            break
    assert int(done["progress"].get("steps_done", 0)) == (stop if stop is not None else 12)
    assert ("early_stop" in [e["type"] for e in events]) == (stop is not None)
    assert [e["step"] for e in events if e["type"] == "best"][-1] == best[0]
    client.download_weights(tmp_path / "res", job_id=job["id"])
    client.download_weights(tmp_path / "best", job_id=job["id"], upto=best[0])
    x = load_peft_tensors(tmp_path / "res")
    y = load_peft_tensors(tmp_path / "best")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def load_peft_tensors(d: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(d / "adapter_model.safetensors")


def test_a_server_job_and_zostream_train_run_one_lifecycle(
    client: ZostreamClient, server: ThreadServer, model_dir: Path, tmp_path: Path, capsys
) -> None:
    """The same job through the API and through `zostream train` (one lifecycle, engine/session.py):
    the same update-log records, the same held-out evaluations, the same best step and the same
    exported adapter bits."""
    from safetensors.torch import load_file

    from zostream.clients import cli

    recs = [{"prompt": f"{i} {i + 1}", "candidates": [" 3", " 4"], "answer": i % 2} for i in range(1, 13)]
    data = "".join(json.dumps(r) + "\n" for r in recs).encode()
    client.upload_dataset("same", data)
    (tmp_path / "same.jsonl").write_bytes(data)
    hp = dict(batch_size=2, learning_rate=0.5, eps=0.05, seed=3, eval_every=2, keep_best=True, q=1)
    job = client.create_job("lora", "same", validation_dataset="same", steps=6, estimator="mezo", **hp)
    assert wait_job(client, job["id"])["status"] == "JOB_STATUS_SUCCEEDED"
    argv = [
        "train",
        "--model",
        model_dir,
        "--data",
        tmp_path / "same.jsonl",
        "--eval",
        tmp_path / "same.jsonl",
    ]
    argv += ["--method", "lora", "--out", tmp_path / "cli", "--steps", 6, "--batch-size", 2, "--lr", 0.5]
    argv += ["--eps", 0.05, "--seed", 3, "--eval-every", 2, "--keep-best", "--q", 1, "--estimator", "mezo"]
    argv += ["--device", "cpu", "--dtype", "float32", "--json"]
    assert cli.main([str(a) for a in argv]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    server_log = (server.app.jobs.job_dir(job["id"]) / "update.log").read_bytes()
    cli_log = (tmp_path / "cli" / "update.log").read_bytes()
    assert server_log[-20 * 6 :] == cli_log[-20 * 6 :]  # the six steps' records (20 bytes each)
    events = list(client.job_events(job["id"]))
    server_evals = [(e["step"], e["metrics"]["eval_accuracy"]) for e in events if e["type"] == "eval"]
    rows = [json.loads(x) for x in (tmp_path / "cli" / "metrics.jsonl").read_text().splitlines()]
    cli_evals = [(r["step"], r["accuracy"]) for r in rows if r["type"] == "eval"]
    assert [s for s, _ in server_evals] == [s for s, _ in cli_evals] == [0, 2, 4, 6]
    assert server_evals == cli_evals
    best = [e["step"] for e in events if e["type"] == "best"][-1]
    assert summary["best_step"] == summary["output_step"] == best  # (step 4 of 6 on the CI machine)
    metrics = client.get_job(job["id"])["metrics"]
    assert int(metrics["best_step"]) == int(metrics["result_step"]) == best
    client.download_weights(tmp_path / "srv", job_id=job["id"])
    a = load_file(tmp_path / "srv" / "adapter_model.safetensors")
    b = load_file(tmp_path / "cli" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
