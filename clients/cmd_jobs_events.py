"""`zostream jobs events` and `--follow`: a job's events as lines, and a progress bar until it ends."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from zostream.clients.client import ZostreamClient
from zostream.clients.formatting import abs_or_none, num
from zostream.clients.remote import json_line, run

TERMINAL_EVENTS = {"succeeded": "SUCCEEDED", "failed": "FAILED", "cancelled": "CANCELLED"}
TERMINAL = set(TERMINAL_EVENTS.values())


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


def events_command(args: argparse.Namespace) -> int:
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
                    {
                        "loss": num(m.get("train_loss")),
                        "|g|": num(abs_or_none(m.get("projected_grad")), ".3g"),
                    },
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
