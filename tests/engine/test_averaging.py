"""Iterate averaging (engine/averaging.py): a LoRA job evaluates, exports, checkpoints and replays the EMA of
its factors, bitwise a plain loop's average, across resumes from checkpoints with and without the average.

The references share no code with the engine: numpy float32 for the update rule, and the textbook MeZO loop
of test_trainer.py (its own forwards, noise application and EMA) for whole jobs.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.engine.test_trainer import (
    TextbookMeZO,
    assert_same_tensors,
    base_cfg,
    exported,
    open_job,
)
from zostream.engine.averaging import Average
from zostream.engine.config import ZOConfig
from zostream.engine.finetune import checkpoint, export
from zostream.engine.replay import replay


def test_update_is_numpy_float32_bitwise():
    """ā ← β ā + (1 - β) θ, each product and the sum rounded to float32 on its own, on any CPU."""
    g = torch.Generator().manual_seed(3)
    avg = {"a": torch.randn(1000, generator=g), "b": torch.randn(7, 9, generator=g) * 1e-3}
    want = {n: t.numpy().copy() for n, t in avg.items()}
    for decay in (0.95, 0.9, 0.999):
        av = Average(decay)
        beta, rest = np.float32(decay), np.float32(1.0 - decay)
        for _ in range(5):
            theta = {n: torch.randn(t.shape, generator=g) for n, t in avg.items()}
            av.update(avg, theta)
            for n, w in want.items():
                prod = (theta[n].numpy() * rest).astype(np.float32)
                want[n] = (w * beta).astype(np.float32) + prod
        for n, w in want.items():
            assert np.array_equal(avg[n].numpy().view(np.int32), w.view(np.int32)), (decay, n)


def test_header_entry_and_bad_values():
    av = Average(0.95)
    assert Average.from_header({"average": av.header_entry()}) == av
    assert Average.from_header({}) is None  # a log from before averages: the job serves its iterates
    assert Average.of(0) is None and Average.of(0.5) == Average(0.5)
    assert av.window == pytest.approx(20.0)
    for bad in ({"kind": "swa", "decay": 0.9}, {"decay": 0.9}, [0.9], {"kind": "ema", "decay": 1.5}):
        with pytest.raises(ValueError, match="average"):
            Average.from_header({"average": bad})
    for decay in (1.0, -0.1, True):
        with pytest.raises(ValueError, match="average_decay"):
            ZOConfig(average_decay=decay)
    with pytest.raises(ValueError, match="average_decay: a full-parameter job keeps no average"):
        ZOConfig(method="full", average_decay=0.9)
    assert ZOConfig().average == 0.9 and ZOConfig(method="full").average == 0.0
    assert ZOConfig(average_decay=0).average == 0.0


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.95])
def test_export_and_replay_are_the_textbook_average(models, tmp_path, decay):
    """The export after 5 steps, the log replayed, and `--upto 3` replayed: the textbook loop's average of
    its iterates at 5 / 5 / 3 steps (decay 0: its last iterate)."""
    model = models("llama")
    cfg = base_cfg("lora", steps=5, lr=5e-2, average_decay=decay)
    tr = open_job(model, tmp_path / "job", cfg)
    for _ in range(cfg.steps):
        tr.run_step()
    export(tr, tmp_path / "job")
    tr.log.close()
    ref5 = TextbookMeZO(model, cfg).run(5)
    assert_same_tensors(exported(tmp_path / "job", "lora"), ref5.served())
    if decay:  # the average is not the last iterate (the check above is not factors vs factors)
        assert not torch.equal(ref5.served()[next(iter(ref5.master))], ref5.master[next(iter(ref5.master))])
        moved = [n for n in ref5.master if ".lora_B." in n]
        assert all(not torch.equal(ref5.served()[n], ref5.master[n]) for n in moved)
    log = tmp_path / "job" / "update.log"
    for upto, ref in ((None, ref5), (3, TextbookMeZO(model, cfg).run(3))):
        out = replay(model, log, tmp_path / f"replay-{upto}", upto=upto)
        assert_same_tensors(load_file(out / "adapter_model.safetensors"), ref.served())


@pytest.mark.parametrize("drop_average", [False, True])
def test_resume_from_a_checkpoint_is_bitwise_uninterrupted(models, tmp_path, drop_average):
    """Checkpoints at steps 2 and 4, the process gone after step 5 (not flushed), reopened and run to 8:
    the export is the textbook average at 8. drop_average: the checkpoints lack their factors/ (damaged),
    so the job resumes from the initial factors and catches up on the whole log."""
    model = models("llama")
    cfg = base_cfg("lora", steps=8, lr=5e-2, average_decay=0.9)
    job = tmp_path / "job"
    tr = open_job(model, job, cfg)
    for s in range(5):
        tr.run_step()
        if s + 1 in (2, 4):
            checkpoint(tr, job)
    tr.log.close()  # killed: step 5's update never applied to the factors or the average
    ckpts = sorted((job / "checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-000002", "step-000004"]
    assert all((p / "factors" / "adapter_model.safetensors").exists() for p in ckpts)
    # The checkpoint itself is what the job served at that step: the textbook average at 4 steps.
    assert_same_tensors(
        load_file(ckpts[1] / "adapter_model.safetensors"), TextbookMeZO(model, cfg).run(4).served()
    )
    if drop_average:
        for p in ckpts:
            shutil.rmtree(p / "factors")
    tr = open_job(model, job, cfg)
    assert tr.step == 5
    while not tr.done:
        tr.run_step()
    export(tr, job)
    tr.log.close()
    assert_same_tensors(exported(job, "lora"), TextbookMeZO(model, cfg).run(8).served())


def kill_and_resume(model: Path, job: Path, first: ZOConfig, again: ZOConfig) -> dict[str, torch.Tensor]:
    """Run `first` for 2 of its 4 steps, then reopen the job with `again` (the CLI's settings check,
    resume_config, must let it) and run it to the end: the export."""
    from zostream.engine.resume import resume_config
    from zostream.engine.store import WeightStore

    tr = open_job(model, job, first)
    for _ in range(2):
        tr.run_step()
    tr.log.close()
    assert resume_config(again, WeightStore(model), job / "update.log") == again
    tr = open_job(model, job, again)
    while not tr.done:
        tr.run_step()
    export(tr, job)
    tr.log.close()
    return exported(job, "lora")


@pytest.mark.parametrize("started, resumed", [(0.5, 0.0), (0.0, 0.9)])
def test_a_job_keeps_the_average_it_started_with(models, tmp_path, started, resumed):
    """Resumed with another decay (or with none), a job serves the average its log's header records; one
    started without an average (as every job before averages existed) resumes under today's default and
    keeps serving its iterate."""
    model = models("llama")
    first = base_cfg("lora", steps=4, lr=5e-2, average_decay=started)
    again = dataclasses.replace(first, average_decay=resumed)
    got = kill_and_resume(model, tmp_path / "job", first, again)
    assert_same_tensors(got, TextbookMeZO(model, first).run(4).served())


@pytest.mark.parametrize("started, resumed", [(3.0, 1.0), (1.0, 3.0)])
def test_a_job_keeps_the_lora_init_it_started_with(models, tmp_path, started, resumed):
    """The A factors' init scale is in the log's scope (absent at 1: logs of PEFT's init keep their header):
    a job resumed with another --lora-init-scale replays and trains on from the factors it started with;
    the export is the textbook run (its own init, test_trainer.lora_init) at that scale, and replaying the
    log gives the same adapter."""
    from zostream.engine.update_log import read_header

    model = models("llama")
    job: Path = tmp_path / "job"
    first = base_cfg("lora", steps=4, lr=5e-2, average_decay=0.9, lora_init_scale=started)
    got = kill_and_resume(model, job, first, dataclasses.replace(first, lora_init_scale=resumed))
    assert read_header(job / "update.log").scope.get("init_scale") == (None if started == 1.0 else started)
    want = TextbookMeZO(model, first).run(4).served()
    assert_same_tensors(got, want)
    out = replay(model, job / "update.log", tmp_path / "replayed")
    assert_same_tensors(load_file(out / "adapter_model.safetensors"), want)


def test_lora_init_scale_is_checked_and_saved_with_the_factors(models, tmp_path):
    """ZOConfig refuses a bad scale naming the field; a saved adapter carries its spec's init scale (a
    checkpoint's factors reopen with it, and resume rebuilds the initial factors from it)."""
    from zostream.engine.peft import LoraAdapter, LoraSpec
    from zostream.engine.store import WeightStore

    for bad in (0, -1.0, 101.0, float("inf"), True):
        with pytest.raises(ValueError, match="lora_init_scale"):
            ZOConfig(lora_init_scale=bad)
    store = WeightStore(models("llama"))
    for scale in (1.0, 2.5):
        spec = LoraSpec(4, 8.0, ("q_proj", "v_proj"), init_seed=3, init_scale=scale)
        ad = LoraAdapter.init(spec, store.family, store.spec, torch.device("cpu"))
        name = next(n for n in ad.tensors if ".lora_A." in n)
        bound = scale / ad.tensors[name].shape[1] ** 0.5
        assert 0.5 * bound < ad.tensors[name].abs().max().item() <= bound
        back = LoraAdapter.load_peft(ad.save_peft(tmp_path / str(scale)), store.family, store.spec, "cpu")
        assert back.spec == spec
