"""Smoke test of bench/kv.py on the CPU: it runs and prints finite ratios (timings never asserted)."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
import torch

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


def test_stream_kv_offload_rows(capsys, tmp_path):
    saved = {n: sys.modules.pop(n) for n in ("common", "stream") if n in sys.modules}
    sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()
    try:
        stream = importlib.import_module("stream")
        common = importlib.import_module("common")
        argv = ["--quick", "--device", "cpu", "--codecs", "none", "--kv-offload", "--cache", str(tmp_path)]
        assert stream.main(argv) == 0
        rows = common.parse_table(capsys.readouterr().out, stream.KV_TITLE)
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(BENCH))
        for n in ("common", "stream"):
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    assert [r["batch"] for r in rows] == ["1", "4"] and {r["device"] for r in rows} == {"emu"}
    for r in rows:
        for col in ("offload tok/s", "weights MB/pass", "KV up MB/pass", "KV down MB/pass", "floor tok/s"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, col
    # a decode pass writes back one new row per sequence: 4 rows are 4x one row
    assert float(rows[1]["KV down MB/pass"]) == pytest.approx(4 * float(rows[0]["KV down MB/pass"]), rel=0.01)
