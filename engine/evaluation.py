"""Held-out evaluation: a dataset scored by passes over the streamed model, no update.

Token data: the mean token NLL. Choice data: each candidate's log-likelihood, read off the fewest rows
(losses.candidate_rows); accuracy ranks candidates by length-normalised log-likelihood.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from . import data as D
from . import losses as LS
from .batching import collate
from .forward import run_pass
from .models.attention import LoraSet
from .streamer import LayerStreamer
from .workloads import LossWorkload


@torch.inference_mode()
def evaluate(
    fam: Any,
    spec: Any,
    streamer: LayerStreamer,
    ds: D.Dataset,
    pad_id: int,
    device: torch.device,
    lora_fn: Callable[[int], LoraSet | None] | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Mean token loss over ds.examples. For choice datasets: `loss` is the answers' token NLL, `accuracy`
    ranks candidates by length-normalised log-likelihood and `candidate_loss` is the mean cross-entropy
    over the candidates (the candidates training loss, length-normalised scores)."""

    def score(examples: list[D.Example]) -> tuple[torch.Tensor, torch.Tensor]:
        sums, counts = [], []
        for i in range(0, len(examples), batch_size):
            ids, labels, lens = collate(examples[i : i + batch_size], pad_id)
            wl = LossWorkload(
                fam, spec, (ids.to(device), labels.to(device), lens.to(device)), lora_fn=lora_fn
            )
            run_pass(streamer, [wl])
            sums.append(wl.sums.double().cpu())
            counts.append(wl.counts.cpu())
        return torch.cat(sums), torch.cat(counts)

    if not ds.choices:
        sums, counts = score(ds.examples)
        return {"loss": float(sums.sum() / max(int(counts.sum()), 1))}
    # Multiple choice: every candidate's log-likelihood, read off the fewest rows (losses.candidate_rows).
    lls, lengths = [], []
    for i in range(0, len(ds.choices), batch_size):
        rows, index = LS.candidate_rows(ds.choices[i : i + batch_size])
        ids, labels, lens = collate(rows, pad_id)
        batch = (ids.to(device), labels.to(device), lens.to(device), index.to(device))
        wl = LossWorkload(fam, spec, batch, lora_fn=lora_fn)
        run_pass(streamer, [wl])
        lls.append(wl.loglik.double().cpu())
        lengths.append(index.lengths)
    ll, n = torch.cat(lls), torch.cat(lengths)
    per = (ll / n).tolist()
    scores, k, loss_sum, loss_count, ce = [], 0, 0.0, 0, 0.0
    for ch in ds.choices:
        row = per[k : k + len(ch.candidates)]
        scores.append(row)
        loss_sum -= float(ll[k + ch.answer])
        loss_count += int(n[k + ch.answer])
        ce += float(torch.logsumexp(torch.tensor(row, dtype=torch.float64), 0)) - row[ch.answer]
        k += len(ch.candidates)
    return {
        "loss": loss_sum / max(loss_count, 1),
        "accuracy": D.choice_accuracy(scores, [ch.answer for ch in ds.choices]),
        "candidate_loss": ce / len(ds.choices),
    }
