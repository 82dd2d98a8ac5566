"""A full-parameter job's master kept in master_dir (a tmpfs such as /dev/shm, so CUDA can register it).

Expected weights come from the textbook MeZO loop written in tests/engine/test_trainer.py (an
independent reference); the jobs run on the emulated device with every block streamed, so the master
really travels: uploads from the master_dir mapping and write-backs into it."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.engine import test_trainer as T
from tests.engine.test_trainer import assert_same_tensors, base_cfg, crash, exported
from zostream.engine import working_copy
from zostream.engine.config import StreamConfig
from zostream.engine.emu import EmuDevice
from zostream.engine.errors import RequestError
from zostream.engine.finetune import export, open_trainer
from zostream.engine.jobs import JobStore
from zostream.engine.store import WeightStore
from zostream.engine.streamer import LayerStreamer
from zostream.engine.working_copy import WorkingCopy

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return T.model_factory(tmp_path_factory.mktemp("models"))("llama")


def run(model: Path, job: Path, master_dir: Path, steps: int, finish: bool = True):
    store = WeightStore(model)
    sc = StreamConfig(gpu_memory_bytes=0, master_dir=str(master_dir))
    dev = EmuDevice()
    base = LayerStreamer(store, CPU, torch.float32, sc, emu=dev)
    tr = open_trainer(base_cfg("full", steps=6), job, store, T.DATA, T.PAD, CPU, torch.float32, base, sc)
    while tr.step < steps:
        tr.run_step()
    if finish:
        export(tr, job)
    assert dev.violations == []
    return tr


def test_master_lives_in_master_dir_and_resumes_after_a_kill(model, tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    crash(run(model, tmp_path / "job", shm, 3, finish=False))
    link = tmp_path / "job" / "working"
    assert link.is_symlink()
    target = Path(os.readlink(link))
    assert target.parent == shm.resolve() and (target / "model.safetensors").is_file()
    assert not any(
        p.is_file() and p.stat().st_size > 4096
        for p in (tmp_path / "job").rglob("*")
        if "working" not in str(p)
    )
    tr = run(model, tmp_path / "job", shm, 6)  # the kill leaves the shared memory: resumes from it
    assert_same_tensors(
        exported(tmp_path / "job", "full"), T.TextbookMeZO(model, base_cfg("full", steps=6)).run(6).master
    )
    tr.log.close()


def test_after_a_restart_the_master_is_rebuilt_from_the_base_and_the_log(model, tmp_path):
    shm = tmp_path / "shm"
    shm.mkdir()
    crash(run(model, tmp_path / "job", shm, 3, finish=False))
    shutil.rmtree(Path(os.readlink(tmp_path / "job" / "working")))  # a restart empties the tmpfs
    tr = run(model, tmp_path / "job", shm, 5)
    want = T.TextbookMeZO(model, base_cfg("full", steps=6)).run(5).master
    assert_same_tensors(exported(tmp_path / "job", "full"), want)
    tr.log.close()


def test_a_master_dir_without_room_or_missing_is_refused_by_name(model, tmp_path, monkeypatch):
    store = WeightStore(model)
    with pytest.raises(RequestError, match="master_dir: .* is not a directory"):
        WorkingCopy(tmp_path / "job" / "working", store, torch.float32, tmp_path / "nowhere")
    shm = tmp_path / "shm"
    shm.mkdir()
    (tmp_path / "job").mkdir()
    monkeypatch.setattr(working_copy.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10, 10, 10))
    with pytest.raises(
        RequestError, match=r"master_dir: the full-parameter master needs .* GB .* 0\.00 GB free"
    ):
        WorkingCopy(tmp_path / "job" / "working", store, torch.float32, shm)


def test_deleting_the_job_frees_its_master(model, tmp_path):
    jobs = JobStore(tmp_path / "data")
    rec, _ = jobs.create({"method": "full"})
    shm = tmp_path / "shm"
    shm.mkdir()
    wc = WorkingCopy(jobs.job_dir(rec.id) / "working", WeightStore(model), torch.float32, shm)
    assert wc.dir.parent == shm.resolve() and any(shm.iterdir())
    jobs.set_status(rec, "cancelled")
    jobs.delete_job(rec.id)
    assert not any(shm.iterdir()) and not jobs.job_dir(rec.id).exists()
