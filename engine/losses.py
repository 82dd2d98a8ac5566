"""Training losses of a ZO step: token NLL, or cross-entropy over a choice record's candidates.

  tokens      mean NLL of the target tokens (data.mean_loss); for choice records, those of the answer.
  candidates  per record, CE = logsumexp_k s_k - s_answer with s_k the candidate's log-likelihood given
              the prompt, length-normalised (mean over its tokens, the score evaluation ranks by) or
              summed; the loss of a batch is the mean CE over its records.

The token loss on a choice record mostly teaches the model to put mass on the candidate tokens at all;
the candidate loss only tells them apart, which is what accuracy measures (MeZO trains classification
this way). Rows are laid out so a candidate's tokens are read off one forward: when every candidate of
a record is one token, the record is one row (its prompt) and the candidates are columns of the last
position's distribution; otherwise a row per candidate (prompt + candidate minus its last token).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import data as D

LOSSES = ("auto", "tokens", "candidates")
SCORES = ("mean", "sum")


def resolve_loss(loss: str, kind: str) -> str:
    """'auto' -> candidates for choice data, tokens otherwise; 'candidates' needs choice data."""
    if loss not in LOSSES:
        raise ValueError(f"loss: must be one of {', '.join(LOSSES)}, got {loss!r}")
    if loss == "auto":
        return "candidates" if kind == "choice" else "tokens"
    if loss == "candidates" and kind != "choice":
        raise ValueError(
            f"loss: 'candidates' needs choice records (prompt, candidates, answer); this dataset holds "
            f"{kind} records: use --loss tokens (or auto)"
        )
    return loss


@dataclass(frozen=True)
class CandidateIndex:
    """Where every candidate token sits in a collated batch of R rows (N candidates, M scored tokens).

    rows, pos, tok: [M] int64; logits[rows[m], pos[m]] predict token tok[m].
    slots: [N, Lmax] int64 indices into the M scored tokens, M (a zero slot) where a candidate is shorter.
    lengths: [N] int64 tokens per candidate; per_record: candidates of each record, in order; answers.
    """

    rows: torch.Tensor
    pos: torch.Tensor
    tok: torch.Tensor
    slots: torch.Tensor
    lengths: torch.Tensor
    per_record: tuple[int, ...]
    answers: tuple[int, ...]

    def to(self, device: torch.device) -> CandidateIndex:
        move = [t.to(device) for t in (self.rows, self.pos, self.tok, self.slots, self.lengths)]
        return CandidateIndex(*move, self.per_record, self.answers)


def candidate_rows(choices: Sequence[D.ChoiceExample]) -> tuple[list[D.Example], CandidateIndex]:
    """The rows to run (labels all IGNORE: the candidate loss does not read them) and their index."""
    rows: list[D.Example] = []
    r_, p_, t_, cand_tokens = [], [], [], []  # cand_tokens: per candidate, its scored-token numbers
    for ch in choices:
        p = ch.prompt_ids
        if all(len(c) == 1 for c in ch.candidates):
            r = len(rows)
            rows.append(D.Example(p, (D.IGNORE,) * len(p)))
            for c in ch.candidates:
                cand_tokens.append([len(t_)])
                r_.append(r), p_.append(len(p) - 1), t_.append(c[0])
            continue
        for c in ch.candidates:
            r = len(rows)
            ids = p + c[:-1]
            rows.append(D.Example(ids, (D.IGNORE,) * len(ids)))
            cand_tokens.append(list(range(len(t_), len(t_) + len(c))))
            for j, tok in enumerate(c):
                r_.append(r), p_.append(len(p) - 1 + j), t_.append(tok)
    m, lmax = len(t_), max(len(c) for c in cand_tokens)
    slots = torch.full((len(cand_tokens), lmax), m, dtype=torch.int64)
    for i, c in enumerate(cand_tokens):
        slots[i, : len(c)] = torch.tensor(c, dtype=torch.int64)
    index = CandidateIndex(
        torch.tensor(r_, dtype=torch.int64),
        torch.tensor(p_, dtype=torch.int64),
        torch.tensor(t_, dtype=torch.int64),
        slots,
        torch.tensor([len(c) for c in cand_tokens], dtype=torch.int64),
        tuple(len(ch.candidates) for ch in choices),
        tuple(ch.answer for ch in choices),
    )
    return rows, index


def candidate_loglik(logits: torch.Tensor, index: CandidateIndex) -> torch.Tensor:
    """[N] float32 summed log-likelihood of every candidate given its prompt (logits [R, T, V]).

    Only the M scored positions are log-softmaxed (in float32); sums run over a padded [N, Lmax]
    gather, not an atomic scatter, so the value is the same on every run of a device.
    """
    logp = torch.log_softmax(logits[index.rows, index.pos].float(), dim=-1)  # [M, V]
    return summed_loglik(logp.gather(1, index.tok.unsqueeze(1)).squeeze(1), index)


def summed_loglik(tok_lp: torch.Tensor, index: CandidateIndex) -> torch.Tensor:
    """[N] float32 candidate log-likelihoods from the [M] log-probabilities of the scored tokens."""
    padded = torch.cat([tok_lp, tok_lp.new_zeros(1)])  # slot M reads 0
    return padded[index.slots].sum(dim=1)  # [N]


def record_scores(loglik: torch.Tensor, index: CandidateIndex, score: str = "mean") -> list[torch.Tensor]:
    """Per record, its candidates' scores [K_r] float32 (length-normalised or summed log-likelihood)."""
    if score not in SCORES:
        raise ValueError(f"choice_score: must be mean or sum, got {score!r}")
    s = loglik / index.lengths.to(loglik.dtype) if score == "mean" else loglik
    return list(torch.split(s, list(index.per_record)))


def candidate_ce(loglik: torch.Tensor, index: CandidateIndex, score: str = "mean") -> torch.Tensor:
    """[R] float32 cross-entropy over each record's candidates: logsumexp(s) - s[answer]."""
    rows = record_scores(loglik, index, score)
    return torch.stack([torch.logsumexp(s, 0) - s[a] for s, a in zip(rows, index.answers, strict=True)])
