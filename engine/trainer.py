"""A zeroth-order fine-tuning job inside the pass over the layers (MeZO SPSA, ZO2 schedule).

Step t, for every trainable group g (outer tensors, then block 0..L-1, in pass order):
  1. catch up: apply the logged updates applied[g]..t-1 (normally just step t-1: the
     lazy ZO2 update, fused in while the block is on the device);
  2. run the 2q perturbed forwards of the batch through the group, on work copies
     θ ± ε z (the master is never perturbed).
At the end of the pass: L±_d → g_d, the record is fsync'd into the update log, and the
step counts as done. `flush()` brings every group up to date (checkpoint, eval, export).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from . import climb, rng, schedule, zo
from . import data as D
from . import estimators as E
from . import losses as LS
from .averaging import Average
from .batching import batch_order, collate
from .config import ZOConfig
from .evaluation import evaluate
from .forward import run_pass
from .peft import LoraAdapter
from .perturb import PassPerturbation
from .strategies import FullStrategy, LoraStrategy, Trainable
from .streamer import LayerStreamer
from .update_log import LogHeader, Step, UpdateLog
from .update_log_format import loss_f32
from .workloads import ZOStepWorkload
from .workspace import Workspace

SR_DIRECTION = 0xFFFF  # step_seed(job, step, SR_DIRECTION) seeds the stochastic-rounding uniforms


class ZOTrainer:
    """One job's training state; the engine (or `zostream train`) drives it pass by pass."""

    def __init__(
        self,
        cfg: ZOConfig,
        fam: Any,
        spec: Any,
        streamer: LayerStreamer,
        log: UpdateLog,
        train: D.Dataset,
        pad_id: int,
        compute_dtype: torch.dtype,
        trainable: Trainable | None = None,
        adapter: LoraAdapter | None = None,
        rounding: str = "nearest",
        applied: list[int] | None = None,
        working_copy: Any = None,
        averaged: LoraAdapter | None = None,
    ) -> None:
        """applied: per group, the steps already in its master (resume); None: a fresh job.
        working_copy: a full-parameter job's working_copy.WorkingCopy (what export copies).
        averaged: a resumed LoRA job's average at the adapter's step (engine/averaging.py; the log's
        header says whether the job keeps one)."""
        self.cfg, self.fam, self.spec = cfg, fam, spec
        self.streamer, self.log, self.train, self.pad_id = streamer, log, train, pad_id
        self.dtype, self.adapter, self.rounding = compute_dtype, adapter, rounding
        self.device = streamer.device
        self.loss = LS.resolve_loss(cfg.loss, train.kind)  # "tokens" | "candidates"
        if trainable is not None:
            self.strategy: LoraStrategy | FullStrategy = FullStrategy(trainable, fam.layer_prefix, streamer)
        else:
            assert adapter is not None, "a trainer needs an adapter (LoRA) or trainable masters (full)"
            average = Average.from_header(log.header.extra)
            self.strategy = LoraStrategy(adapter, spec.num_layers, average, averaged)
        self.steps: list[Step] = log.steps()
        # Per group: the steps in its master as the device holds it (the durable counters are the owner's).
        self.applied = list(applied) if applied is not None else [0] * self.strategy.num_groups
        if len(self.applied) != self.strategy.num_groups:
            raise ValueError(
                f"applied has {len(self.applied)} groups, the job has {self.strategy.num_groups}"
            )
        self.working_copy = working_copy
        # Data parallel (engine/distributed.py): this process is rank shard[0] of shard[1], and `reducer`
        # maps its partials [m, 2q+1] to every rank's, in rank order. Single process: (0, 1), None.
        self.shard: tuple[int, int] = (0, 1)
        self.reducer: Callable[[torch.Tensor, int], torch.Tensor] | None = None
        self.schedule = schedule.LRSchedule(
            cfg.schedule, cfg.learning_rate, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio
        )
        # The divergence guard's reference: |g| of accepted steps, rebuilt from the log on resume.
        accepted = [abs(g) for s in self.steps if not s.skipped for g in s.directions]
        self.g_history: list[float] = accepted[-256:]
        # The slow-climb rule (engine/climb.py), as the log's header set it when the job began: its state
        # (the lr backoff) is rebuilt from the logged losses of the accepted steps, so a resumed job decides
        # as one that never stopped. None: the guard is off, or the log records no losses (format 1 / 2).
        spec = log.header.extra.get("climb")
        self.climb_rule: climb.ClimbRule | None = None
        if cfg.divergence_guard and log.has_loss and spec is not None:
            try:
                self.climb_rule = climb.ClimbRule(**spec)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{log.path}: header extra.climb {spec!r} is not a rule: {e}") from None
        rule = self.climb_rule or climb.ClimbRule()
        self.climb = climb.replay_state((s.loss for s in self.steps if not s.skipped), rule)
        # The forwards' logits and outer copies, kept from step to step on the direct CPU path.
        self.workspace = Workspace(enabled=not streamer.copies)

    @property
    def step(self) -> int:
        return len(self.steps)

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.steps

    @property
    def groups_apart(self) -> bool:
        """Full-parameter grzo: each group of records runs as micro-batches of its own, through its own
        direction's weights (a LoRA job runs the groups' directions as rows of one mixed-adapter batch)."""
        return self.cfg.estimator == "grzo" and self.adapter is None

    # ---- trainable groups ----------------------------------------------------------------------
    def perturbers(self, seeds: list[int], pair: bool = True) -> PassPerturbation:
        """The θ ± ε z work copies of one pass for the directions' step seeds (one z per direction);
        pair False: θ + ε z only. Full-parameter grzo holds one direction's copies of a block at a time
        (its micro-batches come in group order: ZOTrainer.batches), and on a device with its own memory
        one direction's copies of the outer tensors too (drawn again for the head)."""
        one = self.groups_apart
        return PassPerturbation(
            seeds,
            self.cfg.noise,
            self.cfg.epsilon,
            self.dtype,
            self.fam.layer_prefix,
            self.adapter,
            pair,
            self.workspace,
            one_direction=one,
            outer_one_direction=one and self.streamer.copies,
        )

    def unperturbed(self):
        """(outer_fn, block_fn, lora_fn) of a forward through θ itself (the masters, in compute dtype)."""
        return self.strategy.unperturbed(self.dtype)

    def catch_up(self, g: int, w: dict[str, torch.Tensor] | None, upto: int) -> None:
        """Apply logged steps applied[g]..upto-1 to group g's master tensors, in place."""
        if self.applied[g] >= upto:
            return
        st = self.strategy
        tensors = st.tensors(g, w)
        in_place = st.counters_move_at_apply()
        for s in range(self.applied[g], upto):
            if in_place:
                st.on_written(g, s, False)
            apply_step(tensors, self.steps[s], self.log.header)
            self.applied[g] = s + 1
            if in_place:
                st.on_written(g, s, True)
        st.applied(g, upto)

    # ---- steps ---------------------------------------------------------------------------------
    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        """The step's whole batch as one token-loss slice (bench/zo.py times a forward of it)."""
        idx = batch_order(len(self.train.examples), self.cfg.batch_size, self.cfg.seed, step)
        return self._slice(idx, candidates=False)

    def batches(self, step: int) -> list[tuple[torch.Tensor, ...]]:
        """This process's micro-batches of the step's batch, in global order: rank r of W takes positions
        [r*B/W, (r+1)*B/W) of batch_order(...) and cuts them into micro_batch-sized slices. A full-parameter
        grzo job cuts them at its groups' edges too: a forward runs one set of weights, so a slice holds
        one group's records (workloads.ZOStepWorkload)."""
        cfg, (rank, world) = self.cfg, self.shard
        idx = batch_order(len(self.train.examples), cfg.batch_size, cfg.seed, step)
        per = cfg.batch_size // world
        idx, mb = idx[rank * per : (rank + 1) * per], cfg.micro_batch_size
        if self.groups_apart:
            mb = math.gcd(mb, cfg.batch_size // cfg.q, per)
        return [self._slice(idx[i : i + mb], self.loss == "candidates") for i in range(0, per, mb)]

    def _slice(self, idx: list[int], candidates: bool) -> tuple[torch.Tensor, ...]:
        """(ids, labels, lens) of records idx on the device; for the candidates loss, of their candidate
        rows (one per candidate, losses.candidate_rows) with each row's record index added."""
        if candidates:
            rows, index = LS.candidate_rows([self.train.choices[j] for j in idx])
            return tuple(t.to(self.device) for t in (*collate(rows, self.pad_id), index))
        return tuple(t.to(self.device) for t in collate([self.train.examples[j] for j in idx], self.pad_id))

    def workload(self) -> ZOStepWorkload:
        return ZOStepWorkload(self, self.step, self.batches(self.step))

    def commit(self, wl: ZOStepWorkload) -> dict[str, Any]:
        """Turn the pass's losses into the logged step (fsync'd before it counts)."""
        cfg = self.cfg
        losses = wl.losses()
        gs = E.coefficients(cfg.estimator, losses, cfg.epsilon)
        reason = None
        if cfg.divergence_guard:
            # grzo's coefficients are scaled to unit RMS (its step has a fixed size), and one record's
            # group often carries most of it: only non-finite losses are outliers there.
            history = [] if cfg.estimator == "grzo" else self.g_history
            for (lp, lm), g in zip(losses, gs, strict=True):
                reason = reason or climb.divergence_check(g, lp, lm, history)
        lr = self.schedule.lr_at(wl.step)
        rule = self.climb_rule
        if rule is not None:  # backoff ** trips: exact in float32, so the logged lr is the applied one
            lr = zo.f32(lr * self.climb.factor(rule))
        summary = E.summary(cfg.estimator, losses)
        # The loss as the log stores it (float32): the rule reads the same value now and on resume.
        loss = loss_f32(summary["loss"])
        step = Step(wl.step, lr, tuple(gs), skipped=reason is not None, loss=loss)
        self.log.append(step)
        self.steps.append(step)
        climbed = None
        if reason is None:
            self.g_history.extend(abs(g) for g in gs)
            del self.g_history[:-256]
            if rule is not None:
                self.climb, climbed = climb.observe(self.climb, loss, rule)
        return {
            "step": wl.step,
            **summary,
            "loss_kind": self.loss,
            "projected_grad": gs[0],
            "lr": lr,
            "skipped": reason,
            "climb": climbed,  # the slow-climb rule tripped: lr x backoff from the next step
            "lr_factor": self.climb.factor(rule) if rule is not None else 1.0,
            "tokens": wl.tokens,
        }

    def run_step(self) -> dict[str, Any]:
        wl = self.workload()
        run_pass(self.streamer, [wl])
        return self.commit(wl)

    def flush(self) -> None:
        """Apply the pending update everywhere (ZO2 never does: its saves are a step stale)."""
        upto = self.step
        self.catch_up(0, self.streamer.outer(), upto)
        self.strategy.flush(self, upto)

    # ---- what the job serves ----------------------------------------------------------------------
    def served_adapter(self) -> LoraAdapter | None:
        """A LoRA job's result as it stands (after flush()): the average of its factors when it keeps one
        (engine/averaging.py), else the factors; None for a full-parameter job."""
        return self.strategy.served() if isinstance(self.strategy, LoraStrategy) else None

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, ds: D.Dataset, batch_size: int = 8) -> dict[str, float]:
        """Loss (and multiple-choice accuracy) of what the job serves, with the current, flushed weights."""
        self.flush()
        lora_fn = self.strategy.lora_fn(served=True)
        return evaluate(self.fam, self.spec, self.streamer, ds, self.pad_id, self.device, lora_fn, batch_size)


