"""The forwards of one training step inside the pass over the layers, and the reduction of their losses.

LossWorkload runs one batch with given weight transforms and keeps per-example (loss sum, count) rows;
ZOStepWorkload runs the estimator's perturbed forwards of every micro-batch of a step (engine/estimators.py)
and turns their rows into the step's losses, in an order data-parallel ranks reproduce bitwise.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from . import data as D
from . import estimators as E
from . import losses as LS
from . import rng
from .models.attention import AttentionBatch, LoraSet
from .workspace import Workspace

if TYPE_CHECKING:
    from .trainer import ZOTrainer

WeightFn = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


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
            rows, targets = LS.target_rows(self.labels)
            nll = LS.rows_nll(
                self.fam.head(h.index_select(0, rows), o, self.spec, self._out(h, len(rows))), targets
            )
            self.sums = LS.place_nll(nll, rows, b, t).sum(1)  # the reduction of losses.nll_per_example
            self.counts = (self.labels[:, 1:] != D.IGNORE).sum(1)
            return
        # Candidates: each scored position once (single-token candidates of a record share one).
        at, inv = torch.unique(self.index.rows * t + self.index.pos, return_inverse=True)
        logits = self.fam.head(h.index_select(0, at), o, self.spec, self._out(h, len(at)))  # [positions, V]
        self.loglik = LS.summed_loglik(-LS.rows_nll(logits, self.index.tok, rows=inv), self.index)  # [N]
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
                if d == E.GROUPED and tr.groups_apart:
                    fns = self.perturbation.functions(self._one_group(self.groups[-1]), sign)
                elif d == E.GROUPED:
                    fns = (None, None, self._grouped_lora(batch, self.groups[-1], sign))
                elif sign == E.UNPERTURBED:
                    fns = tr.unperturbed()
                else:
                    fns = self.perturbation.functions(d, sign)
                self.subs.append(LossWorkload(fam, spec, batch, *fns, workspace=tr.workspace))
                self.subs[-1].choice_score = cfg.choice_score
        self.tokens = 0  # target tokens of the whole (global) batch, set by losses()

    @staticmethod
    def _one_group(groups: list[int]) -> int:
        """grzo, full parameters: the direction of a micro-batch, which holds one group's records (the
        trainer cuts them so: ZOTrainer.batches); the whole forward runs θ ± ε z_d of that group."""
        if len(set(groups)) != 1:
            raise AssertionError(f"a full-parameter grzo micro-batch spans groups {sorted(set(groups))}")
        return groups[0]

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
