"""kill -9 at chosen points of a full-parameter and a LoRA job: after every restart the job resumes, and
its final update log and exported weights equal an uninterrupted run's (stress/faults.py).

The short run kills each job three times, at the kinds most likely to lose data: a torn log tail, a
bit-flipped last record (the server is down), half-applied weights, a mid-pass kill and a half-written
export. The long run (`-m slow`) is the documented 20-kill run of RELIABILITY.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stress import faults


def check(fig: dict, kills_per_job: int) -> None:
    assert fig["ok"], fig
    for method, job in fig["jobs"].items():
        assert job["status"] == "JOB_STATUS_SUCCEEDED", (method, job["error"])
        assert job["kills_fired"] == kills_per_job, (method, fig["kills"])
        assert job["update_log_equal"] and job["exports_equal"], (method, job)
        assert (
            job["event_ids_contiguous"] and job["succeeded_events"] == 1 and job["last_event"] == "succeeded"
        )
        assert job["log_repaired_events"] == job["torn_or_flipped_tails"]
        assert job["resumed_events"] >= 1
    assert all(k["exit_code"] == -9 for k in fig["kills"])


# Once flaky (1 of 2 runs after tests/server): between two jobs' kill rounds the queued job ran ahead, and
# an outside kill came after the tiny job had finished. The driver now starts only the job under test
# (stress/serve.py --only-job) and kills from outside after it has logged more steps.
def test_kill_9_short(tmp_path: Path) -> None:
    args = faults.parse_args(
        [
            "--kills",
            "3",
            "--steps",
            "14",
            "--seed",
            "5",
            "--kinds",
            "log_torn,bitflip",
            "--workdir",
            str(tmp_path),
        ]
    )
    fig = faults.run(args)
    check(fig, 3)
    kinds = {(k["job"], k["kind"]) for k in fig["kills"]}
    assert {("full", "export"), ("lora", "export")} <= kinds
    # Each job lost a record to a torn or flipped tail, and it was noticed.
    assert all(j["torn_or_flipped_tails"] >= 1 for j in fig["jobs"].values()), fig["kills"]
    # The LoRA job stayed queued through the full job's rounds and their clean stop (--only-job).
    assert next(k for k in fig["kills"] if k["job"] == "lora")["logged_before"] == 0, fig["kills"]


@pytest.mark.slow
def test_kill_9_twenty_times(tmp_path: Path) -> None:
    fig = faults.run(faults.parse_args(["--kills", "20", "--seed", "0", "--workdir", str(tmp_path)]))
    check(fig, 20)
    assert set(fig["kills_by_kind"]) >= set(faults.KINDS) | {"export", "checkpoint"}
