"""The θ ± ε z work copies of one ZO pass, drawn once and shared by every forward that needs them.

A step runs 2q forwards per micro-batch: (+z_0, -z_0, +z_1, ...) for each of M micro-batches. The
work copies of a group (the outer tensors, or block i) depend only on the direction and the sign,
so they are made once per pass: when the first forward reaches the group, every direction's pair
comes from one draw of z and one read of θ (zo.perturbed_pair), and the M micro-batches' forwards
use them. The outer pairs live for the whole pass (the embedding at `begin` and the head at `end`
read the same copies); a block's pairs are dropped when the pass moves on to the next block.
The master is never written (invariant 2).

Memory: 2q work copies of one group at a time (plus the outer group's), where the per-forward
scheme held one; q is small (1-4) and a block is a small part of a model. One-sided estimators (fzoo)
make only the θ + εz copies (pair=False): q copies, and half the writes. Full-parameter grzo, whose
micro-batches each run one direction in group order, holds one direction's pair of a block at a time
(one_direction): 2 copies. The outer group's copies live from the embedding to the head: 2q (q for fzoo),
except for full-parameter grzo on a device with its own memory, which draws them again for the head
(outer_one_direction): 2 copies there, and q more draws of the outer tensors' noise per pass.

Embedding rows: every row is perturbed (and updated), as MeZO does, not only the rows a batch gathers.
With tied embeddings (SmolLM2, small Llama 3 / Qwen, OPT) the head reads every row in every forward, so
all rows take part; untied, a row no token gathers has no gradient, but skipping it would make the
direction depend on the batch's tokens, which the update and replay would then need. The whole table
costs vocab x hidden noise elements per direction (21 % of SmolLM2-135M's; bench/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import zo
from .models.attention import LoraSet
from .workspace import Workspace

Pairs = list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]  # per direction: (θ + εz, θ - εz)


class PassPerturbation:
    """Work copies for the directions `seeds` (step seeds, in direction order) of one pass."""

    def __init__(
        self,
        seeds: list[int],
        kind: str,
        eps: float,
        dtype: torch.dtype,
        layer_prefix: Callable[[int], str],
        adapter: Any = None,
        pair: bool = True,
        workspace: Workspace | None = None,
        one_direction: bool = False,
        outer_one_direction: bool = False,
    ) -> None:
        """pair False: only θ + εz is made (one-sided estimators such as fzoo never run θ - εz).
        workspace: where the outer tensors' copies are written (engine/workspace.py: the embedding's
        copies are the largest allocations of a step); their previous contents are dead by then.
        one_direction: a block holds one direction's copies at a time, made when a forward first asks
        for that direction (2 copies of the block instead of 2q). For callers whose forwards ask for the
        directions in runs (full-parameter grzo: micro-batches in group order); otherwise a direction
        asked for again after another is drawn again. outer_one_direction: the outer tensors' copies too;
        the embedding (at `begin`) and the head (at `end`) each ask for every direction, so each is drawn
        twice a pass: the price of 2 copies of the embedding on the device instead of 2q."""
        self.seeds, self.kind, self.eps, self.dtype = seeds, kind, eps, dtype
        self.layer_prefix, self.adapter, self.pair = layer_prefix, adapter, pair
        self.workspace, self.one_direction = workspace, one_direction
        self.outer_one_direction = outer_one_direction
        # (the outer dict perturbed, its pairs, the direction held: None when all are)
        self._outer: tuple[object, Pairs, int | None] | None = None
        # (block index, its dict, its pairs, the direction held: None when all are)
        self._block: tuple[int, object, Pairs, int | None] | None = None

    def _pairs(
        self,
        named: dict[str, torch.Tensor],
        out_dtype: torch.dtype,
        reuse: bool = False,
        multi: bool = False,
        only: int | None = None,
    ) -> Pairs:
        """named: full tensor name -> master tensor; one draw of z per direction and tensor.
        reuse: write into the workspace's buffers of these names (the outer group). multi: one kernel
        launch per direction for all of `named` where one exists (zo.perturbed_pairs: LoRA's small
        factors on CUDA; a block's full weights would cost a packed copy there, so only LoRA asks).
        only: direction `only`'s pair alone (the list holds empty dicts for the others)."""
        out: Pairs = [({}, {}) for _ in self.seeds]  # without pair, the θ - εz dicts stay empty
        if multi and named:
            for d, seed in enumerate(self.seeds):
                res = zo.perturbed_pairs(named, self.kind, seed, self.eps, out_dtype, self.pair)
                if res is None:
                    break
                for name, (plus, minus) in res.items():
                    out[d][0][name] = plus
                    if minus is not None:
                        out[d][1][name] = minus
            else:
                return out
        ws = self.workspace if reuse else None
        for name, t in named.items():
            for d, seed in enumerate(self.seeds):
                if only is not None and d != only:
                    continue
                bufs = None
                if ws is not None:
                    bufs = tuple(ws.buffer((name, d, s), t.numel(), out_dtype, t.device) for s in (1, -1))
                    bufs = None if bufs[0] is None else bufs
                if self.pair:
                    out[d][0][name], out[d][1][name] = zo.perturbed_pair(
                        t, self.kind, seed, name, self.eps, out_dtype, out=bufs
                    )
                else:
                    plus = None if bufs is None else bufs[0]
                    out[d][0][name] = zo.perturbed(t, self.kind, seed, name, self.eps, 1, out_dtype, out=plus)
        return out

    def outer(self, d: int, sign: int, outer: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        held = d if self.outer_one_direction else None
        o = self._outer
        if o is None or o[0] is not outer or o[2] != held:
            self._outer = o = None  # free the previous copies first (o held them too)
            self._outer = (outer, self._pairs(outer, self.dtype, reuse=True, only=held), held)
        return self._outer[1][d][0 if sign > 0 else 1]

    def block(self, d: int, sign: int, i: int, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        held = d if self.one_direction else None
        b = self._block
        if b is None or b[0] != i or b[1] is not w or b[3] != held:
            self._block = b = None  # free the previous copies first (b held them too)
            prefix = self.layer_prefix(i)
            pairs = self._pairs({prefix + k: t for k, t in w.items()}, self.dtype, only=held)
            local = [
                ({k: p[prefix + k] for k in w if p}, {k: m[prefix + k] for k in w if m}) for p, m in pairs
            ]
            self._block = (i, w, local, held)
        return self._block[2][d][0 if sign > 0 else 1]

    def lora(self, d: int, sign: int, i: int) -> LoraSet:
        ad = self.adapter
        if self._block is None or self._block[0] != i:
            self._block = None
            named = {n: ad.tensors[n] for n in ad.layer_names(i)}
            self._block = (i, None, self._pairs(named, torch.float32, multi=True), None)
        pert = self._block[2][d][0 if sign > 0 else 1]
        return {m: [lw] for m, lw in ad.layer(i, tensors=pert).items()}

    def functions(self, d: int, sign: int) -> tuple[Callable | None, Callable | None, Callable | None]:
        """(outer_fn, block_fn, lora_fn) of LossWorkload for the forward of direction d, sign ±1."""
        if self.adapter is not None:
            return None, None, lambda i: self.lora(d, sign, i)
        return (lambda o: self.outer(d, sign, o)), (lambda i, w: self.block(d, sign, i, w)), None
