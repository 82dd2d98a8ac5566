"""The divergence guard's slow-climb rule (engine/climb.py): the rule against loss sequences worked out by
hand here, and a tiny job where it trips: the lr backoff in the log, replay == training bitwise across a
trip, a crash and resume across a trip, and logs from before losses were logged."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.engine.test_trainer import (
    assert_same_tensors,
    base_cfg,
    crash,
    exported,
    open_job,
    partial_budget,
    run_job,
)
from zostream.engine import climb, trainer
from zostream.engine.config import ZOConfig
from zostream.engine.replay import replay
from zostream.engine.update_log import UpdateLog, read_header

pytestmark = pytest.mark.usefixtures("one_thread")

# Window 2, rise 0.5. Worked by hand (w = window means, "best" = the lowest mean of a window that ended
# before the recent one began; the rule needs 4 losses since the start or the last trip):
#   step 7: recent (2, 3) = 2.5, best 2 -> 2.5 <= 3: no trip;  step 8: recent (3, 4) = 3.5 > 3: TRIP.
#   steps 9-12 start again: best 5 at step 12; step 13: (5, 8) = 6.5 <= 7.5;
#   step 14: (8, 9) = 8.5 > 7.5: TRIP.
CLIMB = [4.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0, 8.0, 9.0, 9.0]
TRIPS = [8, 14]
RULE = climb.ClimbRule(window=2, rise=0.5, backoff=0.5)


def test_rule_on_a_hand_worked_sequence() -> None:
    assert climb.trip_steps(CLIMB, RULE) == TRIPS
    state = climb.replay_state(CLIMB, RULE)
    assert state.trips == 2 and state.factor(RULE) == 0.25
    # A falling or flat loss never trips; a rise within the margin does not either.
    assert climb.trip_steps([5.0, 4.0, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0], RULE) == []
    assert climb.trip_steps([2.0, 2.0, 2.0, 2.0, 2.9, 3.0], RULE) == []
    # History: a climb from the first step trips only once 2 windows were seen (step 3), not before.
    assert climb.trip_steps([1.0, 2.0, 4.0, 8.0], RULE) == [3]
    assert climb.trip_steps([1.0, 2.0, 4.0], RULE) == []
    # Non-finite losses (skipped steps) are not history; None entries (no loss logged) neither.
    with_nan = [*CLIMB[:5], math.nan, *CLIMB[5:]]
    assert climb.trip_steps(with_nan, RULE) == [t + 1 for t in TRIPS]
    assert climb.replay_state([None, *CLIMB], RULE) == state


def test_rule_the_default_thresholds_describe() -> None:
    """Defaults: window 20, rise 0.5: a 20-step mean 1.5x the best earlier one, after 40 steps of history."""
    rule = climb.ClimbRule()
    assert (rule.window, rule.rise, rule.backoff) == (20, 0.5, 0.5)
    flat = [1.0] * 40
    assert climb.trip_steps(flat + [1.0] * 19 + [11.0], rule) == []  # mean 1.5: not over 1.5x
    assert climb.trip_steps(flat + [1.0] * 19 + [12.0], rule) == [59]  # mean 1.55
    assert climb.trip_steps([1.0] * 38 + [200.0], rule) == []  # 39 steps of history: too early
    assert climb.trip_steps([1.0] * 39 + [200.0], rule) == [39]


@pytest.mark.parametrize(
    ("field", "value"),
    [("climb_window", 0), ("climb_rise", 0.0), ("climb_rise", math.inf), ("climb_backoff", 1.0)],
)
def test_config_rejects_bad_thresholds(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"^{field}: must"):
        ZOConfig(**{field: value})


# ---------------------------------------------------------------------------------------------- jobs


@pytest.fixture
def climbing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Step t's mean loss becomes CLIMB[t]; each direction keeps its L+ - L- (so g is the real one)."""
    real = trainer.ZOStepWorkload.losses

    def losses(self: trainer.ZOStepWorkload) -> list[tuple[float, float]]:
        return [(CLIMB[self.step] + (lp - lm) / 2, CLIMB[self.step] - (lp - lm) / 2) for lp, lm in real(self)]

    monkeypatch.setattr(trainer.ZOStepWorkload, "losses", losses)


def climb_cfg(method: str, **kw: object) -> ZOConfig:
    kw = {"climb_window": 2, "climb_rise": 0.5, "lr_schedule": "constant", **kw}
    return base_cfg(method, steps=len(CLIMB), **kw)


def factors() -> list[float]:
    """The lr multiplier of each step of CLIMB: 1 up to the first trip, 1/2 after it, 1/4 after the second."""
    return [1.0 if t <= TRIPS[0] else 0.5 if t <= TRIPS[1] else 0.25 for t in range(len(CLIMB))]


