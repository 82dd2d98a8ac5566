"""How a job's trainable tensors are reached, per method: LoRA factors (LoraStrategy) or the base's own
weights (FullStrategy). The trainer asks its strategy, never the method, where a group's tensors are, when
their update counters move, and how to flush them (engine/trainer.py)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .averaging import Average
from .models.attention import LoraSet
from .peft import LoraAdapter
from .streamer import LayerStreamer

if TYPE_CHECKING:
    from .trainer import ZOTrainer


@dataclass
class Trainable:
    """The trainable tensors and how to reach them: full names -> master tensors per group."""

    groups: Callable[[int, dict[str, torch.Tensor] | None], dict[str, torch.Tensor]]
    num_groups: int
    on_written: Callable[[int, int, bool], None]  # (group, step, done) -> persist counters


class LoraStrategy:
    """A LoRA job: the adapter's factors are the trainable tensors (group g > 0: layer g-1's; the outer
    group has none). They live where compute runs, so an update applied is an update kept. A job that keeps
    an average (engine/averaging.py) moves it after every step applied to a group, and serves it."""

    def __init__(
        self,
        adapter: LoraAdapter,
        num_layers: int,
        average: Average | None = None,
        averaged: LoraAdapter | None = None,
    ) -> None:
        """averaged: the average at the adapter's step (a resumed job's checkpoint), else the adapter's
        own factors (a new job: ā_0 = θ_0)."""
        self.adapter, self.num_groups = adapter, num_layers + 1
        self.average = average
        self.averaged = None if average is None else (averaged if averaged is not None else adapter.clone())

    def tensors(self, g: int, _w: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Full name -> tensor of group g."""
        ad = self.adapter
        return {} if g == 0 else {n: ad.tensors[n] for n in ad.layer_names(g - 1)}

    def counters_move_at_apply(self) -> bool:
        return True

    def on_written(self, g: int, step: int, done: bool) -> None:
        # The adapter's state is saved whole at checkpoints; the average follows each applied step.
        if done and self.average is not None:  # group 0 (outer) holds no factors: an empty update
            self.average.update(self.averaged.tensors, self.tensors(g, None))

    def applied(self, g: int, upto: int) -> None:
        pass

    def served(self) -> LoraAdapter:
        """What the job evaluates, exports and serves: the average when it keeps one, else the factors."""
        return self.averaged if self.averaged is not None else self.adapter

    def lora_fn(self, served: bool = False) -> Callable[[int], LoraSet | None]:
        """Layer i -> its LoRA weights: the trained factors (the unperturbed forward), or served=True the
        served ones (evaluation)."""
        ad = self.served() if served else self.adapter
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

    def lora_fn(self, served: bool = False) -> None:
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
