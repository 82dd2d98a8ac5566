"""Which examples make the batch of a step, and how they become tensors.

The order is a pure function of (n_examples, batch_size, seed, step): a resumed job, a replay and each rank
of a data-parallel run compute the same batches without state (docs/SCALE_OUT.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from .data import IGNORE, Example


@lru_cache(maxsize=8)
def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    # SeedSequence mixes (seed, epoch) without hash() or any global RNG state.
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)


def batch_order(n_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Example indices of the batch at 0-based `step`: a fresh permutation per epoch from (seed, epoch);
    batches run on across epoch boundaries, so every batch has batch_size indices."""
    if n_examples < 1 or batch_size < 1 or step < 0 or seed < 0:
        raise ValueError(
            f"batch_order needs n_examples >= 1, batch_size >= 1, step >= 0, seed >= 0; "
            f"got {n_examples}, {batch_size}, {step}, {seed}"
        )
    start = step * batch_size
    positions = range(start, start + batch_size)
    return [int(_permutation(n_examples, seed, p // n_examples)[p % n_examples]) for p in positions]


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to the longest: input_ids [B,T] (pad_id), labels [B,T] (IGNORE), lens [B]; all int64."""
    if not examples:
        raise ValueError("collate needs at least one example")
    lens = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.int64)
    t = int(lens.max())
    ids = torch.full((len(examples), t), pad_id, dtype=torch.int64)
    labels = torch.full((len(examples), t), IGNORE, dtype=torch.int64)
    for b, e in enumerate(examples):
        ids[b, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.int64)
        labels[b, : len(e.labels)] = torch.tensor(e.labels, dtype=torch.int64)
    return ids, labels, lens
