"""Where the divergence guard's slow-climb rule (engine/climb.py) trips on the training losses of finished
jobs, for a grid of windows and rises: how the default thresholds were chosen (bench/RESULTS.md).

    python bench/climb.py JOBDIR [JOBDIR ...] [--grid 10:0.25,20:0.5,30:0.5]

A job directory's update.log gives each step's loss when it records them (format 3 / 4); older jobs'
losses come from their metrics.jsonl ("step" rows). The rule is replayed over a run that trained
without it: its first trip is where a guarded run would first have backed off; later trips (history
restarting after each) are indicative only, since a guarded run trains on at half the lr from there.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from zostream.engine import climb
from zostream.engine.update_log import UpdateLog


def job_losses(job: Path) -> list[float]:
    """The training losses of the accepted steps, in step order."""
    log = job / "update.log"
    if log.exists():
        with UpdateLog.open(log, repair=False) as lg:
            if lg.has_loss:
                return [s.loss for s in lg.steps() if not s.skipped and s.loss is not None]
    by_step: dict[int, float] = {}
    for line in (job / "metrics.jsonl").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line
        if row.get("type") == "step" and not row.get("skipped") and isinstance(row.get("loss"), int | float):
            by_step[int(row["step"])] = float(row["loss"])  # a resumed run's later line wins
    return [by_step[s] for s in sorted(by_step)]


def mean(xs: list[float]) -> float:
    xs = [x for x in xs if math.isfinite(x)]
    return sum(xs) / len(xs) if xs else math.nan


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jobs", nargs="+", type=Path, help="job directories (update.log and/or metrics.jsonl)")
    ap.add_argument("--grid", default="10:0.25,10:0.5,20:0.25,20:0.5,30:0.5", help="window:rise,...")
    args = ap.parse_args(argv)
    grid = []
    for item in args.grid.split(","):
        w, _, r = item.partition(":")
        grid.append(climb.ClimbRule(int(w), float(r)))
    head = ["job", "steps", "loss first 20 -> last 20"] + [f"w{g.window} r{g.rise:g}" for g in grid]
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for job in args.jobs:
        ls = job_losses(job)
        cells = [job.name, str(len(ls)), f"{mean(ls[:20]):.3f} -> {mean(ls[-20:]):.3f}"]
        for rule in grid:
            t = climb.trip_steps(ls, rule)
            cells.append(("first " + str(t[0]) + (f" ({len(t)})" if len(t) > 1 else "")) if t else "-")
        print(" | ".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
