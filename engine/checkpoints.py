"""Checkpoint model ids: any logged step of a LoRA job served as an adapter, `<job_id>:ckpt-step-<N>`.

The form is OpenAI's `fine_tuned_model_checkpoint` suffix (`ft:...:ckpt-step-N`) on this server's
fine-tuned model id, which is the job id: a client that strips `:ckpt-step-N` gets the job's model back.
Names (job and adapter ids) never hold ':', so a checkpoint id can never collide with an adapter id.

A checkpoint adapter is not stored: the engine rebuilds it on first use by replaying the job's update log
up to step N from the initial factors (bitwise what the job held after step N on this device kind) and
caches it in its adapter registry, where the LRU limit evicts it like any adapter. Full-parameter jobs'
steps are whole models, not adapters: they are refused here (DownloadWeights upto=N writes one).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from zostream.defaults import CHECKPOINT_SUFFIX as SUFFIX

from .errors import NotFoundError, RequestError
from .replay import replay_lora
from .update_log import UpdateLog

_ID = re.compile(r"(?P<job>[^:]+)" + re.escape(SUFFIX) + r"(?P<step>0|[1-9][0-9]{0,8})")
FORM = "'<job_id>:ckpt-step-<N>'"


def checkpoint_id(job_id: str, step: int) -> str:
    return f"{job_id}{SUFFIX}{step}"


def is_checkpoint_id(aid: str) -> bool:
    """Any id with ':' is meant as a checkpoint (adapter names never hold one)."""
    return ":" in aid


def parse(aid: str, field: str = "adapter_id") -> tuple[str, int]:
    """(job id, step) of a checkpoint id; NotFoundError naming `field` when malformed."""
    m = _ID.fullmatch(aid)
    if m is None:
        raise NotFoundError(
            f"{aid[:128]!r} is not a model: checkpoint ids are {FORM}, e.g. 'job-1{SUFFIX}10'", field
        )
    return m["job"], int(m["step"])


class CheckpointSource:
    """Checks and builds checkpoint adapters for the engine (`Engine.adapter_source`).

    `check` runs on any thread (reads job records only); `build` on the engine's worker thread for the
    checkpoint (it replays the log onto fresh LoRA factors, touching nothing the engine thread uses)."""

    def __init__(self, store: Any, engine: Any) -> None:
        self.store, self.engine = store, engine  # store: jobs.JobStore

    def check(self, aid: str, field: str = "adapter_id") -> tuple[str, int]:
        job_id, step = parse(aid, field)
        rec = self.store.jobs.get(job_id)
        if rec is None:
            raise NotFoundError(f"no job {job_id[:64]!r} for the checkpoint {aid[:128]!r}", field)
        if rec.spec.get("method") != "lora":
            raise NotFoundError(
                f"job {job_id!r} tunes every parameter: its steps are whole models, not adapters, and this "
                "server serves one base model; download step N with DownloadWeights (upto) and serve it "
                "as a base, or use a LoRA job's checkpoints",
                field,
            )
        if not 1 <= step <= rec.steps_done:
            raise NotFoundError(
                f"job {job_id!r} has logged {rec.steps_done} steps; checkpoint steps are 1..{rec.steps_done}",
                field,
            )
        return job_id, step

    def build(self, aid: str, field: str = "adapter_id") -> Any:
        """The LoRA adapter after the job's first N steps, on the engine's device."""
        job_id, step = self.check(aid, field)
        path = self.store.job_dir(job_id) / "update.log"
        if not path.exists():
            raise NotFoundError(f"job {job_id!r} has no update log: it cannot be replayed", field)
        e = self.engine
        with UpdateLog.open(path, repair=False) as log:
            if log.header.base_fingerprint != e.store.fingerprint:  # a job of another base in this data dir
                raise NotFoundError(f"job {job_id!r} was trained on another base model", field)
            if len(log) < step:  # a repaired (cut) log holds fewer steps than the record counted
                raise NotFoundError(
                    f"job {job_id!r} has logged {len(log)} steps; ask for at most that", field
                )
            adapter = replay_lora(e.store, log, upto=step, device=e.device)
        if not all(bool(torch.isfinite(t).all()) for t in adapter.tensors.values()):
            raise RequestError(f"step {step} of job {job_id!r} holds non-finite weights", field)
        return adapter
