"""Replay an update log onto the base: the tuned weights, exactly (invariant 4)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from . import rng
from .averaging import Average
from .errors import PreconditionError
from .peft import LoraAdapter, LoraSpec
from .store import WeightStore
from .trainer import apply_step
from .update_log import Step, UpdateLog
from .update_log_format import LogHeader
from .working_copy import WorkingCopy

_DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_base(header: LogHeader, store: WeightStore) -> None:
    if header.base_fingerprint != store.fingerprint:
        raise PreconditionError(
            f"the log was made on base {header.base_fingerprint} but {store.dir} is {store.fingerprint}; "
            "replay it onto the model it was trained from",
            "base",
        )
    try:
        rng.check_replayable(header.generator_version, header.noise)
    except ValueError as err:
        raise PreconditionError(str(err), "generator_version") from None


def replay_lora(
    store: WeightStore,
    log: UpdateLog,
    upto: int | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> LoraAdapter:
    h = log.header
    spec = LoraSpec.from_scope(h.scope)
    adapter = LoraAdapter.init(spec, store.family, store.spec, torch.device(device))
    steps = tqdm(log.steps(0, upto), desc="replay", disable=not progress, unit="step")
    return replay_steps(adapter, steps, h)


def replay_steps(adapter: LoraAdapter, steps: Iterable[Step], h: LogHeader) -> LoraAdapter:
    """What a LoRA job served after `steps`, from `adapter` at the steps' start (the initial factors,
    updated in place): the average of the factors when the header keeps one (engine/averaging.py: it
    moves after every step, as in training), else the factors."""
    average = Average.from_header(h.extra)
    mean = adapter.clone() if average is not None else None
    for st in steps:
        apply_step(adapter.tensors, st, h)
        if average is not None:
            average.update(mean.tensors, adapter.tensors)
    return mean if mean is not None else adapter


def replay(
    base_dir: str | os.PathLike,
    log_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    upto: int | None = None,
    progress: bool = False,
) -> Path:
    """Materialise a log: a PEFT adapter dir (LoRA) or a safetensors HF model dir (full)."""
    store = WeightStore(base_dir)
    log = UpdateLog.open(log_path, repair=False)
    check_base(log.header, store)
    out = Path(out_dir)
    if log.header.scope.get("kind") == "lora":
        return replay_lora(store, log, upto, progress=progress).save_peft(out, str(base_dir))
    tmp = out.with_name(out.name + ".replay")
    shutil.rmtree(tmp, ignore_errors=True)
    wc = WorkingCopy(tmp, store, _DT[log.header.master_dtype])
    steps = log.steps(0, upto)
    # Group by group, every step: the same per-tensor arithmetic as training, in the same order.
    for g in tqdm(range(wc.groups), desc="replay", disable=not progress, unit="group"):
        tensors = wc.group_tensors(g)
        for st in steps:
            apply_step(tensors, st, log.header)
    (tmp / "applied.bin").unlink()
    del wc
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out
