"""engine/session.py: the one training lifecycle of `zostream train` and the server's jobs.

Keep-best and early stopping are checked against rules written out here over the evaluations the session
reported (bookkeeping), and the exported weights against an independent run: a fresh job trained only up
to the chosen step (replay ≡ training, invariant 4). Evaluations are recomputed with trainer.evaluate's
module function on the exported weights, so the reported metric belongs to the weights exported.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from tests.engine.test_losses import choice_dataset
from tests.engine.test_trainer import (
    CPU,
    DATA,
    PAD,
    assert_same_tensors,
    base_cfg,
    exported,
    open_job,
)
from zostream.engine.config import StreamConfig
from zostream.engine.finetune import export
from zostream.engine.session import Best, Policy, TrainingSession, metric_of
from zostream.engine.store import WeightStore
from zostream.engine.streamer import LayerStreamer

EVAL = choice_dataset(8, seed=3, multi=False)  # accuracy: the metric keep-best judges


pytestmark = pytest.mark.usefixtures("one_thread")


def open_session(model: Path, job: Path, cfg, policy: Policy, events: list | None = None, ds=DATA):
    store = WeightStore(model)
    sc = StreamConfig()
    base = LayerStreamer(store, CPU, torch.float32, sc)
    on_event = (lambda kind, step, data: events.append((kind, step, data))) if events is not None else None
    return TrainingSession.open(
        cfg, job, store, ds, EVAL, PAD, CPU, torch.float32, base, sc, policy=policy, on_event=on_event
    )


def train(ses: TrainingSession):
    ses.begin()
    while not ses.finished:
        ses.trainer.run_step()
        ses.after_step()
    return ses.finish()


def evals(events: list) -> list[tuple[int, float]]:
    return [(step, metric_of(data)[1]) for kind, step, data in events if kind == "eval"]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_keep_best_exports_the_best_evaluated_step(models, tmp_path, method):
    model = models("llama")
    # A large step size, so held-out accuracy moves and the last step is not always the best.
    cfg = base_cfg(method, steps=8, lr=0.5 if method == "lora" else 5e-2, eps=5e-2, eval_every=2)
    events: list = []
    ses = open_session(model, tmp_path / "job", cfg, Policy.of(cfg, keep_best=True), events)
    res = train(ses)
    ses.close()
    seen = evals(events)
    assert [s for s, _ in seen] == [0, 2, 4, 6, 8]
    # The rule, written out: the first evaluation with the highest accuracy.
    best_step = max(seen, key=lambda sv: (sv[1], -sv[0]))[0]
    assert res.step == best_step == ses.best.step
    assert [(k, s) for k, s, _ in events if k == "best"][-1] == ("best", best_step)
    # Independent: a fresh job trained up to the best step exports the same bits.
    assert_same_tensors(exported(tmp_path / "job", method), fresh(model, tmp_path / "ref", cfg, best_step))


def fresh(model: Path, job: Path, cfg, steps: int) -> dict[str, torch.Tensor]:
    """The exported weights of a new job trained `steps` steps (same seed, lr, eps: the same records)."""
    tr = open_job(model, job, dataclasses.replace(cfg, steps=max(steps, 1), eval_every=0))
    for _ in range(steps):
        tr.run_step()
    export(tr, job)
    tr.log.close()
    return exported(job, cfg.method)


def test_best_step_is_not_the_last_when_accuracy_falls(models, tmp_path):
    """The keep-best export differs from the last step's weights when a later evaluation was worse."""
    model = models("llama")
    cfg = base_cfg("lora", steps=4, eval_every=1)
    events: list = []
    ses = open_session(model, tmp_path / "job", cfg, Policy.of(cfg, keep_best=True), events)
    # Force the metric: step 1 is the best, later ones worse (the judging, not the model, is under test).
    fake = iter([0.25, 0.75, 0.5, 0.5, 0.25])
    ses.trainer.evaluate = lambda ds, bs=8: {"loss": 1.0, "accuracy": next(fake)}
    res = train(ses)
    ses.close()
    assert res.step == 1 and ses.best.value == 0.75 and ses.step == 4
    got = exported(tmp_path / "job", "lora")
    assert_same_tensors(got, fresh(model, tmp_path / "one", cfg, 1))
    last = fresh(model, tmp_path / "four", cfg, 4)
    assert any(not torch.equal(got[n], last[n]) for n in got)


def test_early_stopping_after_patience(models, tmp_path):
    model = models("llama")
    cfg = base_cfg("lora", steps=20, eval_every=1)
    events: list = []
    ses = open_session(model, tmp_path / "job", cfg, Policy.of(cfg, patience=2), events)
    fake = iter([0.5, 0.6, 0.6, 0.7, 0.65, 0.7, 0.9])
    ses.trainer.evaluate = lambda ds, bs=8: {"loss": 1.0, "accuracy": next(fake)}
    res = train(ses)
    ses.close()
    # The rule: stop at the 2nd evaluation in a row that is not strictly better than the best so far.
    assert [s for s, _ in evals(events)] == [0, 1, 2, 3, 4, 5]
    assert ses.stopped and "step 5" in ses.stopped and ses.step == 5
    assert res.step == 5  # without keep_best the last step is exported
    assert ("early_stop", 5) in [(k, s) for k, s, _ in events]


def test_best_and_patience_survive_a_restart(models, tmp_path):
    model = models("llama")
    cfg = base_cfg("lora", steps=6, eval_every=1)
    policy = Policy.of(cfg, keep_best=True, patience=3)
    ses = open_session(model, tmp_path / "job", cfg, policy)
    fake = iter([0.5, 0.75, 0.5])
    ses.trainer.evaluate = lambda ds, bs=8: {"loss": 1.0, "accuracy": next(fake)}
    ses.begin()
    for _ in range(2):
        ses.trainer.run_step()
        ses.after_step()
    ses.close()  # killed: no export
    assert Best.load(tmp_path / "job") == Best("accuracy", 1, 0.75, 1, 2, [(0, 0.5), (1, 0.75), (2, 0.5)])
    ses = open_session(
        model, tmp_path / "job", cfg, Policy.of(cfg, keep_best=True, patience=3, eval_on_resume=True)
    )
    fake = iter([0.5, 0.5, 0.5])  # step 2 again (not counted), then steps 3, 4: the third miss stops
    ses.trainer.evaluate = lambda ds, bs=8: {"loss": 1.0, "accuracy": next(fake)}
    res = train(ses)
    ses.close()
    assert ses.step == 4 and ses.stopped and res.step == 1


def test_metric_of_and_best_rules():
    assert metric_of({"loss": 2.0, "accuracy": 0.5}) == ("accuracy", 0.5, True)
    assert metric_of({"loss": 2.0}) == ("loss", 2.0, False)
    b = Best()
    assert b.better(3.0, False) and not b.better(math.nan, False)
    b.step, b.value = 0, 3.0
    assert b.better(2.5, False) and not b.better(3.0, False) and not b.better(3.5, False)
    assert b.better(3.5, True) and not b.better(3.0, True)
    with pytest.raises(ValueError, match="patience"):
        Policy(patience=-1)
