"""Invariant 4: replaying a job's update log onto the base reproduces the trained weights bitwise
(full fp32, full bf16 with stochastic rounding, LoRA), also up to any step k and across skipped steps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.engine.test_trainer import (
    assert_same_tensors,
    base_cfg,
    exported,
    run_job,
)
from zostream.engine import trainer
from zostream.engine.errors import PreconditionError
from zostream.engine.replay import replay
from zostream.engine.store import WeightStore
from zostream.engine.update_log import UpdateLog

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {  # case -> (method, model, base dtype, lr): a small lr leaves bf16 rounding to the SR uniforms
    "full": ("full", "llama", torch.float32, 2e-3),
    "full-bf16-sr": ("full", "llama", torch.bfloat16, 2e-4),
    "lora": ("lora", "opt", torch.float32, 2e-2),
}


def replayed(out, method: str) -> dict[str, torch.Tensor]:
    return load_file(out / ("adapter_model.safetensors" if method == "lora" else "model.safetensors"))


@pytest.mark.parametrize(
    ("case", "device"), [(c, "cpu") for c in sorted(CASES)] + [("full", "emu"), ("full-bf16-sr", "emu")]
)
def test_replay_reproduces_training_bitwise(models, tmp_path, case, device):
    """emu: trained with every master streamed through the emulated device (budget 0), replayed on the CPU."""
    method, name, dtype, lr = CASES[case]
    model = models(name, dtype)
    cfg = base_cfg(method, steps=5, lr=lr)
    if device == "emu":
        from zostream.engine.emu import EmuDevice, EmuOptions

        tr = run_job(model, tmp_path / "job", cfg, 5, 0, emu=EmuDevice(EmuOptions(max_delay_s=0.001)))
    else:
        tr = run_job(model, tmp_path / "job", cfg, 5)
    tr.log.close()
    header = UpdateLog.open(tmp_path / "job" / "update.log").header
    if dtype == torch.bfloat16:
        assert (header.master_dtype, header.rounding) == ("bfloat16", "stochastic")
    out = replay(model, tmp_path / "job" / "update.log", tmp_path / "replayed")
    want = exported(tmp_path / "job", method)
    assert_same_tensors(replayed(out, method), want)
    base = load_file(model / "model.safetensors")
    assert any(not torch.equal(t, base.get(n, torch.zeros_like(t))) for n, t in want.items())
    if method == "full":
        # A standalone model dir: same config as the export, opens as a store, no job bookkeeping inside.
        assert json.loads((out / "config.json").read_text()) == json.loads(
            (tmp_path / "job" / "model" / "config.json").read_text()
        )
        assert not (out / "applied.bin").exists()
        WeightStore(out)
    else:
        cfg_got = json.loads((out / "adapter_config.json").read_text())
        cfg_want = json.loads((tmp_path / "job" / "adapter" / "adapter_config.json").read_text())
        assert {k: v for k, v in cfg_got.items() if k != "base_model_name_or_path"} == {
            k: v for k, v in cfg_want.items() if k != "base_model_name_or_path"
        }
    # upto=k: the weights of a run stopped after k steps.
    run_job(models(name, dtype), tmp_path / "short", cfg, 3).log.close()
    out3 = replay(model, tmp_path / "job" / "update.log", tmp_path / "replayed3", upto=3)
    assert_same_tensors(replayed(out3, method), exported(tmp_path / "short", method))
    assert not all(torch.equal(replayed(out3, method)[n], want[n]) for n in want)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_replay_honours_skipped_steps(models, tmp_path, monkeypatch, method):
    real = trainer.ZOStepWorkload.losses
    monkeypatch.setattr(
        trainer.ZOStepWorkload,
        "losses",
        lambda self: [(math.inf, lm) for _, lm in real(self)] if self.step == 1 else real(self),
    )
    model = models("llama")
    cfg = base_cfg(method, steps=4)
    run_job(model, tmp_path / "job", cfg, 4).log.close()
    assert [s.skipped for s in UpdateLog.open(tmp_path / "job" / "update.log").steps()] == [
        False,
        True,
        False,
        False,
    ]
    out = replay(model, tmp_path / "job" / "update.log", tmp_path / "replayed")
    assert_same_tensors(replayed(out, method), exported(tmp_path / "job", method))


def test_replay_refuses_another_base(models, tmp_path):
    cfg = base_cfg("full", steps=1)
    run_job(models("llama"), tmp_path / "job", cfg, 1).log.close()
    with pytest.raises(PreconditionError, match="replay it onto the model it was trained from"):
        replay(models("opt"), tmp_path / "job" / "update.log", tmp_path / "out")
    assert not (tmp_path / "out").exists()
