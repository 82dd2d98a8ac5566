"""The divergence guard: the outlier rule for one step, and the slow-climb rule, a pure function over the
logged training losses of accepted steps.

The outlier rule (divergence_check, below) skips one step whose |g| is far above the recent median. A slow
climb is different: every step looks ordinary (MeZO at too large an lr: |g| grows 2 -> 5-10 over dozens
of steps while the loss drifts up, then a huge step), so no single step is an outlier. This rule compares
the mean loss of the last `window` accepted steps with the lowest mean of any earlier window of the same
length; when it is more than `rise` (a fraction) above it, the rule trips.

Action: lr backoff. From the step after a trip on, every step's lr is the schedule's lr times
`backoff ** trips`. Why backoff and not skip: in a climb each step is individually plausible and the
condition persists for many steps, so skipping would stall the job (every later step skipped) while the
lr that caused the climb stays; a smaller lr is the cure MeZO-style runs need (the climb is an lr too
large for the noise of the estimate). The backoff is carried by the log: each record stores the lr it
was applied with, so replay needs no rule. Resume rebuilds the state by running the same function over
the logged (float32) losses of the accepted steps (`replay_state`), so a job killed and resumed makes the
same decisions as one that never stopped.

After a trip the history starts again (the climb that tripped it is not judged twice): the rule needs
`2 * window` accepted losses after a trip before it can trip again, and compares with windows seen since.
Logs written before the step loss was recorded (format versions 1 and 2) carry no losses: jobs resumed
from them keep the outlier rule only.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class ClimbRule:
    """Thresholds of the slow-climb rule (engine config: ZOConfig.climb_*)."""

    window: int = 20  # accepted steps per window; the rule needs 2 * window of them
    rise: float = 0.5  # trip when the recent window's mean loss exceeds the best earlier one's by this share
    backoff: float = 0.5  # lr multiplier applied per trip

    def __post_init__(self) -> None:
        if not (isinstance(self.window, int) and not isinstance(self.window, bool) and self.window >= 1):
            raise ValueError(f"climb_window must be an integer >= 1, got {self.window!r}")
        if not (isinstance(self.rise, int | float) and math.isfinite(self.rise) and self.rise > 0):
            raise ValueError(f"climb_rise must be a finite number > 0, got {self.rise!r}")
        if not (isinstance(self.backoff, int | float) and 0 < self.backoff < 1):
            raise ValueError(f"climb_backoff must be in (0, 1), got {self.backoff!r}")


@dataclass(frozen=True)
class ClimbState:
    """What the rule remembers: the lr factor, and the losses seen since the last trip."""

    trips: int = 0
    seen: int = 0  # accepted finite losses since the last trip (or the start)
    recent: tuple[float, ...] = ()  # the last 2 * window of them, oldest first
    best: float = math.inf  # lowest mean of a window that ended before the recent window began

    def factor(self, rule: ClimbRule) -> float:
        """The lr multiplier now: backoff ** trips."""
        return rule.backoff**self.trips


def observe(state: ClimbState, loss: float, rule: ClimbRule) -> tuple[ClimbState, str | None]:
    """Add one accepted step's loss; returns the new state and, when the rule trips, the reason.

    A non-finite loss is ignored (the outlier rule skips such steps). Means are math.fsum / window, so the
    decision depends only on the loss values, not on the machine.
    """
    if not math.isfinite(loss):
        return state, None
    w = rule.window
    seen, recent = state.seen + 1, (*state.recent, float(loss))[-2 * w :]
    best = state.best
    if seen >= 2 * w:  # the window just before the recent one is complete: it joins the earlier windows
        best = min(best, math.fsum(recent[:w]) / w)
    state = replace(state, seen=seen, recent=recent, best=best)
    if seen < 2 * w:
        return state, None
    now = math.fsum(recent[w:]) / w
    if now - best <= rule.rise * abs(best):
        return state, None
    reason = (
        f"slow climb: mean loss {now:.4g} of the last {w} steps is over {1 + rule.rise:g}x the best "
        f"earlier {w}-step mean {best:.4g}; lr x{rule.backoff:g} from the next step"
    )
    return ClimbState(trips=state.trips + 1), reason


def trip_steps(losses: Iterable[float], rule: ClimbRule) -> list[int]:
    """Positions in `losses` (accepted steps' losses in order, from a fresh state) where the rule trips."""
    state, out = ClimbState(), []
    for t, loss in enumerate(losses):
        state, reason = observe(state, loss, rule)
        if reason:
            out.append(t)
    return out


def replay_state(losses: Iterable[float | None], rule: ClimbRule) -> ClimbState:
    """The state after the logged losses of the accepted steps, in step order (None: no loss logged)."""
    state = ClimbState()
    for loss in losses:
        if loss is not None:
            state, _ = observe(state, loss, rule)
    return state


def divergence_check(
    g: float,
    loss_plus: float,
    loss_minus: float,
    history: list[float],
    max_ratio: float = 20.0,
    min_history: int = 8,
) -> str | None:
    """None if the step looks sane, else a short reason to skip it.

    history: recent accepted g values; outliers are judged against the median |g| once it holds
    min_history finite entries (a zero median gives no scale, so nothing is flagged then).
    """
    if not (math.isfinite(loss_plus) and math.isfinite(loss_minus)):
        return f"non-finite loss (L+={loss_plus}, L-={loss_minus})"
    if not math.isfinite(g):
        return f"non-finite projected gradient g={g}"
    finite = [abs(h) for h in history if math.isfinite(h)]
    if len(finite) >= min_history:
        median = statistics.median(finite)
        if median > 0 and abs(g) > max_ratio * median:
            return (
                f"|g|={abs(g):.4g} is over {max_ratio:g}x the median |g| {median:.4g} "
                f"of the last {len(finite)} steps"
            )
    return None
