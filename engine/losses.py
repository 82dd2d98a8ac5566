"""Training losses of a ZO step: token NLL, or cross-entropy over a choice record's candidates.

Token NLL (target_rows / rows_nll / place_nll, and the reductions token_nll, nll_sum, mean_loss,
nll_per_example) log-softmaxes only the target rows, in float32, a few rows at a time.

  tokens      mean NLL of the target tokens (mean_loss); for choice records, those of the answer.
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

# Rows log-softmaxed at a time. A chunk of 8 fp32 rows of a 49152-token vocabulary (1.5 MiB) stays in
# cache: ~6x less CPU than one [N, V] call on SmolLM2's head (bench/RESULTS.md); rows are independent.
NLL_CHUNK_ROWS = 8


def target_rows(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [N], targets [N]) int64: the flat positions b*T + t whose next token is a target, and those
    targets (labels[b, t+1]). The last position of each row predicts nothing."""
    b = labels.shape[0]
    targets = torch.cat([labels[:, 1:], labels.new_full((b, 1), D.IGNORE)], dim=1).reshape(-1)
    rows = (targets != D.IGNORE).nonzero().squeeze(1)
    return rows, targets.index_select(0, rows)


def rows_nll(
    logits: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int = NLL_CHUNK_ROWS,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """[N] float32 NLL of targets[n] under logits[rows[n]] (logits [*, V]; rows None: logits is [N, V]).

    Each row is gathered and log-softmaxed in float32 `chunk_rows` at a time, so no [N, V] fp32 copy
    exists; a row's value does not depend on the chunking."""
    n = targets.numel()
    out = torch.empty(n, dtype=torch.float32, device=logits.device)
    for s in range(0, n, chunk_rows):
        x = logits[s : s + chunk_rows] if rows is None else logits.index_select(0, rows[s : s + chunk_rows])
        logp = torch.log_softmax(x.float(), dim=-1)  # [chunk, V] fp32
        out[s : s + chunk_rows] = -logp.gather(1, targets[s : s + chunk_rows].unsqueeze(1)).squeeze(1)
    return out


def place_nll(nll: torch.Tensor, rows: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """Per-token NLL [B, T] (column t: the NLL of token t, 0 where not a target) from rows_nll's [N]."""
    out = torch.zeros(b * t, dtype=torch.float32, device=nll.device)
    out[rows] = nll
    # shift back so column t holds the NLL of token t (as labels index it); column 0 is always 0
    return torch.cat([out.new_zeros(b, 1), out.view(b, t)[:, :-1]], dim=1)


def token_nll(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Per-token NLL [B, T] float32 (0 where not a target): logits[:, t] predict labels[:, t+1].

    Only target rows are gathered and log-softmaxed in float32, `chunk_rows` rows at a time (rows_nll).
    """
    b, t, v = logits.shape
    if labels.shape != (b, t):
        raise ValueError(f"labels {tuple(labels.shape)} must match logits[:2] {(b, t)}")
    rows, targets = target_rows(labels)
    nll = rows_nll(logits.reshape(b * t, v), targets, chunk_rows or NLL_CHUNK_ROWS, rows)
    return place_nll(nll, rows, b, t)


def nll_sum(
    logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None = None
) -> tuple[torch.Tensor, int]:
    """(sum of target-token NLL as a float32 scalar, number of target tokens)."""
    nll = token_nll(logits, labels, chunk_rows)
    return nll.sum(), int((labels[:, 1:] != D.IGNORE).sum())


def mean_loss(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None = None) -> torch.Tensor:
    """Mean NLL over target tokens (float32 scalar)."""
    total, count = nll_sum(logits, labels, chunk_rows)
    if count == 0:
        raise ValueError("no target tokens in the batch (every label is -100)")
    return total / count


def nll_per_example(
    logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (NLL sum [B] float32, target count [B] int64); -sum/count is the length-normalised
    log-likelihood that scores a choice candidate."""
    return token_nll(logits, labels, chunk_rows).sum(1), (labels[:, 1:] != D.IGNORE).sum(1)


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
