"""Open (or resume) a fine-tuning job directory and build its trainer; checkpoint and export.

Job directory:
    update.log        the durable record: header + 20 bytes per step and direction (16 in old logs)
    working/          full-parameter master (job-owned copy of the base, shared mmap)
    checkpoints/      LoRA adapters at flushed steps (step-000100/ ...): what the job serves (the average of
                      its factors, or the factors); a job that keeps an average also holds its factors, the
                      state it resumes from, in step-*/factors/
    adapter/ | model/ the exported result at the end (PEFT adapter / HF model dir)
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from . import estimators, losses, rng, zo
from .averaging import Average
from .config import StreamConfig, ZOConfig
from .data import Dataset
from .errors import PreconditionError, RequestError
from .peft import LoraAdapter, LoraSpec, resolve_targets
from .store import WeightStore
from .streamer import LayerStreamer
from .trainer import Trainable, ZOTrainer, master_dtype_for
from .update_log import UpdateLog, read_header
from .update_log_format import LogHeader
from .working_copy import WorkingCopy

_CKPT = re.compile(r"^step-(\d{6,})$")
# Header entries a log keeps from the job's start whatever a resume asks (none, where the log predates them):
# its steps replay with the update mask and the slow-climb rule it began with, and it serves as it began.
KEPT_ON_RESUME = ("update_mask", "climb", "average")
# Likewise in the scope: the LoRA init the factors started from (absent: PEFT's, scale 1).
KEPT_IN_SCOPE_ON_RESUME = ("init_scale",)


def lora_spec(cfg: ZOConfig, store: WeightStore) -> LoraSpec:
    """A LoRA job's adapter shape, its targets resolved against the model ("all-linear": every module)."""
    targets = resolve_targets(cfg.lora_targets, store.family.module_names(store.spec))
    return LoraSpec(cfg.lora_r, cfg.lora_alpha, targets, cfg.seed, cfg.lora_init_scale)


def log_header(
    cfg: ZOConfig,
    store: WeightStore,
    master: torch.dtype,
    rounding: str,
    compute_dtype: torch.dtype | None = None,
) -> LogHeader:
    """compute_dtype given: the header of a new job, with its update mask (zo.UpdateMask: the dtype of the
    perturbed copies, float32 for LoRA's work copies; which copies a coordinate must tell apart)."""
    scope: dict[str, Any] = {"kind": "full"}
    extra: dict[str, Any] = {}
    if compute_dtype is not None:
        copies = torch.float32 if cfg.method == "lora" else compute_dtype
        one_sided = all(sign != -1 for _, sign in estimators.forwards(cfg.estimator, cfg.q))  # fzoo: θ+, θ
        mask = zo.UpdateMask(cfg.epsilon, copies, one_sided)
        extra["update_mask"] = mask.header_entry()
        if cfg.divergence_guard:  # the slow-climb rule this job keeps on every resume (engine/climb.py)
            rule = cfg.climb_rule()
            extra["climb"] = {"window": rule.window, "rise": rule.rise, "backoff": rule.backoff}
    if cfg.micro_batch_size != cfg.batch_size:  # only when set: logs of one-slice jobs keep their header
        extra["micro_batch"] = cfg.micro_batch_size
    # Also only when not what every log before them used (tokens, mezo): those logs keep their header.
    # Replay never reads them (the records hold the applied coefficients); they say what was trained.
    if cfg.loss not in ("auto", "tokens"):
        extra["loss"] = cfg.loss
        extra["choice_score"] = cfg.choice_score
    if cfg.estimator != "mezo":
        extra["estimator"] = cfg.estimator
    if cfg.method == "lora":
        scope = lora_spec(cfg, store).to_scope()
        average = Average.of(cfg.average)
        if average is not None:  # only when kept: logs of jobs without one replay their iterates
            extra["average"] = average.header_entry()
    return LogHeader(
        base_fingerprint=store.fingerprint,
        scope=scope,
        noise=cfg.noise,
        generator_version=rng.GENERATOR_VERSION,
        master_dtype=str(master).removeprefix("torch."),
        rounding=rounding,
        eps=cfg.epsilon,
        weight_decay=cfg.weight_decay,
        decay_exclusions=["bias", "norm"],
        job_seed=cfg.seed,
        q=cfg.q,
        extra={
            "lr": cfg.learning_rate,
            "lr_schedule": cfg.schedule,
            "warmup_steps": cfg.warmup_steps,
            "min_lr_ratio": cfg.min_lr_ratio,
            "steps": cfg.steps,
            "batch_size": cfg.batch_size,
            **extra,
        },
    )


