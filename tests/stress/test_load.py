"""Load: concurrent Generate streams with mixed lengths and sampling while a LoRA job trains; admission
refuses what can never fit and answers overload with RESOURCE_EXHAUSTED, never a hang (stress/load.py).

The short run holds 8 streams for 6 s; the long run (`-m slow`) is the documented 64-stream run.
"""

from __future__ import annotations

import pytest

from stress import load


def check(fig: dict) -> None:
    assert fig["ok"], fig
    assert fig["errors"] == 0 and fig["hung_workers"] == 0, fig["error_examples"]
    assert fig["requests_finished"] >= fig["streams"], fig["outcomes"]  # every stream finished requests
    assert fig["job"]["status_at_end"] == "JOB_STATUS_RUNNING" and fig["job"]["steps_during_load"] > 0
    assert fig["ttft_p50_ms"] > 0 and fig["tokens_per_second"] > 0
    never = {k: v for k, v in fig["admission"].items() if k != "burst"}
    assert len(never) == 2
    for name, probe in never.items():
        assert probe["code"] == "INVALID_ARGUMENT" and probe["seconds"] < 2.0, (name, probe)
    assert "exceeds the maximum sequence length" in never["prompt + max_new_tokens > max_seq_len"]["message"]
    burst = fig["admission"]["burst"]
    assert burst["hung"] == 0 and burst["answered"] == burst["requests"]
    assert set(burst["codes"]) == {"OK", "RESOURCE_EXHAUSTED"}, burst  # the queue overflowed, and answered
    assert burst["resource_exhausted_p99_seconds"] < 5.0
    assert fig["serves_after"]


def test_load_short() -> None:
    # max_batch 4 + max_waiting 8: a burst of 60 long requests must overflow the queue.
    fig = load.run(
        load.parse_args(
            [
                "--streams",
                "8",
                "--duration",
                "6",
                "--burst",
                "60",
                "--max-batch",
                "4",
                "--max-waiting",
                "8",
                "--seed",
                "1",
            ]
        )
    )
    check(fig)


@pytest.mark.slow
def test_load_64_streams_10_minutes() -> None:
    fig = load.run(load.parse_args(["--streams", "64", "--duration", "600"]))
    check(fig)
    # Memory is flat: after warm-up the server's RSS grows by less than 64 MiB over the run.
    assert fig["rss"]["growth_after_warmup_mib"] < 64, fig["rss"]
