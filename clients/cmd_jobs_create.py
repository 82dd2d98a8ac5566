"""`zostream jobs create`: upload the data files (named by content) and create a fine-tuning job."""

from __future__ import annotations

import argparse
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

from zostream import defaults as D
from zostream.clients.cli import UsageError
from zostream.clients.client import ZostreamClient, ZostreamError
from zostream.clients.cmd_jobs_events import follow
from zostream.clients.common import nonneg_float, nonneg_int, positive_float, positive_int, seed_int
from zostream.clients.remote import print_json, run

CODECS = ("none", "int8", "nf4")


def register_create(jobs_sub: argparse._SubParsersAction, common: Callable[..., None]) -> None:
    p = jobs_sub.add_parser(
        "create",
        help="create a fine-tuning job",
        description="Create a zeroth-order fine-tuning job. Unset hyperparameters take the server's "
        "defaults (those of `zostream train`); the resolved values are in `jobs get --json`.",
    )
    p.add_argument("--method", required=True, choices=("lora", "full"), help="lora (frozen base) or full")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", metavar="FILE", help="training JSONL file (uploaded first)")
    data.add_argument("--dataset", metavar="NAME", help="name of a dataset already on the server")
    ev = p.add_mutually_exclusive_group()
    ev.add_argument("--eval", metavar="FILE", help="validation JSONL file (uploaded first)")
    ev.add_argument("--eval-dataset", metavar="NAME", help="name of a validation dataset on the server")
    p.add_argument("--steps", type=positive_int, default=100, metavar="N", help="default: 100")
    p.add_argument(
        "--lr", type=positive_float, metavar="LR", help="learning rate (default: by method and estimator)"
    )
    p.add_argument("--eps", type=positive_float, metavar="EPS", help="perturbation scale epsilon")
    p.add_argument("--batch-size", type=positive_int, metavar="N", help="examples per step")
    p.add_argument(
        "--q",
        type=positive_int,
        metavar="Q",
        help="directions per step (default: 4 fzoo and grzo, 1 mezo)",
    )
    p.add_argument(
        "--loss", choices=("auto", "candidates", "tokens"), help="default: auto (candidates for choice data)"
    )
    p.add_argument(
        "--estimator",
        choices=("auto", "grzo", "fzoo", "mezo"),
        help="default: auto (grzo; fzoo when q groups do not divide the batch; mezo with --q 1)",
    )
    p.add_argument("--seed", type=seed_int, metavar="S", help="job seed (default: the server picks one)")
    p.add_argument(
        "--lr-schedule",
        choices=("constant", "linear", "cosine"),
        help="default: cosine for grzo, else constant",
    )
    p.add_argument("--warmup-steps", type=nonneg_int, metavar="N", help="linear warmup steps")
    p.add_argument("--min-lr-ratio", type=nonneg_float, metavar="R", help="decay floor as a fraction of --lr")
    p.add_argument("--weight-decay", type=nonneg_float, metavar="WD", help="decoupled weight decay")
    p.add_argument(
        "--average-decay",
        type=nonneg_float,
        metavar="D",
        help="LoRA: serve the EMA of the factors with this decay; 0: the last step's (server default: "
        f"{D.AVERAGE_DECAY['lora']:g})",
    )
    p.add_argument("--noise", choices=("gaussian", "rademacher"), help="perturbation distribution")
    p.add_argument(
        "--master-dtype", choices=("float32", "bfloat16", "float16"), help="trained weights' dtype"
    )
    p.add_argument("--lora-r", type=positive_int, metavar="R", help="LoRA rank")
    p.add_argument("--lora-alpha", type=positive_float, metavar="A", help="LoRA alpha")
    p.add_argument(
        "--lora-init-scale",
        type=positive_float,
        metavar="S",
        help=f"LoRA A factors' init bound as a multiple of PEFT's (server default: {D.LORA_INIT_SCALE:g})",
    )
    p.add_argument(
        "--lora-targets",
        metavar="M1,M2",
        help="comma-separated module names (e.g. q_proj,v_proj), or all-linear",
    )
    p.add_argument("--codec", choices=CODECS, help="transfer codec of the frozen base")
    p.add_argument("--eval-every", type=nonneg_int, metavar="N", help="steps between evaluations")
    p.add_argument("--checkpoint-every", type=nonneg_int, metavar="N", help="steps between checkpoints")
    p.add_argument(
        "--keep-best",
        action="store_true",
        help="the result holds the best evaluated step's weights (held-out accuracy, else loss); "
        "needs --eval",
    )
    p.add_argument(
        "--early-stopping-patience",
        type=nonneg_int,
        metavar="N",
        help="stop after N evaluations without a better held-out metric; needs --eval and --eval-every",
    )
    p.add_argument("--max-len", type=positive_int, metavar="N", help="longest example in tokens")
    p.add_argument("--name", default="", metavar="TEXT", help="display name")
    p.add_argument("--idempotency-key", default="", metavar="KEY", help="makes retrying this command safe")
    p.add_argument(
        "--follow", action="store_true", help="then follow the job until it ends (see `jobs events`)"
    )
    common(p, _create)


def upload_file(client: ZostreamClient, path: str, flag: str) -> str:
    """Upload a JSONL file as the dataset `sha256-<first 16 hex>`; reuse it when already there."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{flag}: no such file: {path}")
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    name = f"sha256-{digest.hexdigest()[:16]}"
    try:
        ds = client.upload_dataset(name, file)
        print(
            f"zostream jobs create: uploaded {path} as dataset {name} ({ds.get('num_records', 0)} records, "
            f"{ds.get('kind', '')})",
            file=sys.stderr,
        )
    except ZostreamError as exc:
        if exc.code != "ALREADY_EXISTS":  # same name = same content: reuse it
            raise
    return name


def _create(args: argparse.Namespace) -> int:
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    if args.lora_targets is not None and not targets:
        raise UsageError("--lora-targets: give at least one module name, e.g. q_proj,v_proj")
    lora_args = (args.lora_r, args.lora_alpha, targets, args.lora_init_scale)
    if args.method == "full" and any(v is not None for v in lora_args):
        raise UsageError(
            "--lora-r/--lora-alpha/--lora-targets/--lora-init-scale: only apply to --method lora"
        )

    def body(client: ZostreamClient) -> int:
        train = upload_file(client, args.data, "--data") if args.data else args.dataset
        val = upload_file(client, args.eval, "--eval") if args.eval else (args.eval_dataset or "")
        job = client.create_job(
            args.method,
            train,
            validation_dataset=val,
            steps=args.steps,
            idempotency_key=args.idempotency_key,
            display_name=args.name,
            learning_rate=args.lr,
            eps=args.eps,
            batch_size=args.batch_size,
            q=args.q,
            loss=args.loss,
            estimator=args.estimator,
            seed=args.seed,
            lr_schedule=args.lr_schedule,
            warmup_steps=args.warmup_steps,
            min_lr_ratio=args.min_lr_ratio,
            weight_decay=args.weight_decay,
            average_decay=args.average_decay,
            noise=args.noise,
            master_dtype=args.master_dtype,
            codec=args.codec,
            eval_every=args.eval_every,
            checkpoint_every=args.checkpoint_every,
            max_len=args.max_len,
            keep_best=args.keep_best or None,
            early_stopping_patience=args.early_stopping_patience,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_target_modules=targets,
            lora_init_scale=args.lora_init_scale,
        )
        if args.json:
            print_json(job)
        else:
            print(job["id"], flush=True)
        return follow(client, job["id"], args.json) if args.follow else 0

    return run("jobs create", args, body)
