"""What `zostream train` writes and prints: JOBDIR/metrics.jsonl rows, progress lines, the summary."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

_FINAL_LOSS_STEPS = 10


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


def summary(
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


def print_summary(s: dict[str, Any]) -> None:
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