@pytest.mark.parametrize(
    ("method", "kw"), [("lora", {}), ("lora", {"estimator": "grzo", "q": 2}), ("full", {})]
)
def test_job_backs_off_and_replays_bitwise(models, tmp_path: Path, climbing: None, method: str, kw: dict):
    model = models("llama")
    cfg = climb_cfg(method, **kw)
    tr = open_job(model, tmp_path / "job", cfg)
    results = [tr.run_step() for _ in range(cfg.steps)]
    assert [t for t, r in enumerate(results) if r["climb"]] == TRIPS
    assert "slow climb" in results[TRIPS[0]]["climb"] and all(r["skipped"] is None for r in results)
    assert [r["lr_factor"] for r in results] == [
        f if t not in TRIPS else f / 2 for t, f in enumerate(factors())
    ]
    base_lr = cfg.learning_rate  # constant schedule: every step's lr is base x factor, float32-exact
    log = UpdateLog.open(tmp_path / "job" / "update.log", repair=False)
    assert log.format_version == 3 and log.header.extra["climb"] == {"window": 2, "rise": 0.5, "backoff": 0.5}
    assert [s.lr for s in log.steps()] == [trainer.zo.f32(base_lr) * f for f in factors()]
    assert [s.loss for s in log.steps()] == CLIMB
    log.close()
    # Replay reads no rule: the logged lr carries the backoff, and rebuilds what training holds, bitwise.
    from zostream.engine.finetune import export

    export(tr, tmp_path / "job")
    tr.log.close()
    out = replay(model, tmp_path / "job" / "update.log", tmp_path / "replayed")
    name = "adapter_model.safetensors" if method == "lora" else "model.safetensors"
    from safetensors.torch import load_file

    assert_same_tensors(load_file(out / name), exported(tmp_path / "job", method))


@pytest.mark.parametrize(
    ("method", "crash_at", "device"),
    [("lora", TRIPS[0] + 1, "cpu"), ("lora", TRIPS[0] + 3, "cpu"), ("full", 12, "cpu"), ("full", 9, "emu")],
)
def test_resume_across_a_trip_is_bitwise_uninterrupted(
    models, tmp_path: Path, climbing: None, method: str, crash_at: int, device: str
):
    """Killed after step crash_at - 1 (the trip at step 8 is in the log, the one at 14 not yet): the resumed
    job rebuilds the backoff from the logged losses and writes the same log and weights as one run. emu:
    on the emulated device, block 0 resident and the rest streamed, killed with its masters dirty."""
    model = models("llama")
    cfg = climb_cfg(method)
    budget, dev = None, lambda: None
    if device == "emu":
        from tests.engine.test_emu import emu

        budget, dev = partial_budget(model, depth=3), emu
    ref = run_job(model, tmp_path / "ref", cfg, cfg.steps, budget, emu=dev())
    killed = dev()
    crash(run_job(model, tmp_path / "job", cfg, crash_at, budget, finish=False, emu=killed))
    if killed is not None:
        killed.kill()
    tr = run_job(model, tmp_path / "job", cfg, cfg.steps, budget, emu=dev())
    assert tr.climb == ref.climb and tr.climb.trips == 2
    assert (tmp_path / "job" / "update.log").read_bytes() == (tmp_path / "ref" / "update.log").read_bytes()
    assert_same_tensors(exported(tmp_path / "job", method), exported(tmp_path / "ref", method))
    ref.log.close()
    tr.log.close()


def test_guard_off_keeps_the_schedule(models, tmp_path: Path, climbing: None) -> None:
    cfg = climb_cfg("lora", divergence_guard=False)
    tr = run_job(models("llama"), tmp_path / "job", cfg, cfg.steps, finish=False)
    assert "climb" not in tr.log.header.extra and len({s.lr for s in tr.log.steps()}) == 1
    assert [s.loss for s in tr.log.steps()] == CLIMB  # still logged
    tr.log.close()


def test_log_from_before_losses_resumes_and_replays(models, tmp_path: Path, climbing: None, monkeypatch):
    """A job whose log is format 1 (no losses, no climb entry: the code before) resumes with the current
    code: its records stay 16 bytes, the slow-climb rule stays off (nothing to rebuild it from), and the
    whole log replays to what training holds."""
    from zostream.engine import finetune

    model = models("llama")
    cfg = climb_cfg("lora")
    real_header, real_create = finetune.log_header, UpdateLog.create
    monkeypatch.setattr(
        finetune, "log_header", lambda c, s, m, r, compute_dtype=None: real_header(c, s, m, r)
    )
    monkeypatch.setattr(UpdateLog, "create", classmethod(lambda cls, p, h, loss=False: real_create(p, h)))
    crash(run_job(model, tmp_path / "old", cfg, 9, finish=False))
    monkeypatch.setattr(finetune, "log_header", real_header)
    monkeypatch.setattr(UpdateLog, "create", real_create)
    path = tmp_path / "old" / "update.log"
    assert path.read_bytes()[6:8] == b"\x01\x00" and "climb" not in read_header(path).extra
    tr = run_job(model, tmp_path / "old", cfg, cfg.steps)
    assert tr.climb_rule is None and tr.log.format_version == 1
    assert len({s.lr for s in tr.log.steps()}) == 1 and [s.loss for s in tr.log.steps()] == [None] * cfg.steps
    tr.log.close()
    size = len(path.read_bytes()) - (12 + int.from_bytes(path.read_bytes()[8:12], "little") + 4)
    assert size == cfg.steps * cfg.q * 16
    out = replay(model, path, tmp_path / "replayed")
    from safetensors.torch import load_file

    assert_same_tensors(load_file(out / "adapter_model.safetensors"), exported(tmp_path / "old", "lora"))
