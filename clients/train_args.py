"""`zostream train`'s job flags (model, data, method, ZO hyperparameters, data parallelism, evaluation,
lifecycle) and the ZOConfig they make."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from zostream import defaults as D
from zostream.clients.cli import UsageError
from zostream.clients.common import nonneg_int, positive_float, positive_int, usage_error
from zostream.engine.config import ESTIMATORS, LOSSES, LR_SCHEDULES, MASTER_DTYPES, METHODS, NOISE, ZOConfig

# ZOConfig field -> the flag that sets it (errors name the flag).
ZO_FLAGS = {
    "lr": "--lr",
    "eps": "--eps",
    "q": "--q",
    "loss": "--loss",
    "estimator": "--estimator",
    "choice_score": "--choice-score",
}


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The job's flags; the runtime flags (device, memory, codec) are common.add_runtime_args."""
    d = {f.name: f.default for f in dataclasses.fields(ZOConfig)}
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
        help="learning rate (default: grzo 1e-2 lora, 2e-3 full; fzoo 5e-3 lora, 1e-3 full; "
        "mezo 1e-4 lora, 1e-6 full)",
    )
    p.add_argument(
        "--eps",
        type=float,
        default=None,
        help="perturbation scale (default: grzo and fzoo 1e-2 lora, 1e-3 full; mezo 1e-3)",
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
        help="grzo: one +/- pair of forwards, each group of batch-size/q records on its own "
        "direction, steps normalised by the RMS of the groups' differences; fzoo: q one-sided directions "
        "sharing one unperturbed pass, steps normalised by the spread of their losses; mezo: q +/- pairs "
        "(default: auto: mezo with --q 1, else grzo (fzoo when q groups do not divide the batch))",
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
        "--average-decay",
        type=float,
        default=d["average_decay"],
        metavar="D",
        help="LoRA: evaluate, export and serve the EMA of the factors with this decay; 0: the last "
        f"step's (default: {D.AVERAGE_DECAY['lora']:g} for lora, 0 for full; a resumed job keeps the "
        "decay it started with)",
    )
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
        "--lora-init-scale",
        type=float,
        default=d["lora_init_scale"],
        metavar="S",
        help="LoRA: the A factors' init bound as a multiple of PEFT's 1/sqrt(in); B starts at 0 "
        f"(default: {d['lora_init_scale']:g}; a resumed job keeps the init it started with)",
    )
    p.add_argument(
        "--lora-targets",
        default=",".join(d["lora_targets"]),
        metavar="M1,M2",
        help=f"comma-separated module names, or all-linear: every linear layer of the blocks "
        f"(default: {','.join(d['lora_targets'])})",
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
            average_decay=args.average_decay,
            noise=args.noise,
            master_dtype=args.master_dtype,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_targets=targets,
            lora_init_scale=args.lora_init_scale,
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
        raise usage_error(exc, ZO_FLAGS) from None