def apply_step(tensors: dict[str, torch.Tensor], step: Step, h: LogHeader) -> None:
    """One logged step onto master tensors (training, flush and replay all call this)."""
    if step.skipped:
        return
    dirs = [(rng.step_seed(h.job_seed, step.step, d), g) for d, g in enumerate(step.directions)]
    sr_seed = rng.step_seed(h.job_seed, step.step, SR_DIRECTION)
    mask = zo.UpdateMask.from_header(h.extra.get("update_mask"), h.eps)  # None: a log from before masks
    for name, t in tensors.items():
        zo.apply_update(
            t,
            name,
            dirs,
            step.lr,
            h.weight_decay,
            h.noise,
            decay=zo.is_decayed(name),
            rounding=h.rounding,
            sr_seed=sr_seed,
            mask=mask,
        )


def master_dtype_for(cfg: ZOConfig, base_dtype: torch.dtype) -> tuple[torch.dtype, str]:
    """(master dtype, rounding): fp32 masters round to nearest; bf16/fp16 masters stochastically."""
    if cfg.method == "lora":
        return torch.float32, "nearest"
    name = cfg.master_dtype
    dt = (
        base_dtype
        if name == "auto"
        else {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
    )
    return dt, ("nearest" if dt == torch.float32 else "stochastic")
