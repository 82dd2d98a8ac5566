"""Reopening a fine-tuning job: its request checked against the update log's header, the log's torn tail
cut (and a full job's working-copy counters reconciled with it), and a LoRA adapter rebuilt at any step.

engine/session.py calls these when it opens a job and when it exports a step other than the last.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import finetune
from .config import ZOConfig
from .peft import LoraAdapter
from .replay import replay_steps
from .store import WeightStore
from .update_log import UpdateLog

if TYPE_CHECKING:
    from .trainer import ZOTrainer


# LogHeader field / scope / extra key -> the ZOConfig field that sets it (errors name the latter).
_HEADER_FIELDS = {
    "noise": "noise",
    "master_dtype": "master_dtype",
    "rounding": "master_dtype",
    "eps": "eps",
    "weight_decay": "weight_decay",
    "job_seed": "seed",
    "q": "q",
    "base_fingerprint": "model",
}
_SCOPE_FIELDS = {
    "kind": "method",
    "r": "lora_r",
    "alpha": "lora_alpha",
    "targets": "lora_targets",
    "init_seed": "seed",
}


def resume_config(cfg: ZOConfig, store: WeightStore, log_path: Path) -> ZOConfig:
    """The config to reopen an existing job with: its settings must match the log's header (a RequestError
    names the config field that differs). Only steps may change, and only for a constant lr schedule
    (linear / cosine depend on the total): the job reopens with the logged total and trains on past it
    (TrainingSession's target)."""
    from .errors import RequestError
    from .trainer import master_dtype_for
    from .update_log import read_header

    old = read_header(log_path)
    new = finetune.log_header(cfg, store, *master_dtype_for(cfg, store.dtype))
    where = f"the job in {log_path.parent} was started with"
    fix = "resume with the same settings or choose another job directory"
    for f in dataclasses.fields(old):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if a == b:
            continue
        if f.name in ("scope", "extra"):
            for key in sorted(set(a) | set(b), key=lambda k: (k != "kind", k)):  # kind first
                # steps: checked below; the others a log keeps from its start (finetune.open_trainer)
                kept = (
                    ("steps", *finetune.KEPT_ON_RESUME)
                    if f.name == "extra"
                    else finetune.KEPT_IN_SCOPE_ON_RESUME
                )
                if a.get(key) == b.get(key) or key in kept:
                    continue
                name = _SCOPE_FIELDS.get(key, key) if f.name == "scope" else key
                raise RequestError(f"{where} {key}={a.get(key)!r}, got {b.get(key)!r}; {fix}", name)
            continue
        if f.name == "base_fingerprint":
            raise RequestError(
                f"{where} another base model (fingerprint {a}, this one is {b}); {fix}", "model"
            )
        raise RequestError(f"{where} {f.name}={a!r}, got {b!r}; {fix}", _HEADER_FIELDS.get(f.name, f.name))
    old_steps = old.extra.get("steps", cfg.steps)
    if old_steps == cfg.steps:
        return cfg
    if cfg.schedule != "constant":
        raise RequestError(
            f"{where} steps={old_steps} and a {cfg.schedule} lr schedule, which depends on the total; "
            f"resume with steps {old_steps} or choose another job directory",
            "steps",
        )
    return dataclasses.replace(cfg, steps=old_steps)


def replay_adapter(tr: ZOTrainer, upto: int) -> LoraAdapter:
    """What a LoRA job served after its first `upto` logged steps (its average, or its factors), rebuilt on
    the trainer's device from the initial factors and the log (bitwise what training held at that step:
    invariant 4)."""
    assert tr.adapter is not None
    adapter = LoraAdapter.init(tr.adapter.spec, tr.fam, tr.spec, tr.device)
    return replay_steps(adapter, tr.log.steps(0, upto), tr.log.header)


def repair_log(job_dir: Path) -> str | None:
    """Cut a torn or corrupt update.log tail back to the last intact step before the trainer opens the job;
    returns what was cut. A full job's working copy may then hold steps the log no longer has (their
    records were damaged): mark those groups as caught mid-write, so the working copy rebuilds them from
    the base and replays them from the log (engine/working_copy.py)."""
    log_path = job_dir / "update.log"
    if not log_path.exists():
        return None
    with UpdateLog.open(log_path) as log:
        repaired, n_steps = log.repaired, len(log)
    counters = job_dir / "working" / "applied.bin"
    if counters.exists():
        applied = np.fromfile(counters, dtype=np.int64)
        if (applied > n_steps).any():
            applied[applied > n_steps] = -1  # -(0 + 1): "killed while writing step 0"
            with open(counters, "r+b") as f:
                f.write(applied.tobytes())
                f.flush()
                os.fsync(f.fileno())
    return repaired
