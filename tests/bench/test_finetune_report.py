"""bench/finetune.py's report: accuracy at a forward count, the per-run and per-evaluation tables.

Expected values are written out by hand from the small curves below (not produced by the script).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "finetune.py"


@pytest.fixture(scope="module")
def ft() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_finetune", SCRIPT)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pts(*rows: tuple[int, float, float | None]) -> list[dict]:
    return [{"forwards": f, "accuracy": a, "candidate_loss": ce} for f, a, ce in rows]


FULL = pts((0, 0.5, 2.0), (100, 0.6, 1.0), (200, 0.8, 0.5))
CUT = pts((0, 0.5, 2.0), (100, 0.7, None))  # stopped after 100 forwards


def test_at_is_the_last_evaluation_up_to_the_count_and_none_past_a_runs_end(ft):
    assert ft.at(FULL, 0) == 0.5
    assert ft.at(FULL, 150) == 0.6  # between evaluations: the one before
    assert ft.at(FULL, 200) == 0.8
    assert ft.at(CUT, 100) == 0.7
    assert ft.at(CUT, 150) is None  # a run cut short says nothing about later counts
    assert ft.at([], 0) is None


def test_table_means_over_seeds_and_marks_a_cut_short_run(ft):
    text = ft.table("t", {"a": {"0": FULL, "1": CUT}, "b": {"0": FULL}}, 200)
    rows = [ln for ln in text.splitlines() if ln.startswith("| a") or ln.startswith("| b")]
    # marks 50, 100, 200: run a at 50 = mean(0.5, 0.5); at 100 = mean(0.6, 0.7); at 200 only seed 0 reached it
    assert rows[0] == "| a | 2 | 0.500 | 0.500 | 0.650 | 0.800 | 0.800 |"
    assert rows[1] == "| b | 1 | 0.500 | 0.500 | 0.600 | 0.800 | 0.800 |"


def test_points_lists_every_evaluation_with_its_loss(ft):
    text = ft.points("t", {"a": {"0": FULL, "1": CUT}})
    lines = text.splitlines()
    assert "| run | seed | 0 | 100 | 200 |" in lines
    assert "| a | 0 | 0.500 (2.00) | 0.600 (1.00) | 0.800 (0.50) |" in lines
    assert "| a | 1 | 0.500 (2.00) | 0.700 | - |" in lines


def test_rescore_rebuilds_each_checkpoint_and_scores_it_as_the_job_did(ft, tmp_path, monkeypatch):
    """--score-dtype: in the job's own dtype, the checkpoint rebuilt from the update log and scored by
    `zostream eval` gets the accuracy and held-out loss the job's in-process evaluation logged (two code
    paths: log replay + the eval command against the trainer's own evaluation), at every evaluated step."""
    import json
    import subprocess
    import sys

    import torch

    from tests.server.conftest import write_tokenizer
    from tests.tiny import make_tiny_model

    monkeypatch.setenv("ZOSTREAM_CACHE_DIR", str(tmp_path / "cache"))
    model = make_tiny_model(tmp_path, "llama", dtype=torch.bfloat16)
    write_tokenizer(model)  # the text "i" is token i
    recs = [
        {"prompt": "3 4 5", "candidates": [" 6", " 9"], "answer": 0},
        {"prompt": "10 20", "candidates": [" 7", " 30"], "answer": 1},
        {"prompt": "2 4", "candidates": [" 6", " 8"], "answer": 0},
        {"prompt": "11 12 13", "candidates": [" 40", " 14"], "answer": 1},
    ]
    data = tmp_path / "choice.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in recs))
    job = tmp_path / "job"
    train = [sys.executable, "-m", "zostream", "train", "--model", str(model), "--method", "lora"]
    train += ["--data", str(data), "--eval", str(data), "--out", str(job), "--steps", "4"]
    train += ["--batch-size", "2", "--eval-every", "4", "--max-len", "16", "--device", "cpu"]
    train += ["--dtype", "bfloat16"]  # on every CPU (auto: float32 on one without bf16 kernels)
    subprocess.run(train, check=True)
    rows = [json.loads(x) for x in (job / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if r.get("type") == "eval"}
    assert sorted(evals) == [0, 4]
    for step, r in evals.items():
        got = ft.rescore(str(model), "lora", job, step, data, "bfloat16")
        assert (got["accuracy"], got["loss"]) == (r["accuracy"], r["loss"]), step
