"""Next-token sampling for a continuously batched decode step.

Every request brings its own `SamplingParams` and its own seeded `torch.Generator`, so a
request's tokens depend only on its logits, its parameters and its seed, never on which other
requests share the batch. The filters are vectorised over the batch with per-row parameters;
the random draw is made row by row from that row's generator.

Semantics follow transformers' logits processors (the tests compare against them):
repetition penalty, then temperature, then top-k, then top-p (min_tokens_to_keep=1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import RequestError

MAX_SEED = 2**63 - 1
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its next token.

    temperature: 0 → greedy (argmax); otherwise logits are divided by it before sampling.
    top_k: keep the k most likely tokens (0 → off). top_p: keep the smallest set of most likely
    tokens whose probability sums to >= top_p (1 → off). repetition_penalty: HF semantics on every
    token already in prompt + output (1 → off). seed: None → the caller picks one and reports it.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if not _is_number(t) or not math.isfinite(t) or not 0.0 <= t <= MAX_TEMPERATURE:
            raise RequestError(
                f"temperature must be a finite number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), got {t!r}",
                field="temperature",
            )
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise RequestError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}", field="top_k")
        p = self.top_p
        if not _is_number(p) or not 0.0 < p <= 1.0:  # NaN fails both comparisons
            raise RequestError(f"top_p must be a number in (0, 1] (1 = off), got {p!r}", field="top_p")
        r = self.repetition_penalty
        if not _is_number(r) or not math.isfinite(r) or not 0.0 < r <= MAX_REPETITION_PENALTY:
            raise RequestError(
                f"repetition_penalty must be a finite number in (0, {MAX_REPETITION_PENALTY:g}] (1 = off), "
                f"got {r!r}",
                field="repetition_penalty",
            )
        s = self.seed
        if s is not None and (not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= MAX_SEED):
            raise RequestError(
                f"seed must be an integer in [0, 2**63-1], or unset to get a random one, got {s!r}",
                field="seed",
            )
        # Store plain floats so ints (temperature=1) and floats behave the same downstream.
        object.__setattr__(self, "temperature", float(t))
        object.__setattr__(self, "top_p", float(p))
        object.__setattr__(self, "repetition_penalty", float(r))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A request's own generator on `device` (where its probabilities live), seeded with `seed`."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63-1], got {seed}")
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(seed)
    return gen


def apply_repetition_penalty(
    logits: torch.Tensor, seen: Sequence[torch.Tensor], penalties: torch.Tensor
) -> torch.Tensor:
    """HF repetition penalty per row: for every token id in seen[b] (duplicates count once),
    a positive logit is divided by penalties[b] and a negative one multiplied by it.

    logits [B, V] float32; seen[b] int64 ids of any length (ids >= V are ignored, as in HF:
    the embedding vocab may be larger than the head's); penalties [B]. Returns a new tensor.
    """
    batch, vocab = logits.shape
    if len(seen) != batch or penalties.shape != (batch,):
        raise ValueError(
            f"need one seen tensor and one penalty per row ({batch}), got {len(seen)}, {penalties.shape}"
        )
    device = logits.device
    ids = torch.cat([s.reshape(-1) for s in seen]).to(device=device, dtype=torch.long)
    lengths = torch.tensor([s.numel() for s in seen], device=device)
    rows = torch.repeat_interleave(torch.arange(batch, device=device), lengths)
    keep = (ids >= 0) & (ids < vocab)
    mask = torch.zeros(batch, vocab, dtype=torch.bool, device=device)  # [B, V]: token seen by row
    mask[rows[keep], ids[keep]] = True
    p = penalties.to(device=device, dtype=logits.dtype)[:, None]  # [B, 1]
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(mask, penalised, logits)


def apply_temperature_top_k_top_p(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Scale by temperature, then mask (-inf) tokens outside top-k, then outside top-p; per row.

    logits [B, V] float32; temperature [B] (rows <= 0 are left unscaled: greedy is the caller's
    business); top_k [B] int64 (0 = off); top_p [B] (1 = off; float64 preferred so the threshold
    1 - top_p is rounded like HF's). Ties at the k-th value are all kept, as in HF.
    """
    batch, vocab = logits.shape
    device = logits.device
    t = temperature.to(device=device, dtype=logits.dtype)
    scaled = logits / torch.where(t > 0, t, torch.ones_like(t))[:, None]

    # One ascending sort serves both filters: masking the top-k tail with -inf keeps the order,
    # and HF's top-p sorts the top-k-filtered scores ascending, so the cumulative sums match.
    sorted_vals, sorted_idx = torch.sort(scaled, dim=-1)  # [B, V] ascending
    k = top_k.to(device=device, dtype=torch.long)
    k = torch.where(k > 0, k.clamp(max=vocab), torch.full_like(k, vocab))
    kth = sorted_vals.gather(1, (vocab - k)[:, None])  # [B, 1]: k-th largest value
    remove = sorted_vals < kth  # [B, V] in sorted order

    cum = sorted_vals.masked_fill(remove, -math.inf).softmax(dim=-1).cumsum(dim=-1)
    p = top_p.to(device=device, dtype=torch.float64)
    threshold = (1.0 - p).to(logits.dtype)[:, None]
    remove_p = (cum <= threshold) & (p < 1.0)[:, None]
    remove_p[:, -1] = False  # min_tokens_to_keep = 1: the most likely token always stays
    remove |= remove_p

    remove_orig = torch.empty_like(remove).scatter_(1, sorted_idx, remove)  # back to vocab order
    return scaled.masked_fill(remove_orig, -math.inf)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    seen: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Next token ids [B] int64 for a batch of requests.

    logits [B, V] any float dtype (computed in float32); seen[b]: int64 ids of row b's prompt +
    output so far (for the repetition penalty). Greedy rows take the argmax (first index on ties)
    and never touch their generator (None is fine). Sampled rows draw with torch.multinomial from
    their own generator, one row at a time, so a row's draw is independent of its batch-mates.
    """
    batch, _ = logits.shape
    if not len(params) == len(generators) == len(seen) == batch:
        raise ValueError(
            f"sample needs one params, generator and seen entry per row ({batch} rows), "
            f"got {len(params)}, {len(generators)}, {len(seen)}"
        )
    if batch == 0:
        return torch.empty(0, dtype=torch.long, device=logits.device)
    device = logits.device
    x = logits.float()
    if any(sp.repetition_penalty != 1.0 for sp in params):
        penalties = torch.tensor([sp.repetition_penalty for sp in params], dtype=torch.float32)
        x = apply_repetition_penalty(x, seen, penalties.to(device))

    tokens = x.argmax(dim=-1)  # [B]; greedy rows keep this
    rows = [b for b, sp in enumerate(params) if not sp.greedy]
    if not rows:
        return tokens
    for b in rows:
        if generators[b] is None:
            raise ValueError(f"row {b} samples (temperature {params[b].temperature}) but has no generator")

    sub = [params[b] for b in rows]
    masked = apply_temperature_top_k_top_p(
        x[rows],
        torch.tensor([sp.temperature for sp in sub], dtype=torch.float32, device=device),
        torch.tensor([sp.top_k for sp in sub], dtype=torch.long, device=device),
        torch.tensor([sp.top_p for sp in sub], dtype=torch.float64, device=device),
    )
    probs = masked.softmax(dim=-1)  # [R, V]
    # Row by row: a batched multinomial would draw every row from one generator.
    drawn = [torch.multinomial(probs[i], 1, generator=generators[b]) for i, b in enumerate(rows)]
    tokens[rows] = torch.cat(drawn)
    return tokens


def logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax of `logits` [B, V] at `tokens` [B] → [B].

    Pass the raw model logits to report the model's log-probability of the chosen token.
    """
    lsm = torch.log_softmax(logits.float(), dim=-1)
    return lsm.gather(1, tokens.to(device=logits.device, dtype=torch.long)[:, None]).squeeze(1)
