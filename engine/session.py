"""One fine-tuning job's lifecycle, for `zostream train` and the server's job runner alike.

open (repair the log's tail, reconcile a full job's working-copy counters with it, build the trainer),
the baseline evaluation, after every step the checkpoint and evaluation cadence, keep-best and early
stopping by a held-out metric, and at the end the export (of the best evaluated step with keep_best).
Who steps the trainer stays the caller's: the CLI calls `trainer.run_step()`, the server's engine runs
the step's workload inside a shared pass. Events go to `on_event(kind, step, data)`; kinds: "eval",
"checkpoint", "best", "early_stop".

The held-out metric is accuracy when the evaluation data has choices (higher is better), else the mean
token loss (lower is better). What keep-best and early stopping have seen lives in JOBDIR/best.json,
so a resumed job goes on counting where it stopped.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import data as D
from . import finetune
from .config import StreamConfig, ZOConfig
from .peft import LoraAdapter
from .replay import replay
from .resume import repair_log, replay_adapter
from .store import WeightStore
from .streamer import LayerStreamer
from .trainer import ZOTrainer

OnEvent = Callable[[str, int, dict[str, Any]], None]


@dataclass(frozen=True)
class Policy:
    """When a job evaluates, checkpoints and stops (nothing here changes the update log's bytes)."""

    eval_every: int = 0  # evaluate every N steps (and before and after training); 0: before and after only
    checkpoint_every: int = 0  # checkpoint every N steps before the last; 0: none (the export is the result)
    keep_best: bool = False  # export the best evaluated step, not the last
    patience: int = 0  # early stopping: stop after this many evaluations without a better metric; 0: off
    eval_batch_size: int = 8
    eval_on_resume: bool = False  # evaluate at the start of a resumed run too (the CLI's before/after)

    def __post_init__(self) -> None:
        for name in ("eval_every", "checkpoint_every", "patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name}: must be an integer >= 0, got {v!r}")
        if not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size: must be an integer >= 1, got {self.eval_batch_size!r}")

    @classmethod
    def of(cls, cfg: ZOConfig, **kw: Any) -> Policy:
        """The cadence of a job's config (eval_every, checkpoint_every), plus the lifecycle's own knobs."""
        return cls(eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every, **kw)


def metric_of(res: dict[str, float]) -> tuple[str, float, bool]:
    """(name, value, higher is better) of an evaluation: accuracy for choice data, else loss."""
    if "accuracy" in res:
        return "accuracy", float(res["accuracy"]), True
    return "loss", float(res["loss"]), False


@dataclass
class Best:
    """The best evaluation so far and the evaluations since it (JOBDIR/best.json)."""

    metric: str = ""
    step: int = -1  # -1: no evaluation yet
    value: float = math.nan
    since: int = 0  # evaluations after `step` that were not better
    last_step: int = -1  # the step of the latest evaluation counted
    history: list[tuple[int, float]] = field(default_factory=list)

    def better(self, value: float, higher: bool) -> bool:
        if not math.isfinite(value):
            return False
        if self.step < 0 or not math.isfinite(self.value):
            return True
        return value > self.value if higher else value < self.value

    @classmethod
    def load(cls, job_dir: Path) -> Best:
        try:
            d = json.loads((job_dir / "best.json").read_text())
            return cls(
                d["metric"],
                int(d["step"]),
                float(d["value"]) if d["value"] is not None else math.nan,
                int(d["since"]),
                int(d["last_step"]),
                [(int(s), float(v)) for s, v in d.get("history", [])],
            )
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or torn by a crash: start over
            return cls()

    def save(self, job_dir: Path) -> None:
        d = {
            "metric": self.metric,
            "step": self.step,
            "value": self.value if math.isfinite(self.value) else None,
            "since": self.since,
            "last_step": self.last_step,
            "history": self.history[-1000:],
        }
        tmp = job_dir / "best.json.tmp"
        tmp.write_text(json.dumps(d))
        os.replace(tmp, job_dir / "best.json")


@dataclass(frozen=True)
class Result:
    """What finish() exported: the directory, the step its weights are at, and (LoRA) the adapter it
    serves (the average of the factors when the job keeps one)."""

    path: Path
    step: int
    adapter: LoraAdapter | None


class TrainingSession:
    """A job directory opened for training; the caller steps `trainer` and calls after_step()."""

    def __init__(
        self,
        trainer: ZOTrainer,
        job_dir: str | os.PathLike,
        base_dir: str | os.PathLike,
        eval_ds: D.Dataset | None,
        policy: Policy,
        on_event: OnEvent | None = None,
        repaired: str | None = None,
        target: int | None = None,
    ) -> None:
        """target: the step to train to (default: the config's steps; a resumed constant-lr job may go on
        past the total its log was started with)."""
        self.trainer, self.job_dir, self.base_dir = trainer, Path(job_dir), Path(base_dir)
        self.eval_ds, self.policy = eval_ds, policy
        self.on_event: OnEvent = on_event or (lambda kind, step, data: None)
        self.repaired = repaired  # what opening cut from a torn update.log tail, if anything
        self.start_step = trainer.step
        self.target = target if target is not None else trainer.cfg.steps
        self.best = Best.load(self.job_dir)
        self.evals: list[dict[str, Any]] = []  # this run's evaluations: {"step", **result}
        self.stopped: str | None = None  # why the job stopped before its last step (early stopping)

    @classmethod
    def open(
        cls,
        cfg: ZOConfig,
        job_dir: str | os.PathLike,
        store: WeightStore,
        train: D.Dataset,
        eval_ds: D.Dataset | None,
        pad_id: int,
        device: Any,
        compute_dtype: Any,
        base_streamer: LayerStreamer | None,
        stream_cfg: StreamConfig,
        codec_name: str = "none",
        emu: Any = None,
        policy: Policy | None = None,
        on_event: OnEvent | None = None,
        target: int | None = None,
    ) -> TrainingSession:
        """Create or resume the job in job_dir: repair the log first, then build the trainer."""
        repaired = repair_log(Path(job_dir))
        tr = finetune.open_trainer(
            cfg,
            job_dir,
            store,
            train,
            pad_id,
            device,
            compute_dtype,
            base_streamer,
            stream_cfg,
            codec_name,
            emu,
        )
        return cls(tr, job_dir, store.dir, eval_ds, policy or Policy.of(cfg), on_event, repaired, target)

    # ---- state ------------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self.trainer.step

    @property
    def finished(self) -> bool:
        """No step is left to take: the last one is done, or early stopping ended the job."""
        return self.step >= self.target or self.stopped is not None

    # ---- the cadence --------------------------------------------------------------------------------
    def begin(self) -> None:
        """The baseline evaluation (a new job; a resumed one with eval_on_resume)."""
        if self.eval_ds is not None and (self.step == 0 or self.policy.eval_on_resume):
            self.evaluate()

    def after_step(self) -> None:
        """After a committed step: checkpoint and evaluate on their cadence (not after the last step:
        finish() evaluates and exports then), and decide early stopping."""
        p, s = self.policy, self.step
        if self.finished:
            return
        if p.checkpoint_every and s % p.checkpoint_every == 0:
            self.checkpoint()
        if self.eval_ds is not None and p.eval_every and s % p.eval_every == 0:
            self.evaluate()

    def evaluate(self) -> dict[str, Any]:
        """Held-out loss (and accuracy) at this step; feeds keep-best and early stopping."""
        assert self.eval_ds is not None
        res = self.trainer.evaluate(self.eval_ds, self.policy.eval_batch_size)
        row = {"step": self.step, **res}
        self.evals.append(row)
        self.on_event("eval", self.step, res)
        self._judge(res)
        return row

    def _judge(self, res: dict[str, float]) -> None:
        s, b = self.step, self.best
        if s <= b.last_step:  # a resumed run evaluating a step already counted
            return
        name, value, higher = metric_of(res)
        b.metric, b.last_step = name, s
        b.history.append((s, value))
        if b.better(value, higher):
            b.step, b.value, b.since = s, value, 0
            self.on_event("best", s, {name: value})
        else:
            b.since += 1
        b.save(self.job_dir)
        p = self.policy
        if p.patience and b.since >= p.patience and self.step < self.target:
            self.stopped = (
                f"stopped early at step {s}: no better held-out {name} in {b.since} evaluations "
                f"(best {b.value:.6g} at step {b.step})"
            )
            self.on_event("early_stop", s, {name: value, "best_step": b.step})

    def checkpoint(self, message: str = "") -> Path | None:
        """Flush and persist what the log cannot cheaply rebuild (LoRA factors at this step)."""
        path = finetune.checkpoint(self.trainer, self.job_dir)
        self.on_event("checkpoint", self.step, {"name": path.name if path else "", "message": message})
        return path

    # ---- the end ------------------------------------------------------------------------------------
    def finish(self, export: bool = True) -> Result | None:
        """The last evaluation (unless this step was just evaluated) and the export: the best evaluated
        step's weights with keep_best, else this step's. export=False: evaluate only (a data-parallel
        rank other than 0)."""
        if self.eval_ds is not None and (not self.evals or self.evals[-1]["step"] != self.step):
            self.evaluate()
        if not export:
            self.trainer.flush()
            return None
        upto = self.best.step if self.policy.keep_best and self.best.step >= 0 else self.step
        tr = self.trainer
        if upto == self.step:
            out = finetune.export(tr, self.job_dir, str(self.base_dir))
            served = tr.served_adapter()
            return Result(out, upto, served.clone() if served is not None else None)
        tr.flush()
        if tr.adapter is not None:
            adapter = replay_adapter(tr, upto)
            out = self.job_dir / "adapter"
            finetune.save_adapter(adapter, out, str(self.base_dir))
            return Result(out, upto, adapter)
        out = replay(self.base_dir, tr.log.path, self.job_dir / "model", upto=upto)
        return Result(out, upto, None)

    def stop(self, message: str = "") -> Path | None:
        """Interrupted, cancelled or shutting down: checkpoint; a later open resumes from the log."""
        return self.checkpoint(message)

    def close(self) -> None:
        self.trainer.log.close()  # its fd and writer lock
