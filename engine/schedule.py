"""The learning rate of each step: constant, linear or cosine after a linear warmup (the Hugging Face shapes).

A pure function of the step, returned as a float32 value: the update log stores it, and replay reads it
from there (engine/trainer.py multiplies in the slow-climb backoff, engine/climb.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import LR_SCHEDULES
from .zo import f32


@dataclass(frozen=True)
class LRSchedule:
    """Learning rate per 0-based step, the Hugging Face way.

    Warmup: base * step / warmup_steps for step < warmup_steps (step 0 gets 0). Then, with
    progress = (step - warmup) / (total_steps - warmup) clamped to [0, 1]: constant (base), linear
    (base → min) or cosine (base → min, half a cosine); min = min_lr_ratio * base.
    """

    kind: str
    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in LR_SCHEDULES:
            raise ValueError(f"lr schedule kind must be one of {', '.join(LR_SCHEDULES)}, got {self.kind!r}")
        if not (isinstance(self.base_lr, int | float) and math.isfinite(self.base_lr) and self.base_lr > 0):
            raise ValueError(f"base_lr must be a finite number > 0, got {self.base_lr!r}")
        if not isinstance(self.total_steps, int) or self.total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {self.total_steps!r}")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(
                f"warmup_steps must be an integer in [0, total_steps={self.total_steps}], "
                f"got {self.warmup_steps!r}"
            )
        if not (isinstance(self.min_lr_ratio, int | float) and 0.0 <= self.min_lr_ratio <= 1.0):
            raise ValueError(
                f"min_lr_ratio must be in [0, 1] (a fraction of base_lr), got {self.min_lr_ratio!r}"
            )

    def lr_at(self, step: int) -> float:
        """The float32 learning rate of 0-based `step` (steps past total_steps keep the final value)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps:
            return f32(self.base_lr * step / self.warmup_steps)
        if self.kind == "constant":
            return f32(self.base_lr)
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        shape = 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return f32(self.base_lr * (self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape))
