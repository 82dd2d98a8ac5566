"""`zostream jobs ...`: fine-tuning jobs on a zostream server (create, get, list, cancel, checkpoints,
events).

`jobs create` is in cmd_jobs_create.py (it uploads data files named by their SHA-256, so uploading the
same file twice is free); `jobs events` and `--follow` (a progress bar on stderr until the job ends, exit
0 when it SUCCEEDED, 1 when it FAILED or was CANCELLED) in cmd_jobs_events.py.
"""

from __future__ import annotations

import argparse
from typing import Any

from zostream.clients.client import ZostreamClient
from zostream.clients.cmd_jobs_create import register_create
from zostream.clients.cmd_jobs_events import events_command
from zostream.clients.common import nonneg_int
from zostream.clients.formatting import abs_or_none, num, print_table, short
from zostream.clients.remote import add_connection_args, print_json, run


def register(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser(
        "jobs", help="fine-tuning jobs on a server (create, get, list, cancel, checkpoints, events)"
    )
    jobs_sub = jobs.add_subparsers(dest="jobs_command", metavar="JOBS_COMMAND", required=True)
    register_create(jobs_sub, _common)

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
    _common(p, events_command, "one JSON object per event, one per line")


def _common(p: argparse.ArgumentParser, func: Any, what: str = "one JSON object") -> None:
    add_connection_args(p)
    p.add_argument("--json", action="store_true", help=f"print {what} on stdout instead of text")
    p.set_defaults(func=func)


# ---- get / list / cancel ----------------------------------------------------------------------
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
            ("train loss", num(m.get("train_loss"))),
            ("|g|", num(abs_or_none(m.get("projected_grad")), ".3g")),
            ("eval loss", num(m.get("eval_loss"))),
            ("adapter", job.get("adapter_id", "") or "-"),
            ("created", job.get("created_at", "-")),
            ("finished", job.get("finished_at", "-")),
        ]
        if "error" in job:
            rows.append(("error", f"{job['error'].get('code', '')}: {job['error'].get('message', '')}"))
        print("\n".join(f"{k + ':':<12}{v}" for k, v in rows), flush=True)
        return 0

    return run("jobs get", args, body)


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
                    num(j.get("metrics", {}).get("train_loss")),
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
                    num(m.get("train_loss")),
                    num(m.get("eval_loss")),
                    num(m.get("eval_accuracy"), ".3f"),
                    f"{int(c.get('size_bytes', 0)) / 2**20:.1f} MiB",
                    c.get("adapter_id", "") or "-",
                )
            )
        print_table(rows)
        return 0

    return run("jobs checkpoints", args, body)


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
