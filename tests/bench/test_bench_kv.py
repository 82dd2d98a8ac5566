"""Smoke test of bench/kv.py on the CPU: it runs and prints finite ratios (timings never asserted)."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_kv_bench_prints_its_table(capsys):
    saved = {n: sys.modules.pop(n) for n in ("common", "kv") if n in sys.modules}
    sys.path.insert(0, str(BENCH))
    try:
        kv = importlib.import_module("kv")
        common = importlib.import_module("common")
        assert (
            kv.main(["--shape", "tiny", "--batch", "3", "--contexts", "40", "--reps", "1", "--device", "cpu"])
            == 0
        )
        rows = common.parse_table(capsys.readouterr().out, kv.TITLE)
    finally:
        sys.path.remove(str(BENCH))
        for n in ("common", "kv"):
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    assert len(rows) == 1 and rows[0]["ctx"] == "40"
    for col in ("floor ms", "slot ms", "paged ms", "paged/slot", "paged/floor", "KV GB/s"):
        assert math.isfinite(float(rows[0][col])) and float(rows[0][col]) > 0, col
