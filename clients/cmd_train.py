"""`zostream train`: a ZO fine-tuning job in this process (its lifecycle: engine/session.py).

The job directory is the job's whole state (see engine/finetune.py): running `train` again on
the same --out resumes from the last logged step, after checking that the flags match the log.
JOBDIR/metrics.jsonl gets one line per step and per evaluation (appended across runs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zostream.clients import train_launch as launch
from zostream.clients import train_report as report
from zostream.clients.cli import UsageError
from zostream.clients.common import (
    add_json_arg,
    add_runtime_args,
    load_tokenizer,
    open_engine,
    open_store,
    print_json,
    usage_error,
    warn,
)
from zostream.clients.train_args import ZO_FLAGS, add_train_args, zo_config

LIMITS = dict(max_batch=1, max_seq_len=1, max_new_tokens=1, max_waiting=1, max_prefill_tokens=1)  # no KV use


def register(sub: argparse._SubParsersAction) -> None:
    _register_train(sub)


# ---- arguments -------------------------------------------------------------------------------
def _register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="zeroth-order (MeZO/ZO2) fine-tuning job in this process",
        description="Fine-tune --model on --data with zeroth-order SPSA steps (LoRA or full-parameter). "
        "JOBDIR receives update.log (a few bytes per step, replayable with `zostream log replay`), "
        "metrics.jsonl, checkpoints and, at the end, adapter/ (lora) or model/ (full). Running the "
        "command again on the same JOBDIR resumes it. Ctrl-C stops after the current step.",
    )
    add_train_args(p)
    add_runtime_args(p)
    add_json_arg(p, "a JSON summary as the last stdout line")
    p.set_defaults(func=train)


def load_data(path: str, tokenizer: Any, max_len: int, flag: str) -> Any:
    """A dataset file; DataError (names file and line) or an unreadable file is a UsageError."""
    from zostream.engine.data import DataError, load_dataset

    try:
        return load_dataset(path, tokenizer, max_len=max_len)
    except DataError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise UsageError(f"{flag}: cannot read {path}: {exc.strerror or exc}") from None


def pad_id(tokenizer: Any) -> int:
    for pid in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(pid, int):
            return pid
    return 0


def resume_config(cfg: Any, store: Any, log_path: Path) -> Any:
    """The config to reopen an existing job with (engine/session.py): a flag that differs from the log
    is a UsageError naming it."""
    from zostream.engine.errors import RequestError
    from zostream.engine.resume import resume_config as resolve
    from zostream.engine.update_log_format import LogCorruptError

    try:
        return resolve(cfg, store, log_path)
    except LogCorruptError as exc:
        raise UsageError(f"--out: {exc}") from None
    except RequestError as exc:
        raise usage_error(exc, {"model": "--model"}) from None


# ---- Ctrl-C ---------------------------------------------------------------------------------
@contextlib.contextmanager
def stop_after_step() -> Iterator[list[bool]]:
    """First SIGINT sets the flag (the loop stops after its step); a second one aborts at once."""
    flag = [False]

    def handler(signum: int, frame: Any) -> None:
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True
        warn("train", "interrupted: stopping after the current step (Ctrl-C again to abort now)")

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C is not ours to handle
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# ---- train ----------------------------------------------------------------------------------
def train(args: argparse.Namespace) -> int:
    cfg = zo_config(args)  # every flag is checked before this rank joins the others
    for flag, on in (
        ("--keep-best", args.keep_best),
        ("--early-stopping-patience", args.early_stopping_patience),
    ):
        if on and not args.eval:
            raise UsageError(f"{flag}: judges held-out evaluations; give --eval FILE (and --eval-every N)")
    if args.early_stopping_patience and not args.eval_every:
        raise UsageError("--early-stopping-patience: counts evaluations during training; give --eval-every N")
    env = launch.env_of(args)
    if env is None:
        return _train(args, cfg, None)
    from zostream.engine.distributed import Distributed, DistributedError

    if cfg.batch_size % env.world_size:  # before joining: every rank would fail alike, after a wait
        raise UsageError(
            f"--batch-size: the global batch of {cfg.batch_size} examples does not split over "
            f"{env.world_size} ranks; use a multiple of {env.world_size}"
        )
    launch.rank_device(args, env.local_rank)
    try:
        dist = Distributed(env, timeout_s=args.dist_timeout)
    except DistributedError as exc:
        print(f"zostream train: error: {exc}", file=sys.stderr)
        return 1
    try:
        return _train(args, cfg, dist)
    except DistributedError as exc:  # a peer died or went silent: exit 1, the logs let a relaunch resume
        print(f"zostream train: error: {exc}", file=sys.stderr)
        return 1
    finally:
        dist.close()


def _train(args: argparse.Namespace, cfg: Any, dist: Any) -> int:
    from zostream.engine.config import StreamConfig
    from zostream.engine.distributed import attach, rank_dir
    from zostream.engine.errors import RequestError
    from zostream.engine.finetune import resolve_objective, validate_dataset
    from zostream.engine.peft import resolve_targets
    from zostream.engine.session import Policy, TrainingSession
    from zostream.engine.update_log import read_header
    from zostream.engine.update_log_format import LogCorruptError

    if cfg.method == "full" and args.codec != "none":
        raise UsageError(
            f"--codec: a full-parameter job cannot read its weights through the lossy {args.codec} codec "
            "(tiny ZO updates would vanish in the quantisation); use --codec none, or --method lora"
        )
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory")
    store = open_store(args.model)
    if cfg.method == "lora":  # checked before the job dir is created (the adapter is built after)
        try:
            resolve_targets(cfg.lora_targets, store.family.module_names(store.spec))
        except RequestError as exc:
            raise UsageError(f"--lora-targets: {exc.args[0]}") from None
    tok = load_tokenizer(args.model)
    job = out if dist is None else rank_dir(out, dist.rank)
    log_path = job / "update.log"
    if dist is not None:
        try:
            dist.sync_log(log_path)  # a rank killed mid-step may be a step behind (or ahead of) the others
        except LogCorruptError as exc:
            raise UsageError(f"--out: {exc}") from None
    cfg = launch.micro_batch(args, cfg, 1 if dist is None else dist.world_size, log_path)
    resuming = log_path.exists()
    ds = load_data(args.data, tok, cfg.max_len, "--data")
    try:
        cfg = resolve_objective(cfg, ds, read_header(log_path) if resuming else None)
    except (LogCorruptError, RequestError) as exc:
        raise usage_error(exc, ZO_FLAGS, "--out") from None
    open_cfg = resume_config(cfg, store, log_path) if resuming else cfg
    eval_ds = load_data(args.eval, tok, cfg.max_len, "--eval") if args.eval else None
    try:
        validate_dataset(ds, cfg)
    except ValueError as exc:
        raise UsageError(f"--data: {str(exc).removeprefix('training_dataset: ')}") from None
    from zostream.engine.engine_setup import emu_device

    device, dtype, base, store = _base(args, cfg, store, tok)
    main = dist is None or dist.rank == 0
    policy = Policy.of(
        cfg,
        keep_best=args.keep_best,
        patience=args.early_stopping_patience,
        eval_batch_size=args.eval_batch_size or cfg.batch_size,
        eval_on_resume=True,  # the summary's before/after figures are this run's
    )
    progress = report.Progress(job if main else Path(os.devnull), main)
    try:
        ses = TrainingSession.open(
            open_cfg,
            job,
            store,
            ds,
            eval_ds,
            pad_id(tok),
            device,
            dtype,
            base,
            StreamConfig(
                gpu_memory_bytes=args.gpu_memory, host_memory_bytes=getattr(args, "host_memory", None)
            ),
            args.codec,
            emu=emu_device(args.device),
            policy=policy,
            on_event=progress.event,
            target=cfg.steps,
        )
    except ValueError as exc:
        raise usage_error(exc, {"codec": "--codec"}, "--out") from None
    if dist is not None:
        attach(ses.trainer, dist)
    if main and ses.repaired:
        warn("train", f"update.log {ses.repaired}; resuming from the last intact step")
    if resuming and main:
        warn("train", f"resuming at step {ses.step}")
    try:
        with progress:
            return _run(args, cfg, ses, progress, dist)
    finally:
        ses.close()


def _base(args: argparse.Namespace, cfg: Any, store: Any, tok: Any) -> tuple[Any, Any, Any, Any]:
    """(device, compute dtype, base streamer, store). LoRA jobs stream the frozen base through an
    Engine's streamer (with the --codec decoder); full jobs stream their own working copy, so they get
    no base streamer (it would hold a second copy of the resident blocks)."""
    from zostream.clients.common import check_device
    from zostream.engine.config import LimitsConfig
    from zostream.engine.engine_setup import compute_dtype, resolve_device

    if cfg.method == "lora":
        eng = open_engine(args, LimitsConfig(**LIMITS), tokenizer=tok)
        return eng.device, eng.dtype, eng.streamer, eng.store
    check_device(args.device)
    host = getattr(args, "host_memory", None)
    dtype = compute_dtype(args.dtype, store.dtype, args.device, store.num_parameters(), host)
    return resolve_device(args.device), dtype, None, store


def _run(args: argparse.Namespace, cfg: Any, ses: Any, progress: report.Progress, dist: Any = None) -> int:
    """Evaluate, step, checkpoint and export through the session; the summary is the last stdout line.

    Data parallel: every rank steps, evaluates (so that none waits on another) and checkpoints into its
    own directory; rank 0 alone writes metrics, progress, the export and the summary."""
    from tqdm import tqdm

    tr, main, target, start = ses.trainer, progress.main, cfg.steps, ses.step

    def stopping(flag: list[bool]) -> bool:  # ranks stop together: after the step where one asked
        return dist.stop_agreed if dist is not None else flag[0]

    ses.begin()
    if tr.step >= target and main:
        warn("train", f"the job is already at step {tr.step} (--steps {target}): nothing to train")
    bar = tqdm(
        total=target,
        initial=min(tr.step, target),
        desc="train",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5,
        disable=tr.step >= target or not main,
    )
    with bar, stop_after_step() as stop:
        while not ses.finished and not stopping(stop):
            t0 = time.monotonic()
            if dist is not None:
                dist.stop_requested = stop[0]
            res = tr.run_step()
            if dist is not None:
                dist.verify_log(tr.log.path, tr.step)
            progress.write({"type": "step", **res, "seconds": time.monotonic() - t0, "time": time.time()})
            bar.set_postfix(loss=f"{res['loss']:.4f}", g=f"{abs(res['projected_grad']):.3g}", refresh=False)
            if res.get("climb") and main:  # the divergence guard backed the lr off (engine/climb.py)
                bar.write(f"step {res['step']}: {res['climb']}", file=sys.stderr)
            bar.update(1)
            ses.after_step()
        interrupted = stopping(stop) and not ses.finished
    if dist is not None:
        dist.verify_log(tr.log.path, tr.step, force=True)
    result = None
    if interrupted:
        ses.stop("interrupted")
    else:
        result = ses.finish(export=main)
    if not main:
        return 130 if interrupted else 0
    summary = report.summary(args, ses, start, progress.evals, result, interrupted)
    if dist is not None:
        summary |= {
            "world_size": dist.world_size,
            "micro_batch": tr.cfg.micro_batch_size,
            "dist_payload_bytes_per_step": dist.step_bytes,
            "dist_payload_bytes": dist.payload_bytes,
        }
    if args.json:
        print_json(summary)
    else:
        report.print_summary(summary)
    return 130 if interrupted else 0
