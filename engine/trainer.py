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

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import climb, rng, zo
from . import data as D
from . import estimators as E
from . import losses as LS
from .config import ZOConfig
from .forward import run_pass
from .models.attention import AttentionBatch, LoraSet
from .peft import LoraAdapter
from .perturb import PassPerturbation
from .streamer import LayerStreamer
from .update_log import LogHeader, Step, UpdateLog
from .update_log_format import loss_f32
from .workspace import Workspace

SR_DIRECTION = 0xFFFF  # step_seed(job, step, SR_DIRECTION) seeds the stochastic-rounding uniforms
WeightFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass
class Trainable:
    """The trainable tensors and how to reach them: full names -> master tensors per group."""

    groups: Callable[[int, dict[str, torch.Tensor] | None], dict[str, torch.Tensor]]
    num_groups: int
    on_written: Callable[[int, int, bool], None]  # (group, step, done) -> persist counters


class LoraStrategy:
    """A LoRA job: the adapter's factors are the trainable tensors (group g > 0: layer g-1's; the outer
    group has none). They live where compute runs, so an update applied is an update kept."""

    def __init__(self, adapter: LoraAdapter, num_layers: int) -> None:
        self.adapter, self.num_groups = adapter, num_layers + 1

    def tensors(self, g: int, _w: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Full name -> tensor of group g."""
        ad = self.adapter
        return {} if g == 0 else {n: ad.tensors[n] for n in ad.layer_names(g - 1)}

    def counters_move_at_apply(self) -> bool:
        return True

    def on_written(self, g: int, step: int, done: bool) -> None:
        pass  # the adapter's state is saved whole at checkpoints

    def applied(self, g: int, upto: int) -> None:
        pass

    def lora_fn(self) -> Callable[[int], LoraSet | None]:
        ad = self.adapter
        return lambda i: {m: [lw] for m, lw in ad.layer(i).items()}

    def unperturbed(self, dtype: torch.dtype):
        return None, None, self.lora_fn()

    def flush(self, tr: ZOTrainer, upto: int) -> None:
        for g in range(1, self.num_groups):
            tr.catch_up(g, None, upto)


class FullStrategy:
    """A full-parameter job: the masters (the working copy's tensors, or the streamer's device copies of
    them) are trainable. On a copying device an update lands in a device copy: its durable counter moves
    when the streamer's write-back has landed (finetune's hook), never at apply."""

    def __init__(self, trainable: Trainable, layer_prefix: Callable[[int], str], streamer: LayerStreamer):
        self.trainable, self.layer_prefix, self.streamer = trainable, layer_prefix, streamer
        self.num_groups = trainable.num_groups

    def tensors(self, g: int, w: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        tensors = self.trainable.groups(g, w)
        if g > 0 and tensors:  # block-local names -> full names (the noise is keyed by them)
            prefix = self.layer_prefix(g - 1)
            tensors = {prefix + k: v for k, v in tensors.items()}
        return tensors

    def counters_move_at_apply(self) -> bool:
        return not self.streamer.copies

    def on_written(self, g: int, step: int, done: bool) -> None:
        self.trainable.on_written(g, step, done)

    def applied(self, g: int, upto: int) -> None:
        if self.streamer.mutable:
            self.streamer.mark_dirty(g, upto)

    def lora_fn(self) -> None:
        return None

    def unperturbed(self, dtype: torch.dtype):
        return (
            lambda outer: {n: t.to(dtype) for n, t in outer.items()},
            lambda i, w: {k: t.to(dtype) for k, t in w.items()},
            None,
        )

    def flush(self, tr: ZOTrainer, upto: int) -> None:
        if any(a < upto for a in tr.applied[1:]):
            with torch.inference_mode(), self.streamer.open_pass() as blocks:
                for i, w in blocks:
                    tr.catch_up(i + 1, w, upto)
        self.streamer.flush()  # resident blocks and the outer tensors back to the host copy


class LossWorkload:
    """Forward of one batch with given weight transforms. At the end, per example: (NLL sum, target
    count) for a token batch (ids, labels, lens); (candidate CE, 1) for a candidate batch, whose 4th
    element is its losses.CandidateIndex."""

    def __init__(
        self,
        fam: Any,
        spec: Any,
        batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        outer_fn: WeightFn | None = None,
        block_fn: Callable[[int, dict], dict] | None = None,
        lora_fn: Callable[[int], LoraSet | None] | None = None,
        workspace: Workspace | None = None,
    ) -> None:
        """workspace: where the head writes its logits (engine/workspace.py); None: a new tensor."""
        self.fam, self.spec, self.workspace = fam, spec, workspace
        self.ids, self.labels, lens = batch[:3]
        self.index: LS.CandidateIndex | None = batch[3] if len(batch) > 3 else None
        self.choice_score = "mean"
        self.attn = AttentionBatch.build(lens, self.ids.shape[1])
        self.outer_fn, self.block_fn, self.lora_fn = outer_fn, block_fn, lora_fn
        self.h: torch.Tensor | None = None
        self.sums = self.counts = self.loglik = None

    def begin(self, outer: dict[str, torch.Tensor]) -> None:
        o = self.outer_fn(outer) if self.outer_fn else outer
        self.h = self.fam.embed(o, self.ids, self.attn.positions, self.spec)

    def block(self, i: int, w: dict[str, torch.Tensor]) -> None:
        w = self.block_fn(i, w) if self.block_fn else w
        lora = self.lora_fn(i) if self.lora_fn else None
        self.h = self.fam.block(self.h, w, self.attn.layer(i), self.spec, lora)

    def end(self, outer: dict[str, torch.Tensor]) -> None:
        # The head runs only at the positions the loss reads ([N, H] -> [N, V]): a loss never needs the
        # [B, T, V] logits, and the head is ~20 % of a small model's FLOPs (bench/RESULTS.md).
        o = self.outer_fn(outer) if self.outer_fn else outer
        b, t, hidden = self.h.shape
        h, self.h = self.h.reshape(b * t, hidden), None
        if self.index is None:
            rows, targets = D.target_rows(self.labels)
            nll = D.rows_nll(
                self.fam.head(h.index_select(0, rows), o, self.spec, self._out(h, len(rows))), targets
            )
            self.sums = D.place_nll(nll, rows, b, t).sum(1)  # the reduction of data.nll_per_example
            self.counts = (self.labels[:, 1:] != D.IGNORE).sum(1)
            return
        # Candidates: each scored position once (single-token candidates of a record share one).
        at, inv = torch.unique(self.index.rows * t + self.index.pos, return_inverse=True)
        logits = self.fam.head(h.index_select(0, at), o, self.spec, self._out(h, len(at)))  # [positions, V]
        self.loglik = LS.summed_loglik(-D.rows_nll(logits, self.index.tok, rows=inv), self.index)  # [N]
        ce = LS.candidate_ce(self.loglik, self.index, self.choice_score)
        self.sums, self.counts = ce, torch.ones_like(ce, dtype=torch.int64)

    def _out(self, h: torch.Tensor, rows: int) -> torch.Tensor | None:
        """The head's output buffer [rows, V] in the workspace (the logits die inside end())."""
        ws = self.workspace
        return None if ws is None else ws.take((rows, self.spec.vocab), h.dtype, h.device)

    def mean_loss(self) -> float:
        # Sum of per-example sums, then one division: the reduction order data-parallel runs reproduce.
        return float(self.sums.double().sum() / max(int(self.counts.sum()), 1))


