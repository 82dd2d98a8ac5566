"""`zostream train`: a ZO fine-tuning job in this process (its lifecycle: engine/session.py).

The job directory is the job's whole state (see engine/finetune.py): running `train` again on
the same --out resumes from the last logged step, after checking that the flags match the log.
JOBDIR/metrics.jsonl gets one line per step and per evaluation (appended across runs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zostream.clients import train_launch as launch
from zostream.clients.cli import UsageError
from zostream.clients.common import (
    add_json_arg,
    add_runtime_args,
    load_tokenizer,
    nonneg_int,
    open_engine,
    open_store,
    positive_float,
    positive_int,
    print_json,
    usage_error,
    warn,
)
from zostream.engine.config import ESTIMATORS, LOSSES, LR_SCHEDULES, MASTER_DTYPES, METHODS, NOISE, ZOConfig

_ZO_FLAGS = {
    "lr": "--lr",
    "eps": "--eps",
    "q": "--q",
    "loss": "--loss",
    "estimator": "--estimator",
    "choice_score": "--choice-score",
}
LIMITS = dict(max_batch=1, max_seq_len=1, max_new_tokens=1, max_waiting=1, max_prefill_tokens=1)  # no KV use
_FINAL_LOSS_STEPS = 10


def register(sub: argparse._SubParsersAction) -> None:
    _register_train(sub)


# ---- arguments -------------------------------------------------------------------------------
def _register_train(sub: argparse._SubParsersAction) -> None:
    d = {f.name: f.default for f in dataclasses.fields(ZOConfig)}
    p = sub.add_parser(
        "train",
        help="zeroth-order (MeZO/ZO2) fine-tuning job in this process",
        description="Fine-tune --model on --data with zeroth-order SPSA steps (LoRA or full-parameter). "
        "JOBDIR receives update.log (a few bytes per step, replayable with `zostream log replay`), "
        "metrics.jsonl, checkpoints and, at the end, adapter/ (lora) or model/ (full). Running the "
        "command again on the same JOBDIR resumes it. Ctrl-C stops after the current step.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="base model directory")
    p.add_argument(
        "--data", required=True, metavar="FILE", help="training JSONL (see engine/data.py formats)"
    )
    p.add_argument("--eval", metavar="FILE", help="evaluation JSONL (loss; accuracy for choice records)")
    p.add_argument("--method", required=True, choices=METHODS, help="lora (frozen base) or full-parameter")
    p.add_argument(
        "--out", required=True, metavar="JOBDIR", help="job directory (created; resumed if present)"
    )
    p.add_argument("--steps", type=int, default=d["steps"], metavar="N", help=f"default: {d['steps']}")
    p.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: grzo 1e-2 (lora only); fzoo 5e-3 lora, 2e-5 full; "
        "mezo 1e-4 lora, 1e-6 full)",
    )
    p.add_argument(
        "--eps",
        type=float,
        default=None,
        help="perturbation scale (default: grzo, fzoo 1e-2 lora, else 1e-3)",
    )
    p.add_argument(
        "--loss",
        choices=LOSSES,
        default=d["loss"],
        help="candidates: cross-entropy over a choice record's candidates; tokens: NLL of the target "
        "tokens (default: auto, candidates for choice data)",
    )
    p.add_argument(
        "--choice-score",
        choices=("mean", "sum"),
        default=d["choice_score"],
        help="candidates loss: a candidate's length-normalised (mean) or summed log-likelihood",
    )
    p.add_argument(
        "--estimator",
        choices=ESTIMATORS,
        default=d["estimator"],
        help="grzo (lora): one +/- pair of forwards, each group of batch-size/q records on its own "
        "direction, steps normalised by the RMS of the groups' differences; fzoo: q one-sided directions "
        "sharing one unperturbed pass, steps normalised by the spread of their losses; mezo: q +/- pairs "
        "(default: auto: mezo with --q 1, else grzo for lora (fzoo when q groups do not divide the batch) "
        "and fzoo for full)",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=d["batch_size"],
        metavar="N",
        help=f"examples per step (default: {d['batch_size']})",
    )
    p.add_argument(
        "--q",
        type=int,
        default=None,
        metavar="Q",
        help="directions per step (default: grzo 4 groups of the batch, fzoo 4, mezo 1)",
    )
    p.add_argument("--seed", type=int, default=d["seed"], help="job seed: noise, batch order, LoRA init")
    p.add_argument(
        "--lr-schedule",
        choices=("auto", *LR_SCHEDULES),
        default=d["lr_schedule"],
        help="default: auto (cosine for grzo, else constant)",
    )
    p.add_argument("--warmup-steps", type=int, default=d["warmup_steps"], metavar="N", help="default: 0")
    p.add_argument(
        "--min-lr-ratio",
        type=float,
        default=d["min_lr_ratio"],
        metavar="R",
        help="final lr of linear/cosine schedules as a fraction of --lr (default: 0)",
    )
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"], help="default: 0")
    p.add_argument(
        "--noise", choices=NOISE, default=d["noise"], help="perturbation distribution (default: gaussian)"
    )
    p.add_argument(
        "--master-dtype",
        choices=MASTER_DTYPES,
        default=d["master_dtype"],
        help="full-parameter master dtype (default: auto, the base dtype with stochastic rounding)",
    )
    p.add_argument("--lora-r", type=int, default=d["lora_r"], metavar="R", help=f"default: {d['lora_r']}")
    p.add_argument(
        "--lora-alpha", type=float, default=d["lora_alpha"], metavar="A", help=f"default: {d['lora_alpha']:g}"
    )
    p.add_argument(
        "--lora-targets",
        default=",".join(d["lora_targets"]),
        metavar="M1,M2",
        help="comma-separated module names (default: q_proj,v_proj)",
    )
    p.add_argument(
        "--micro-batch",
        type=positive_int,
        default=None,
        metavar="N",
        help="examples per forward: the batch runs as --batch-size/N slices in one pass, its loss is their "
        "summed NLL over their summed tokens (default: the whole batch; with --distributed, --batch-size / "
        "WORLD_SIZE). The update log depends on it bitwise, not on the number of ranks",
    )
    p.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel over the ranks of a torchrun launch (also on when torchrun's RANK, WORLD_SIZE, "
        "MASTER_ADDR and MASTER_PORT are set): --batch-size is the global batch, each rank runs its share; "
        "rank 0 owns JOBDIR, rank r keeps its own update log in JOBDIR/rank-<r>/ (docs/SCALE_OUT.md)",
    )
    p.add_argument(
        "--dist-timeout",
        type=positive_float,
        default=60.0,
        metavar="SECONDS",
        help="with --distributed: a rank that does not answer a step's exchange for this long fails the "
        "job on the others (a rank that dies fails it at once; default: 60)",
    )
    p.add_argument("--max-len", type=int, default=d["max_len"], metavar="N", help="tokens per example")
    p.add_argument(
        "--eval-every",
        type=nonneg_int,
        default=0,
        metavar="N",
        help="evaluate every N steps (and before and after training) when --eval is given",
    )
    p.add_argument(
        "--checkpoint-every",
        type=nonneg_int,
        default=0,
        metavar="N",
        help="checkpoint every N steps (default: only at the end)",
    )
    p.add_argument(
        "--eval-batch-size",
        type=positive_int,
        default=None,
        metavar="N",
        help="examples per evaluation pass (default: --batch-size)",
    )
    p.add_argument(
        "--keep-best",
        action="store_true",
        help="export the weights of the evaluation with the best held-out metric (accuracy for choice data, "
        "else loss), not the last step's; needs --eval",
    )
    p.add_argument(
        "--early-stopping-patience",
        type=nonneg_int,
        default=0,
        metavar="N",
        help="stop after N evaluations without a better held-out metric (default: 0, off); needs --eval "
        "and --eval-every",
    )
    p.add_argument(
        "--no-divergence-guard",
        action="store_true",
        help="apply every step, even one whose |g| or loss is non-finite or an outlier",
    )
    add_runtime_args(p)
    add_json_arg(p, "a JSON summary as the last stdout line")
    p.set_defaults(func=train)


def zo_config(args: argparse.Namespace) -> Any:
    """ZOConfig from the flags; a bad value is a UsageError naming its flag."""
    targets = tuple(t.strip() for t in args.lora_targets.split(",") if t.strip())
    if not targets:
        raise UsageError("--lora-targets: name at least one module, e.g. q_proj,v_proj")
    try:
        return ZOConfig(
            method=args.method,
            steps=args.steps,
            lr=args.lr,
            eps=args.eps,
            batch_size=args.batch_size,
            q=args.q,
            seed=args.seed,
            lr_schedule=args.lr_schedule,
            warmup_steps=args.warmup_steps,
            min_lr_ratio=args.min_lr_ratio,
            weight_decay=args.weight_decay,
            noise=args.noise,
            master_dtype=args.master_dtype,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_targets=targets,
            max_len=args.max_len,
            eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every,
            divergence_guard=not args.no_divergence_guard,
            micro_batch=args.micro_batch,
            loss=args.loss,
            choice_score=args.choice_score,
            estimator=args.estimator,
        )
    except (ValueError, TypeError) as exc:
        raise usage_error(exc, _ZO_FLAGS) from None


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
    from zostream.engine.session import resume_config as resolve
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
        modules = store.family.module_names(store.spec)
        if unknown := [t for t in cfg.lora_targets if t not in modules]:
            raise UsageError(
                f"--lora-targets: unknown module(s) {', '.join(unknown)}; this model has "
                f"{', '.join(sorted(modules))}"
            )
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
        raise usage_error(exc, _ZO_FLAGS, "--out") from None
    open_cfg = resume_config(cfg, store, log_path) if resuming else cfg
    eval_ds = load_data(args.eval, tok, cfg.max_len, "--eval") if args.eval else None
    try:
        validate_dataset(ds, cfg)
    except ValueError as exc:
        raise UsageError(f"--data: {str(exc).removeprefix('training_dataset: ')}") from None
    from zostream.engine.engine import emu_device

    device, dtype, base, store = _base(args, cfg, store, tok)
    main = dist is None or dist.rank == 0
    policy = Policy.of(
        cfg,
        keep_best=args.keep_best,
        patience=args.early_stopping_patience,
        eval_batch_size=args.eval_batch_size or cfg.batch_size,
        eval_on_resume=True,  # the summary's before/after figures are this run's
    )
    progress = Progress(job if main else Path(os.devnull), main)
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
    import torch

    from zostream.clients.common import check_device
    from zostream.engine.config import LimitsConfig
    from zostream.engine.engine import resolve_device

    if cfg.method == "lora":
        eng = open_engine(args, LimitsConfig(**LIMITS), tokenizer=tok)
        return eng.device, eng.dtype, eng.streamer, eng.store
    check_device(args.device)
    dtype = store.dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    return resolve_device(args.device), dtype, None, store


class Progress:
    """The session's events and the steps as rows of JOBDIR/metrics.jsonl and progress lines."""

    def __init__(self, out: Path, main: bool) -> None:
        self.path, self.main = out / "metrics.jsonl" if main else out, main
        self.file: Any = None
        self.evals: list[dict[str, Any]] = []

    def __enter__(self) -> Progress:
        self.file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by __exit__)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.file.close()

    def write(self, row: dict[str, Any]) -> None:
        self.file.write(json.dumps(_nulls(row), allow_nan=False, default=str) + "\n")
        self.file.flush()

    def event(self, kind: str, step: int, data: dict[str, Any]) -> None:
        from tqdm import tqdm

        if kind == "eval":
            row = {"type": "eval", "step": step, **data, "time": time.time()}
            self.write(row)
            self.evals.append(row)
            acc = f", accuracy {data['accuracy']:.4f}" if "accuracy" in data else ""
            if self.main:
                tqdm.write(f"eval at step {step}: loss {data['loss']:.4f}{acc}", file=sys.stderr)
        elif kind == "early_stop" and self.main:
            tqdm.write(f"early stopping at step {step} (best at step {data['best_step']})", file=sys.stderr)


