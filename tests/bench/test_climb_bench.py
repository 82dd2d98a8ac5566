"""bench/climb.py: the slow-climb rule replayed over finished jobs' losses (update.log or metrics.jsonl)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.engine.test_climb import CLIMB, TRIPS
from zostream.engine.update_log import UpdateLog
from zostream.engine.update_log_format import LogHeader, Step

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "climb.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_climb", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reads_both_sources_and_prints_the_first_trip(tmp_path: Path, capsys) -> None:
    bench = load()
    old = tmp_path / "old"  # a job from before losses were logged: metrics.jsonl only (one skipped step)
    old.mkdir()
    rows = [{"type": "eval", "step": 0, "loss": 9.0}]
    rows += [{"type": "step", "step": t, "loss": x, "skipped": None} for t, x in enumerate(CLIMB)]
    rows.insert(3, {"type": "step", "step": 99, "loss": 50.0, "skipped": "non-finite loss"})
    (old / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + '\n{"type": "st')
    new = tmp_path / "new"  # a format 3 log: the losses are in it
    new.mkdir()
    header = LogHeader("sha256:x", {"kind": "full"}, "gaussian", 1, "float32", "nearest", 1e-3, 0.0, [], 0)
    with UpdateLog.create(new / "update.log", header, loss=True) as log:
        for t, x in enumerate(CLIMB):
            log.append(Step(t, 1e-3, (1.0,), loss=x))
    assert bench.job_losses(old) == bench.job_losses(new) == CLIMB
    assert bench.main([str(old), str(new), "--grid", "2:0.5,2:100"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "job | steps | loss first 20 -> last 20 | w2 r0.5 | w2 r100"
    assert out[2].startswith("old | 16 |") and out[2].endswith(f"| first {TRIPS[0]} (2) | -")
    assert out[3].startswith("new | 16 |") and out[3].endswith(f"| first {TRIPS[0]} (2) | -")
