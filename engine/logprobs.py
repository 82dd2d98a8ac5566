"""Log-probabilities a generation request can ask for: pure functions over a pass's logits.

Values are log_softmax of the model's raw logits (fp32), before repetition penalty, temperature,
top-k and top-p: the distribution the model gives, whichever token the sampler then drew (as in
transformers' `output_scores=False, output_logits=True` followed by log_softmax).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """A token's logprob at its position, and the `top` most likely tokens there."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, top: Sequence[int]) -> list[TokenLogprob]:
    """logits [N,V] (any float dtype), tokens [N] int: row i's logprob of tokens[i] and its top[i] best."""
    lp = torch.log_softmax(logits.float(), dim=-1)  # [N,V]
    chosen = lp.gather(1, tokens.to(lp.device).long()[:, None])[:, 0].tolist()  # [N]
    k = max(top, default=0)
    if k:
        vals, idx = lp.topk(k, dim=-1)  # [N,k], sorted descending
        vals, idx = vals.tolist(), idx.tolist()
    out = []
    for i, (tok, c) in enumerate(zip(tokens.tolist(), chosen, strict=True)):
        best = tuple(zip(idx[i][: top[i]], vals[i][: top[i]], strict=True)) if k and top[i] else ()
        out.append(TokenLogprob(int(tok), float(c), best))
    return out