def _run(args: argparse.Namespace, cfg: Any, ses: Any, progress: Progress, dist: Any = None) -> int:
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
    summary = _summary(args, ses, start, progress.evals, result, interrupted)
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
        _print_summary(summary)
    return 130 if interrupted else 0


def _nulls(row: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN / inf (a diverged step's loss): they become null."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def _step_losses(metrics_path: Path) -> dict[int, float]:
    """step -> training loss from metrics.jsonl (all runs of the job; the latest line per step wins)."""
    losses: dict[int, float] = {}
    with contextlib.suppress(OSError), open(metrics_path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash
            if row.get("type") == "step" and isinstance(row.get("loss"), int | float):
                losses[int(row["step"])] = float(row["loss"])
    return losses


def _summary(
    args: argparse.Namespace,
    ses: Any,
    start: int,
    evals: list[dict[str, Any]],
    result: Any,
    interrupted: bool,
) -> dict[str, Any]:
    tr, out = ses.trainer, ses.job_dir
    losses = _step_losses(out / "metrics.jsonl")
    last = [losses[s] for s in range(max(0, tr.step - _FINAL_LOSS_STEPS), tr.step) if s in losses]
    log_path = out / "update.log"
    summary: dict[str, Any] = {
        "method": tr.cfg.method,
        "steps": tr.step,
        "steps_this_run": tr.step - start,
        "resumed_from": start,
        "final_train_loss": sum(last) / len(last) if last else None,
        "output": str(result.path) if result is not None else None,
        "output_step": result.step if result is not None else None,
        "stopped_early": ses.stopped,
        "update_log": str(log_path),
        "update_log_bytes": log_path.stat().st_size,
        "metrics": str(out / "metrics.jsonl"),
        "interrupted": interrupted,
    }
    if args.eval:
        summary |= {
            "eval_loss_before": evals[0]["loss"],
            "eval_accuracy_before": evals[0].get("accuracy"),
            "eval_loss": evals[-1]["loss"],
            "eval_accuracy": evals[-1].get("accuracy"),
            "best_step": ses.best.step if ses.best.step >= 0 else None,
            "best_metric": ses.best.metric or None,
            "best_value": ses.best.value if ses.best.step >= 0 else None,
        }
    return summary


def _print_summary(s: dict[str, Any]) -> None:
    def num(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    print(f"steps        {s['steps']} ({s['steps_this_run']} this run)")
    print(f"train loss   {num(s['final_train_loss'])} (mean of the last steps)")
    if "eval_loss" in s:
        print(f"eval loss    {num(s['eval_loss_before'])} -> {num(s['eval_loss'])}")
        if s["eval_accuracy"] is not None:
            print(f"eval acc     {num(s['eval_accuracy_before'])} -> {num(s['eval_accuracy'])}")
    print(f"update log   {s['update_log']} ({s['update_log_bytes']:,} bytes)")
    if s.get("best_step") is not None:
        print(f"best         held-out {s['best_metric']} {num(s['best_value'])} at step {s['best_step']}")
    if s["stopped_early"]:
        print(f"stopped      {s['stopped_early']}")
    out = s["output"]
    if out is not None and s["output_step"] != s["steps"]:
        out = f"{out} (the weights of step {s['output_step']})"
    print(f"output       {out or 'none (interrupted: run the same command again to resume)'}")