def open_trainer(
    cfg: ZOConfig,
    job_dir: str | os.PathLike,
    store: WeightStore,
    train: Dataset,
    pad_id: int,
    device: torch.device,
    compute_dtype: torch.dtype,
    base_streamer: LayerStreamer | None,
    stream_cfg: StreamConfig,
    codec_name: str = "none",
    emu: Any = None,
) -> ZOTrainer:
    """Create the job's files on first open; on later opens resume from the last logged step.
    emu: the emulated device a full-parameter job streams its masters through (default: the base
    streamer's; None with no base streamer: cpu or cuda by `device`)."""
    if cfg.method == "full" and codec_name != "none":
        raise PreconditionError(
            f"a full-parameter job cannot read its weights through the lossy {codec_name} codec (tiny ZO "
            "updates would vanish in the quantisation); use --codec none, or --method lora",
            "codec",
        )
    # Checked before any file is written, so a bad request leaves no job directory behind
    spec = lora_spec(cfg, store) if cfg.method == "lora" else None
    job = Path(job_dir)
    log_path = job / "update.log"
    logged = read_header(log_path) if log_path.exists() else None
    cfg = resolve_objective(cfg, train, logged)
    if spec is not None and logged is not None and logged.scope.get("kind") == "lora":
        # Kept on resume, as KEPT_ON_RESUME: the log replays from the A factors its job started with.
        cfg = dataclasses.replace(cfg, lora_init_scale=LoraSpec.from_scope(logged.scope).init_scale)
        spec = lora_spec(cfg, store)
    job.mkdir(parents=True, exist_ok=True)
    master, rounding = master_dtype_for(cfg, store.dtype)
    header = log_header(cfg, store, master, rounding, compute_dtype)
    if logged is not None:
        try:
            rng.check_replayable(logged.generator_version, logged.noise)
        except ValueError as err:
            raise PreconditionError(f"cannot resume {job}: {err}", "generator_version") from None
        # A version-1 Rademacher log continues under its own header: its noise bits are unchanged. The
        # KEPT_ON_RESUME entries stay those the log started with (absent where it predates them).
        extra = {k: v for k, v in header.extra.items() if k not in KEPT_ON_RESUME}
        extra |= {k: logged.extra[k] for k in KEPT_ON_RESUME if k in logged.extra}
        header = dataclasses.replace(header, generator_version=logged.generator_version, extra=extra)
        log = UpdateLog.open(log_path, expect=header)
    else:
        log = UpdateLog.create(log_path, header, loss=True)
    if spec is not None:
        # whether the job keeps an average: the header's reading, as the trainer's and replay's
        averaged_kept = Average.from_header(log.header.extra) is not None
        adapter, averaged, at = _latest_lora(job, store, device, len(log), averaged_kept)
        if adapter is None:  # from the initial factors: the trainer catches up on the whole log
            adapter, at = LoraAdapter.init(spec, store.family, store.spec, device), 0
        tr = ZOTrainer(
            cfg,
            store.family,
            store.spec,
            base_streamer,
            log,
            train,
            pad_id,
            compute_dtype,
            adapter=adapter,
            rounding=rounding,
            applied=[at] * (store.spec.num_layers + 1),
            averaged=averaged,
        )
        return tr
    wc = WorkingCopy(job / "working", store, master, stream_cfg.master_dir)

    def on_write_back(g: int, upto: int, landed: bool) -> None:
        # Before the copy: the torn mark (a kill mid-copy rebuilds the group); once landed: the counter.
        (wc.end_write if landed else wc.begin_write)(g, upto - 1)

    streamer = LayerStreamer(
        wc.store,
        device,
        master,
        stream_cfg,
        mutable=True,
        emu=emu if emu is not None else getattr(base_streamer, "emu", None),
        on_write_back=on_write_back,
    )

    def groups(g: int, w: dict | None) -> dict[str, torch.Tensor]:
        if w is not None:
            return w
        return wc.group_tensors(g)

    def on_written(g: int, step: int, done: bool) -> None:
        (wc.end_write if done else wc.begin_write)(g, step)

    trainable = Trainable(groups, wc.groups, on_written)
    tr = ZOTrainer(
        cfg,
        store.family,
        store.spec,
        streamer,
        log,
        train,
        pad_id,
        compute_dtype,
        trainable=trainable,
        rounding=rounding,
        applied=[int(a) for a in wc.applied],
        working_copy=wc,
    )
    return tr


