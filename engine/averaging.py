"""Iterate averaging: what a LoRA job evaluates, exports and serves is an exponential moving average of its
factors, not the last iterate.

A normalised ZO step (grzo) moves every factor by a fixed-size step along one random direction per group;
most of that step is noise the next steps do not repeat, and on a task whose classes the model must first
tell apart the held-out accuracy of the last iterate swings by 0.1 from one evaluation to the next. The
average ā_t = β ā_{t-1} + (1 - β) θ_t (ā_0 = θ_0, the initial factors) keeps the drift and damps the noise
over a window of about 1 / (1 - β) steps; training still perturbs and updates θ itself (Polyak averaging,
as the EMA weights of diffusion and vision training are kept beside the trained ones).

The average is derived state: it moves once per logged step (skipped ones too, so step t's average is
the same whatever the guard decided), after that step's update, and replay rebuilds it from the log alone.
Each update is two float32 multiplies and one add, each a single IEEE rounding (no fused multiply-add), so
every CPU and the replay compute the same bits. The log header's extra["average"] = {"kind": "ema",
"decay": β} says a job keeps one; a log without the entry (every log before it) serves its iterates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

KIND = "ema"


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


@dataclass(frozen=True)
class Average:
    """An exponential moving average of the trained tensors with decay β in (0, 1)."""

    decay: float

    def __post_init__(self) -> None:
        d = self.decay
        if not isinstance(d, float | int) or isinstance(d, bool) or not 0 < d < 1:
            raise ValueError(f"average_decay: must be a number in (0, 1), or 0 for no average, got {d!r}")

    @classmethod
    def of(cls, decay: float) -> Average | None:
        """The average of a job's decay; 0: none (the job serves its last iterate)."""
        return None if decay == 0 else cls(float(decay))

    def header_entry(self) -> dict[str, Any]:
        return {"kind": KIND, "decay": self.decay}

    @classmethod
    def from_header(cls, extra: dict[str, Any]) -> Average | None:
        """The average a log's header asks for; None for a log without one (it serves its iterates)."""
        entry = extra.get("average")
        if entry is None:
            return None
        if not isinstance(entry, dict) or entry.get("kind") != KIND or "decay" not in entry:
            raise ValueError(f"header extra.average {entry!r} is not {{'kind': 'ema', 'decay': β}}")
        return cls(entry["decay"])

    @property
    def window(self) -> float:
        """Steps the average spans, about: 1 / (1 - β)."""
        return 1.0 / (1.0 - self.decay)

    def update(self, avg: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> None:
        """ā ← β ā + (1 - β) θ in place, for every name of `tensors` (float32: [any shape], like θ's)."""
        beta, rest = _f32(self.decay), _f32(1.0 - self.decay)
        for name, t in tensors.items():
            a = avg[name]
            a.mul_(beta)
            a.add_(t * rest)  # the product rounded on its own: no FMA, the same bits on any CPU
