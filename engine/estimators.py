"""Zeroth-order gradient estimators: which forwards a step runs and the coefficient logged per direction.

Every estimator ends in the same update, θ ← θ - η · mean_d c_d z_d, with z_d = noise(step_seed(job,
step, d)). The update log stores c_d (as its `g`) and η, so replay applies a step without knowing which
estimator produced it: a new estimator changes what is computed, never how the log is read.

  mezo  2q forwards θ ± ε z_d;   c_d = (L+_d - L-_d) / (2ε)                       (MeZO SPSA)
  fzoo  q+1 forwards θ, θ + ε z_d (one-sided, sharing the unperturbed pass);
        c_d = (L_d - L_0) / σ,  σ = population std of L_1..L_q                   (FZOO, arXiv 2506.09034)
  grzo  2 forwards of the batch, θ + ε z and θ - ε z, where the batch is cut into q groups of B/q
        consecutive records and group d runs with its own direction z_d (LoRA: one mixed-adapter batch;
        full parameters: each group's records as their own micro-batches, through θ ± ε z_d);
        Δ_d = L+_d - L-_d over group d's records, c_d = Δ_d / rms(Δ)             (GRZO, arXiv 2606.02857)

FZOO's σ ≈ ε |∇L| (the spread of ε z·∇L over directions), so c_d ≈ z_d·∇L / |∇L|: a unit-scale step
whatever the loss scale, ε or stage of training — the normalisation that lets one default learning
rate work across tasks. With all losses equal there is no signal and every c_d is 0.

GRZO buys q directions for the price of one ± pair: each direction's derivative is read off its own
group's records, E[Δ_d z_d] = 2ε ∇L_group(d), so the mean over groups estimates the batch gradient.
The group's scale is its RMS (not a centred std: a ± difference has no even-order term, so there is
no shared offset to remove and centring would only shrink the step by 1 - 1/q).
"""

from __future__ import annotations

import math

from .zo import f32

UNPERTURBED = 0  # sign of the shared θ forward
GROUPED = -1  # direction of a grzo forward: each group of records runs its own direction
ESTIMATORS = ("mezo", "fzoo", "grzo")


def forwards(name: str, q: int) -> list[tuple[int, int]]:
    """(direction, sign) of each forward of a step, in the order the pass runs them (sign 0: θ itself)."""
    if name == "mezo":
        return [(d, s) for d in range(q) for s in (1, -1)]
    if name == "fzoo":
        return [(0, UNPERTURBED)] + [(d, 1) for d in range(q)]
    if name == "grzo":
        return [(GROUPED, 1), (GROUPED, -1)]
    raise ValueError(f"estimator: unknown {name!r}")


def group_of(position: int, batch: int, q: int) -> int:
    """grzo: the direction of the record at `position` of the step's global batch (q groups of B/q)."""
    return position * q // batch


def pairs(name: str, losses: list[float]) -> list[tuple[float, float]]:
    """The step's losses as one (L+, L_ref) pair per direction: mezo (L+_d, L-_d) from the forwards'
    losses; fzoo (L_d, L_0); grzo (L+_d, L-_d) from [L+_0..L+_{q-1}, L-_0..L-_{q-1}] (per group)."""
    if name == "mezo":
        return [(losses[2 * d], losses[2 * d + 1]) for d in range(len(losses) // 2)]
    if name == "grzo":
        q = len(losses) // 2
        return [(losses[d], losses[q + d]) for d in range(q)]
    return [(x, losses[0]) for x in losses[1:]]


def coefficients(name: str, pairs: list[tuple[float, float]], eps: float) -> list[float]:
    """The float32 c_d per direction from the step's (L+, L_ref) pairs, computed in float64."""
    if name == "mezo":
        return [f32((lp - lm) / (2.0 * eps)) for lp, lm in pairs]
    if name == "fzoo":
        ls = [lp for lp, _ in pairs]
        l0 = pairs[0][1]
        if not all(math.isfinite(x) for x in (*ls, l0)):
            return [math.nan] * len(ls)
        mean = math.fsum(ls) / len(ls)
        sigma = math.sqrt(math.fsum((x - mean) ** 2 for x in ls) / len(ls))
        if sigma == 0.0:
            return [0.0] * len(ls)
        return [f32((x - l0) / sigma) for x in ls]
    if name == "grzo":
        deltas = [lp - lm for lp, lm in pairs]
        if not all(math.isfinite(x) for x in deltas):
            return [math.nan] * len(deltas)
        rms = math.sqrt(math.fsum(x * x for x in deltas) / len(deltas))
        if rms == 0.0:
            return [0.0] * len(deltas)
        return [f32(x / rms) for x in deltas]
    raise ValueError(f"estimator: unknown {name!r}")


def summary(name: str, pairs: list[tuple[float, float]]) -> dict[str, float]:
    """The step's reported losses: `loss` (θ's loss for fzoo, the mean of the pairs for mezo and grzo)
    and the first direction's pair as `loss_plus` / `loss_minus` (for fzoo, L_1 and L_0)."""
    if name in ("mezo", "grzo"):
        loss = sum(lp + lm for lp, lm in pairs) / (2 * len(pairs))
        return {"loss": loss, "loss_plus": pairs[0][0], "loss_minus": pairs[0][1]}
    return {"loss": pairs[0][1], "loss_plus": pairs[0][0], "loss_minus": pairs[0][1]}
