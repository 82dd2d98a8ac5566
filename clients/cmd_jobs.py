"""`zostream jobs ...`: fine-tuning jobs on a zostream server (create, get, list, cancel, checkpoints,
events).

`jobs create --data FILE` uploads FILE first as a dataset named after its SHA-256, so uploading
the same file twice is free. `--follow` (create, events) shows a progress bar on stderr until the
job ends and exits 0 when it SUCCEEDED, 1 when it FAILED or was CANCELLED.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path
from typing import Any

from zostream.clients.cli import UsageError
from zostream.clients.client import ZostreamClient, ZostreamError
from zostream.clients.common import nonneg_float, nonneg_int, positive_float, positive_int, seed_int
from zostream.clients.remote import add_connection_args, json_line, print_json, run

TERMINAL_EVENTS = {"succeeded": "SUCCEEDED", "failed": "FAILED", "cancelled": "CANCELLED"}
TERMINAL = set(TERMINAL_EVENTS.values())
CODECS = ("none", "int8", "nf4")


def register(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser(
        "jobs", help="fine-tuning jobs on a server (create, get, list, cancel, checkpoints, events)"
    )
    jobs_sub = jobs.add_subparsers(dest="jobs_command", metavar="JOBS_COMMAND", required=True)
    _register_create(jobs_sub)

    p = jobs_sub.add_parser("get", help="show one job")
    p.add_argument("job_id", metavar="ID")
    _common(p, _get)

    p = jobs_sub.add_parser("list", help="list jobs, newest first")
    p.add_argument(
        "--status",
        nargs="+",
        default=[],
        metavar="S",
        choices=("queued", "running", "cancelling", "succeeded", "failed", "cancelled"),
        help="only jobs in these states",
    )
    _common(p, _list, "one JSON array of jobs")

    p = jobs_sub.add_parser("cancel", help="cancel a job (a running one stops after its current step)")
    p.add_argument("job_id", metavar="ID")
    _common(p, _cancel)

    p = jobs_sub.add_parser("delete", help="delete a finished job (record, files, result, adapter)")
    p.add_argument("job_id", metavar="ID")
    _common(p, _delete_job)

    p = jobs_sub.add_parser(
        "checkpoints",
        help="list a job's checkpoints (oldest first) and the adapter id serving each",
        description="A LoRA job's checkpoint answers Generate as its adapter id (JOB_ID:ckpt-step-N); "
        "any other logged step N does too, and `zostream adapters download --job ID --checkpoint NAME` "
        "(or --upto N) fetches its weights.",
    )
    p.add_argument("job_id", metavar="ID")
    _common(p, _checkpoints, "one JSON array of checkpoints")

    p = jobs_sub.add_parser("events", help="show a job's events; --follow until it ends")
    p.add_argument("job_id", metavar="ID")
    p.add_argument(
        "--follow",
        action="store_true",
        help="stream new events with a progress bar until the job ends (exit 0 iff it succeeded)",
    )
    p.add_argument("--after", type=nonneg_int, default=0, metavar="N", help="only events with id > N")
    _common(p, _events, "one JSON object per event, one per line")


def _common(p: argparse.ArgumentParser, func: Any, what: str = "one JSON object") -> None:
    add_connection_args(p)
    p.add_argument("--json", action="store_true", help=f"print {what} on stdout instead of text")
    p.set_defaults(func=func)


def _register_create(jobs_sub: argparse._SubParsersAction) -> None:
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
        help="default: auto (grzo for lora, fzoo for full; mezo with --q 1)",
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
    p.add_argument("--noise", choices=("gaussian", "rademacher"), help="perturbation distribution")
    p.add_argument(
        "--master-dtype", choices=("float32", "bfloat16", "float16"), help="trained weights' dtype"
    )
    p.add_argument("--lora-r", type=positive_int, metavar="R", help="LoRA rank")
    p.add_argument("--lora-alpha", type=positive_float, metavar="A", help="LoRA alpha")
    p.add_argument("--lora-targets", metavar="M1,M2", help="comma-separated module names, e.g. q_proj,v_proj")
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
    _common(p, _create)


# ---- create ---------------------------------------------------------------------------------
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
    if args.method == "full" and any(v is not None for v in (args.lora_r, args.lora_alpha, targets)):
        raise UsageError("--lora-r/--lora-alpha/--lora-targets: only apply to --method lora")

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
        )
        if args.json:
            print_json(job)
        else:
            print(job["id"], flush=True)
        return follow(client, job["id"], args.json) if args.follow else 0

    return run("jobs create", args, body)


# ---- get / list / cancel ----------------------------------------------------------------------
def short(enum_name: str) -> str:
    """'JOB_STATUS_RUNNING' -> 'running', 'TUNING_METHOD_LORA' -> 'lora'."""
    for prefix in ("JOB_STATUS_", "TUNING_METHOD_", "ADAPTER_STATUS_", "LR_SCHEDULE_", "NOISE_KIND_"):
        if enum_name.startswith(prefix):
            return enum_name.removeprefix(prefix).lower()
    return enum_name


def _num(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def _get(args: argparse.Namespace) -> int:
    def body(client: ZostreamClient) -> int:
        job = client.get_job(args.job_id)
        if args.json:
            print_json(job)
            return 0
        prog, m = job.get("progress", {}), job.get("metrics", {})
        rows = [
            ("id", job["id"]),
            ("name", job.get("display_name", "")),
            ("status", short(job["status"])),
            ("method", short(job["method"])),
            ("dataset", job.get("training_dataset", "")),
            ("validation", job.get("validation_dataset", "") or "-"),
            ("steps", f"{prog.get('steps_done', 0)}/{prog.get('steps_total', 0)}"),
            ("train loss", _num(m.get("train_loss"))),
            ("|g|", _num(_abs(m.get("projected_grad")), ".3g")),
            ("eval loss", _num(m.get("eval_loss"))),
            ("adapter", job.get("adapter_id", "") or "-"),
            ("created", job.get("created_at", "-")),
            ("finished", job.get("finished_at", "-")),
        ]
        if "error" in job:
            rows.append(("error", f"{job['error'].get('code', '')}: {job['error'].get('message', '')}"))
        print("\n".join(f"{k + ':':<12}{v}" for k, v in rows), flush=True)
        return 0

    return run("jobs get", args, body)


def _abs(v: float | None) -> float | None:
    return None if v is None else abs(v)


def _list(args: argparse.Namespace) -> int:
    def body(client: ZostreamClient) -> int:
        jobs = list(client.list_jobs(statuses=args.status))
        if args.json:
            print_json(jobs)
            return 0
        rows = [("ID", "STATUS", "METHOD", "STEPS", "LOSS", "NAME")]
        for j in jobs:
            prog = j.get("progress", {})
            rows.append(
                (
                    j["id"],
                    short(j["status"]),
                    short(j["method"]),
                    f"{prog.get('steps_done', 0)}/{prog.get('steps_total', 0)}",
                    _num(j.get("metrics", {}).get("train_loss")),
                    j.get("display_name", ""),
                )
            )
        print_table(rows)
        return 0

    return run("jobs list", args, body)


def _checkpoints(args: argparse.Namespace) -> int:
    def body(client: ZostreamClient) -> int:
        cps = sorted(client.list_checkpoints(args.job_id), key=lambda c: int(c.get("step", 0)))
        if args.json:
            print_json(cps)
            return 0
        rows = [("STEP", "NAME", "TRAIN LOSS", "EVAL LOSS", "ACCURACY", "SIZE", "ADAPTER")]
        for c in cps:
            m = c.get("metrics", {})
            rows.append(
                (
                    str(c.get("step", 0)),
                    c.get("name", ""),
                    _num(m.get("train_loss")),
                    _num(m.get("eval_loss")),
                    _num(m.get("eval_accuracy"), ".3f"),
                    f"{int(c.get('size_bytes', 0)) / 2**20:.1f} MiB",
                    c.get("adapter_id", "") or "-",
                )
            )
        print_table(rows)
        return 0

    return run("jobs checkpoints", args, body)


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    sys.stdout.flush()


def _cancel(args: argparse.Namespace) -> int:
    def body(client: ZostreamClient) -> int:
        job = client.cancel_job(args.job_id)
        if args.json:
            print_json(job)
        else:
            print(f"{job['id']} {short(job['status'])}", flush=True)
        return 0

    return run("jobs cancel", args, body)


def _delete_job(args: argparse.Namespace) -> int:
    def body(client: ZostreamClient) -> int:
        client.delete_job(args.job_id)
        print(f"deleted {args.job_id}", flush=True)
        return 0

    return run("jobs delete", args, body)


# ---- events ---------------------------------------------------------------------------------
def format_event(e: dict[str, Any]) -> str:
    metrics = " ".join(f"{k}={v:.4g}" for k, v in sorted(e.get("metrics", {}).items()))
    parts = [
        f"#{e['id']}",
        e.get("time", ""),
        e.get("type", ""),
        f"step={e.get('step', 0)}",
        e.get("message", ""),
        metrics,
    ]
    return " ".join(p for p in parts if p)


def _events(args: argparse.Namespace) -> int:
    def body(client: ZostreamClient) -> int:
        if args.follow:
            return follow(client, args.job_id, args.json, args.after)
        for e in client.job_events(args.job_id, args.after):
            print(json_line(e) if args.json else format_event(e), flush=True)
        return 0

    return run("jobs events", args, body)


def follow(client: ZostreamClient, job_id: str, as_json: bool, after: int = 0) -> int:
    """Stream a job's events until it ends: bar on stderr, non-step events (every event with
    as_json) on stdout. Returns 0 when the job SUCCEEDED, 1 when it FAILED or was CANCELLED."""
    from tqdm import tqdm

    job = client.get_job(job_id)
    total = int(job.get("progress", {}).get("steps_total", 0)) or None
    status = job["status"].removeprefix("JOB_STATUS_")
    bar = tqdm(total=total, unit="step", desc=job_id, file=sys.stderr, disable=None, dynamic_ncols=True)
    try:
        for e in client.stream_job_events(job_id, after):
            if as_json:
                tqdm.write(json_line(e), file=sys.stdout)
            elif e.get("type") != "step":
                tqdm.write(format_event(e), file=sys.stdout)
            if e.get("step", 0) > bar.n:
                bar.update(e["step"] - bar.n)
            m = e.get("metrics", {})
            if "train_loss" in m or "projected_grad" in m:
                bar.set_postfix(
                    {"loss": _num(m.get("train_loss")), "|g|": _num(_abs(m.get("projected_grad")), ".3g")},
                    refresh=False,
                )
            status = TERMINAL_EVENTS.get(e.get("type", ""), status)
    finally:
        bar.close()
    sys.stdout.flush()
    if status not in TERMINAL:  # the stream ended without a final event: ask the job
        status = client.get_job(job_id)["status"].removeprefix("JOB_STATUS_")
    if status == "SUCCEEDED":
        return 0
    job = client.get_job(job_id)
    why = job.get("error", {})
    detail = f": {why.get('code', '')}: {why.get('message', '')}" if why else ""
    print(f"zostream jobs: job {job_id} {status.lower()}{detail}", file=sys.stderr, flush=True)
    return 1