def resolve_objective(cfg: ZOConfig, train: Dataset, logged: LogHeader | None) -> ZOConfig:
    """cfg with loss 'auto' made concrete, and a resumed job on its log's estimator.

    A job with a log continues as it started: logs without 'estimator' / 'loss' entries (all logs written
    before there was a choice) ran mezo on tokens, with the log's q. A new job: candidates for choice data,
    tokens otherwise."""
    if logged is not None:
        estimator = str(logged.extra.get("estimator", "mezo"))
        if estimator != cfg.estimator:
            cfg = dataclasses.replace(cfg, estimator=estimator, q=logged.q)
        if cfg.loss == "auto":
            return dataclasses.replace(cfg, loss=str(logged.extra.get("loss", "tokens")))
    try:
        return dataclasses.replace(cfg, loss=losses.resolve_loss(cfg.loss, train.kind))
    except ValueError as exc:
        raise RequestError(str(exc).removeprefix("loss: "), "loss") from None


def _latest_lora(job: Path, store: WeightStore, device: torch.device, n_steps: int, averaged: bool):
    """(factors, average, step) of the latest checkpoint within the log, or (None, None, 0). The checkpoint
    directory is the served adapter; a job that keeps an average resumes only from checkpoints that also
    hold its factors (CHECKPOINT/factors/)."""
    ckpts = sorted(
        (int(m.group(1)), p)
        for p in (job / "checkpoints").glob("step-*")
        if (m := _CKPT.match(p.name))
        and (p / "adapter_config.json").exists()
        and (not averaged or (p / "factors" / "adapter_config.json").exists())
    )
    for step, path in reversed(ckpts):
        if step <= n_steps:
            load = LoraAdapter.load_peft
            served = load(path, store.family, store.spec, device)
            if not averaged:
                return served, None, step
            return load(path / "factors", store.family, store.spec, device), served, step
    return None, None, 0


def checkpoint(tr: ZOTrainer, job_dir: str | os.PathLike, keep: int = 2) -> Path | None:
    """Flush, then persist what the log cannot cheaply rebuild: a LoRA job's served adapter at this step (a
    PEFT directory users can load), and when that is an average, the factors in CHECKPOINT/factors/ (the
    state training resumes from, as an HF Trainer checkpoint keeps its optimizer's)."""
    tr.flush()
    job = Path(job_dir)
    if tr.adapter is None:
        return job / "working"
    out = job / "checkpoints" / f"step-{tr.step:06d}"
    if not out.exists():
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        served = tr.served_adapter()
        served.save_peft(tmp)
        if served is not tr.adapter:
            tr.adapter.save_peft(tmp / "factors")
        os.replace(tmp, out)
    old = sorted(p for p in (job / "checkpoints").glob("step-*") if _CKPT.match(p.name))[:-keep]
    for p in old:
        shutil.rmtree(p, ignore_errors=True)
    return out


def export(tr: ZOTrainer, job_dir: str | os.PathLike, base_model: str = "") -> Path:
    """The job's result: JOBDIR/adapter (PEFT; the average of the factors when the job keeps one) for
    LoRA, JOBDIR/model (HF dir) for full."""
    tr.flush()
    job = Path(job_dir)
    if (served := tr.served_adapter()) is not None:
        return save_adapter(served, job / "adapter", base_model)
    wc: WorkingCopy = tr.working_copy
    return wc.export(job / "model")


def save_adapter(adapter: LoraAdapter, out: Path, base_model: str = "") -> Path:
    """PEFT files into `out`, replaced whole (written beside it, then renamed)."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    adapter.save_peft(tmp, base_model)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def materialize(base_dir: str | os.PathLike, log_path: str | os.PathLike, out: Path, upto: int) -> Path:
    """The weights after a log's first `upto` steps in `out` (PEFT adapter or model dir), replayed from the
    base (bitwise training's on this device kind); written beside `out`, then renamed."""
    from .replay import replay

    _check_upto(Path(log_path), upto)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    replay(base_dir, log_path, tmp, upto=upto)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def log_upto(log_path: Path, upto: int, out: Path) -> bytes:
    """A log of the first `upto` steps of `log_path` (the same header; a plain log's byte prefix), written
    to `out` (beside it, then renamed) and returned."""
    _check_upto(log_path, upto)
    with UpdateLog.open(log_path, repair=False) as log:
        header, steps, loss = log.header, log.steps(0, upto), log.has_loss
    tmp = out.with_name(out.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with UpdateLog.create(tmp, header, loss=loss) as new:
        for st in steps:
            new.append(st)
    os.replace(tmp, out)
    return out.read_bytes()


def _check_upto(log_path: Path, upto: int) -> None:
    if not log_path.exists():
        raise PreconditionError("the job has logged no step yet; retry after its first", "upto")
    with UpdateLog.open(log_path, repair=False) as log:
        n = len(log)
    if not 0 <= upto <= n:
        raise RequestError(f"the job has logged {n} steps; ask for at most {n}", "upto")


def validate_dataset(ds: Dataset, cfg: ZOConfig) -> None:
    if not ds.examples:
        raise RequestError(f"{ds.path}: no training examples", "training_dataset")
