"""Smoke test of bench/kv.py on the CPU: it runs and prints finite ratios (timings never asserted)."""

from __future__ import annotations

import math

import pytest

from tests.bench import bench_modules


def test_kv_bench_prints_its_table(capsys):
    with bench_modules("common", "kv") as mods:
        kv, common = mods["kv"], mods["common"]
        assert (
            kv.main(["--shape", "tiny", "--batch", "3", "--contexts", "40", "--reps", "1", "--device", "cpu"])
            == 0
        )
        rows = common.parse_table(capsys.readouterr().out, kv.TITLE)
    assert len(rows) == 1 and rows[0]["ctx"] == "40"
    for col in ("floor ms", "slot ms", "paged ms", "paged/slot", "paged/floor", "KV GB/s"):
        assert math.isfinite(float(rows[0][col])) and float(rows[0][col]) > 0, col


def test_stream_kv_offload_rows(capsys, tmp_path):
    with bench_modules("common", "stream") as mods:
        stream, common = mods["stream"], mods["common"]
        argv = ["--quick", "--device", "cpu", "--codecs", "none", "--kv-offload", "--cache", str(tmp_path)]
        assert stream.main(argv) == 0
        rows = common.parse_table(capsys.readouterr().out, stream.KV_TITLE)
    assert [r["batch"] for r in rows] == ["1", "4"] and {r["device"] for r in rows} == {"emu"}
    for r in rows:
        for col in ("offload tok/s", "weights MB/pass", "KV up MB/pass", "KV down MB/pass", "floor tok/s"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, col
    # a decode pass writes back one new row per sequence: 4 rows are 4x one row
    assert float(rows[1]["KV down MB/pass"]) == pytest.approx(4 * float(rows[0]["KV down MB/pass"]), rel=0.01)