class ZOStepWorkload:
    """The estimator's forwards (estimators.forwards) of each of this process's micro-batches, in one pass."""

    def __init__(self, tr: ZOTrainer, step: int, batches) -> None:
        self.tr, self.step = tr, step
        cfg, fam, spec = tr.cfg, tr.fam, tr.spec
        micro = batches if isinstance(batches, list) else [batches]  # one (ids, labels, lens) or a list
        self.plan = E.forwards(cfg.estimator, cfg.q)
        # One z per direction, shared by every micro-batch and both signs (engine/perturb.py).
        pair = any(sign == -1 for _, sign in self.plan)  # fzoo runs θ + εz only
        self.perturbation = tr.perturbers([rng.step_seed(cfg.seed, step, d) for d in range(cfg.q)], pair)
        # grzo: per micro-batch, each record's direction (its group in the global batch).
        rank, world = tr.shard
        first = rank * (cfg.batch_size // world)  # global position of this process's first record
        self.groups: list[list[int]] = []
        # micro-batch-major, each in plan order: mezo [m0 +d0, m0 -d0, m0 +d1, ..., m1 +d0, ...]
        self.subs: list[LossWorkload] = []
        for batch in micro:
            records = batch_records(batch)
            self.groups.append([E.group_of(first + j, cfg.batch_size, cfg.q) for j in range(records)])
            first += records
            for d, sign in self.plan:
                if d == E.GROUPED:
                    fns = (None, None, self._grouped_lora(batch, self.groups[-1], sign))
                elif sign == E.UNPERTURBED:
                    fns = tr.unperturbed()
                else:
                    fns = self.perturbation.functions(d, sign)
                self.subs.append(LossWorkload(fam, spec, batch, *fns, workspace=tr.workspace))
                self.subs[-1].choice_score = cfg.choice_score
        self.tokens = 0  # target tokens of the whole (global) batch, set by losses()

    def _grouped_lora(self, batch, groups: list[int], sign: int) -> Callable[[int], LoraSet]:
        """lora_fn of a grzo forward: the rows of group d's records run with direction d's ± copies."""
        rows_of = record_rows(batch)  # per record, its rows of the collated batch
        rows: dict[int, list[int]] = {}
        for j, d in enumerate(groups):
            rows.setdefault(d, []).extend(rows_of[j])
        device = batch[0].device
        index = {d: torch.tensor(r, dtype=torch.int64, device=device) for d, r in rows.items()}
        pert = self.perturbation

        def lora_fn(i: int) -> LoraSet:
            out: LoraSet = {}
            for d, r in index.items():
                for m, (lw,) in pert.lora(d, sign, i).items():
                    out.setdefault(m, []).append(replace(lw, rows=r))
            return out

        return lora_fn

    def begin(self, outer: dict[str, torch.Tensor]) -> None:
        self.tr.catch_up(0, outer, self.step)
        for s in self.subs:
            s.begin(outer)

    def block(self, i: int, w: dict[str, torch.Tensor]) -> None:
        self.tr.catch_up(i + 1, w, self.step)
        for s in self.subs:
            s.block(i, w)

    def end(self, outer: dict[str, torch.Tensor]) -> None:
        for s in self.subs:
            s.end(outer)

    def partials(self) -> torch.Tensor:
        """[micro-batches, k+1] float64 (k forwards per micro-batch): per micro-batch, the loss sum of each
        forward in plan order and its target count (tokens, or records for candidates; exact below 2^53)."""
        k = len(self.plan)
        if self.plan[0][0] == E.GROUPED:
            return self._group_partials()
        rows = [
            [float(s.sums.double().sum()) for s in self.subs[i : i + k]] + [int(self.subs[i].counts.sum())]
            for i in range(0, len(self.subs), k)
        ]
        return torch.tensor(rows, dtype=torch.float64)

    def _group_partials(self) -> torch.Tensor:
        """grzo: [micro-batches, 3q] float64: per micro-batch, the loss sums of its records in each group
        on the + forward (q columns), on the - forward (q), and their target counts (q); a group absent
        from the micro-batch holds zeros. Sums run over the records in batch order."""
        q = self.tr.cfg.q
        rows = []
        for m, groups in enumerate(self.groups):
            plus, minus = self.subs[2 * m], self.subs[2 * m + 1]
            row = [0.0] * (3 * q)
            sp, sm, c = plus.sums.double().tolist(), minus.sums.double().tolist(), plus.counts.tolist()
            for j, d in enumerate(groups):
                row[d] += sp[j]
                row[q + d] += sm[j]
                row[2 * q + d] += c[j]
            rows.append(row)
        return torch.tensor(rows, dtype=torch.float64)

    def losses(self) -> list[tuple[float, float]]:
        """(L+, L_ref) per direction over the global batch (estimators.pairs: mezo (L+, L-), fzoo (L_d,
        L_0), grzo (L+_d, L-_d) of group d); data-parallel ranks gather the partials first."""
        rows = self.partials()
        if self.tr.reducer is not None:
            rows = self.tr.reducer(rows, self.step)
        if self.plan[0][0] == E.GROUPED:
            losses, self.tokens = reduce_groups(rows, self.tr.cfg.q)
        else:
            losses, self.tokens = reduce_forwards(rows, len(self.plan))
        return E.pairs(self.tr.cfg.estimator, losses)


def batch_records(batch) -> int:
    """Records in a collated micro-batch: rows of a token batch, records of a candidate batch."""
    return len(batch[3].per_record) if len(batch) > 3 else int(batch[0].shape[0])


def record_rows(batch) -> list[list[int]]:
    """Per record of a collated micro-batch, its rows: one for a token batch; for a candidate batch one
    (single-token candidates) or one per candidate (losses.candidate_rows)."""
    if len(batch) <= 3:
        return [[j] for j in range(int(batch[0].shape[0]))]
    index = batch[3]
    first_row = index.rows[index.slots[:, 0]].tolist()  # [N] row of each candidate's first token
    out, n = [], 0
    for k in index.per_record:
        out.append(sorted(set(first_row[n : n + k])))
        n += k
    return out


def reduce_groups(rows: torch.Tensor, q: int) -> tuple[list[float], int]:
    """grzo rows [M, 3q] (see ZOStepWorkload._group_partials) -> ([L+_0..L+_{q-1}, L-_0..L-_{q-1}],
    count): float64 column sums over the micro-batches in global order, one division per group."""
    sums = [0.0] * (3 * q)
    for row in rows.tolist():
        for j in range(3 * q):
            sums[j] += row[j]
    counts = [max(int(c), 1) for c in sums[2 * q :]]
    losses = [sums[d] / counts[d] for d in range(q)] + [sums[q + d] / counts[d] for d in range(q)]
    return losses, int(sum(sums[2 * q :]))


def reduce_partials(rows: torch.Tensor, q: int) -> tuple[list[tuple[float, float]], int]:
    """Rows [M, 2q+1] of a mezo step -> ([(L+, L-)] per direction, tokens); see reduce_forwards."""
    losses, count = reduce_forwards(rows, 2 * q)
    return [(losses[2 * d], losses[2 * d + 1]) for d in range(q)], count


def reduce_forwards(rows: torch.Tensor, k: int) -> tuple[list[float], int]:
    """Rows [M, k+1] of every micro-batch of the step, in global order -> ([L] per forward, count).

    L = (((0 + s_0) + s_1) + ... + s_{M-1}) / (c_0 + ... + c_{M-1}), float64 sums left to right, one division.
    The order is fixed by the rows, not by who computed them: W ranks that gather their rows in rank order
    get bitwise the single-process value (with one row this is the plain sum-then-divide of one batch).
    """
    sums = [0.0] * k
    count = 0
    for row in rows.tolist():
        for j in range(k):
            sums[j] += row[j]
        count += int(row[k])
    c = max(count, 1)
    return [x / c for x in sums], count


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
    ) -> None:
        """applied: per group, the steps already in its master (resume); None: a fresh job.
        working_copy: a full-parameter job's working_copy.WorkingCopy (what export copies)."""
        self.cfg, self.fam, self.spec = cfg, fam, spec
        self.streamer, self.log, self.train, self.pad_id = streamer, log, train, pad_id
        self.dtype, self.adapter, self.rounding = compute_dtype, adapter, rounding
        self.device = streamer.device
        self.loss = LS.resolve_loss(cfg.loss, train.kind)  # "tokens" | "candidates"
        if trainable is not None:
            self.strategy: LoraStrategy | FullStrategy = FullStrategy(trainable, fam.layer_prefix, streamer)
        else:
            assert adapter is not None, "a trainer needs an adapter (LoRA) or trainable masters (full)"
            self.strategy = LoraStrategy(adapter, spec.num_layers)
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
        self.schedule = zo.LRSchedule(
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
        self.workspace = Workspace()  # the forwards' logits and outer copies (CPU), kept from step to step

    @property
    def step(self) -> int:
        return len(self.steps)

    @property
    def done(self) -> bool:
        return self.step >= self.cfg.steps

    # ---- trainable groups ----------------------------------------------------------------------
    def perturbers(self, seeds: list[int], pair: bool = True) -> PassPerturbation:
        """The θ ± ε z work copies of one pass for the directions' step seeds (one z per direction);
        pair False: θ + ε z only."""
        return PassPerturbation(
            seeds,
            self.cfg.noise,
            self.cfg.epsilon,
            self.dtype,
            self.fam.layer_prefix,
            self.adapter,
            pair,
            self.workspace,
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
    def batch(self, step: int):
        idx = D.batch_order(len(self.train.examples), self.cfg.batch_size, self.cfg.seed, step)
        ids, labels, lens = D.collate([self.train.examples[i] for i in idx], self.pad_id)
        return ids.to(self.device), labels.to(self.device), lens.to(self.device)

    def batches(self, step: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """This process's micro-batches of the step's batch, in global order: rank r of W takes positions
        [r*B/W, (r+1)*B/W) of batch_order(...) and cuts them into micro_batch-sized slices."""
        cfg, (rank, world) = self.cfg, self.shard
        idx = D.batch_order(len(self.train.examples), cfg.batch_size, cfg.seed, step)
        per = cfg.batch_size // world
        idx, mb = idx[rank * per : (rank + 1) * per], cfg.micro_batch_size
        out = []
        for i in range(0, per, mb):
            if self.loss == "candidates":
                rows, index = LS.candidate_rows([self.train.choices[j] for j in idx[i : i + mb]])
                ids, labels, lens = D.collate(rows, self.pad_id)
                d = self.device
                out.append((ids.to(d), labels.to(d), lens.to(d), index.to(d)))
                continue
            ids, labels, lens = D.collate([self.train.examples[j] for j in idx[i : i + mb]], self.pad_id)
            out.append((ids.to(self.device), labels.to(self.device), lens.to(self.device)))
        return out

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
                reason = reason or zo.divergence_check(g, lp, lm, history)
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

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(self, ds: D.Dataset, batch_size: int = 8) -> dict[str, float]:
        """Loss (and multiple-choice accuracy) with the current, flushed weights."""
        self.flush()
        lora_fn = self.strategy.lora_fn()
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


@torch.inference_mode()
def evaluate(
    fam: Any,
    spec: Any,
    streamer: LayerStreamer,
    ds: D.Dataset,
    pad_id: int,
    device: torch.device,
    lora_fn: Callable[[int], LoraSet | None] | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Mean token loss over ds.examples. For choice datasets: `loss` is the answers' token NLL, `accuracy`
    ranks candidates by length-normalised log-likelihood and `candidate_loss` is the mean cross-entropy
    over the candidates (the candidates training loss, length-normalised scores)."""

    def score(examples: list[D.Example]) -> tuple[torch.Tensor, torch.Tensor]:
        sums, counts = [], []
        for i in range(0, len(examples), batch_size):
            ids, labels, lens = D.collate(examples[i : i + batch_size], pad_id)
            wl = LossWorkload(
                fam, spec, (ids.to(device), labels.to(device), lens.to(device)), lora_fn=lora_fn
            )
            run_pass(streamer, [wl])
            sums.append(wl.sums.double().cpu())
            counts.append(wl.counts.cpu())
        return torch.cat(sums), torch.cat(counts)

    if not ds.choices:
        sums, counts = score(ds.examples)
        return {"loss": float(sums.sum() / max(int(counts.sum()), 1))}
    # Multiple choice: every candidate's log-likelihood, read off the fewest rows (losses.candidate_rows).
    lls, lengths = [], []
    for i in range(0, len(ds.choices), batch_size):
        rows, index = LS.candidate_rows(ds.choices[i : i + batch_size])
        ids, labels, lens = D.collate(rows, pad_id)
        batch = (ids.to(device), labels.to(device), lens.to(device), index.to(device))
        wl = LossWorkload(fam, spec, batch, lora_fn=lora_fn)
        run_pass(streamer, [wl])
        lls.append(wl.loglik.double().cpu())
        lengths.append(index.lengths)
    ll, n = torch.cat(lls), torch.cat(lengths)
    per = (ll / n).tolist()
    scores, k, loss_sum, loss_count, ce = [], 0, 0.0, 0, 0.0
    for ch in ds.choices:
        row = per[k : k + len(ch.candidates)]
        scores.append(row)
        loss_sum -= float(ll[k + ch.answer])
        loss_count += int(n[k + ch.answer])
        ce += float(torch.logsumexp(torch.tensor(row, dtype=torch.float64), 0)) - row[ch.answer]
        k += len(ch.candidates)
    return {
        "loss": loss_sum / max(loss_count, 1),
        "accuracy": D.choice_accuracy(scores, [ch.answer for ch in ds.choices]),
        "candidate_loss": ce / len(ds.choices),
    }


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
