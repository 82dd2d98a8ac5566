"""Zeroth-order gradient estimators: which forwards a step runs and the coefficient logged per direction.

Every estimator ends in the same update, θ ← θ - η · mean_d c_d z_d, with z_d = noise(step_seed(job,
step, d)). The update log stores c_d (as its `g`) and η, so replay applies a step without knowing which
estimator produced it: a new estimator changes what is computed, never how the log is read.

  mezo  2q forwards θ ± ε z_d;   c_d = (L+_d - L-_d) / (2ε)                       (MeZO SPSA)
  fzoo  q+1 forwards θ, θ + ε z_d (one-sided, sharing the unperturbed pass);
        c_d = (L_d - L_0) / σ,  σ = population std of L_1..L_q                   (FZOO, arXiv 2506.09034)

FZOO's σ ≈ ε |∇L| (the spread of ε z·∇L over directions), so c_d ≈ z_d·∇L / |∇L|: a unit-scale step
whatever the loss scale, ε or stage of training — the normalisation that lets one default learning
rate work across tasks. With all losses equal there is no signal and every c_d is 0.
"""

from __future__ import annotations

import math

from .zo import f32

UNPERTURBED = 0  # sign of the shared θ forward


def forwards(name: str, q: int) -> list[tuple[int, int]]:
    """(direction, sign) of each forward of a step, in the order the pass runs them (sign 0: θ itself)."""
    if name == "mezo":
        return [(d, s) for d in range(q) for s in (1, -1)]
    if name == "fzoo":
        return [(0, UNPERTURBED)] + [(d, 1) for d in range(q)]
    raise ValueError(f"estimator: unknown {name!r}")


def pairs(name: str, losses: list[float]) -> list[tuple[float, float]]:
    """The step's losses (in `forwards` order) as one (L+, L_ref) pair per direction: mezo (L+_d, L-_d),
    fzoo (L_d, L_0)."""
    if name == "mezo":
        return [(losses[2 * d], losses[2 * d + 1]) for d in range(len(losses) // 2)]
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
    raise ValueError(f"estimator: unknown {name!r}")


def summary(name: str, pairs: list[tuple[float, float]]) -> dict[str, float]:
    """The step's reported losses: `loss` (θ's loss for fzoo, the mean of the pairs for mezo) and the
    first direction's pair as `loss_plus` / `loss_minus` (for fzoo, L_1 and L_0)."""
    if name == "mezo":
        loss = sum(lp + lm for lp, lm in pairs) / (2 * len(pairs))
        return {"loss": loss, "loss_plus": pairs[0][0], "loss_minus": pairs[0][1]}
    return {"loss": pairs[0][1], "loss_plus": pairs[0][0], "loss_minus": pairs[0][1]}
