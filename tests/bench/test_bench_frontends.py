"""Smoke test of bench/frontends.py: a tiny run prints one row per path with finite ratios (timings are
never asserted)."""

from __future__ import annotations

import math
from pathlib import Path

from tests.bench import bench_modules
from tests.server.conftest import make_model


def test_frontends_quick_prints_every_path(tmp_path: Path, capsys) -> None:
    model = make_model(tmp_path / "m")
    argv = [
        "--model",
        str(model),
        "--clients",
        "1,2",
        "--requests",
        "1",
        "--new-tokens",
        "4",
        "--rounds",
        "1",
    ]
    with bench_modules("common", "frontends") as mods:
        common = mods["common"]
        assert mods["frontends"].main(argv) == 0
    rows = common.parse_table(capsys.readouterr().out, "front-end overhead (streamed, greedy)")
    assert [(r["clients"], r["path"]) for r in rows] == [
        (c, p) for c in ("1", "2") for p in ("engine", "grpc", "http-raw", "http")
    ]
    for r in rows:
        assert int(r["tokens"]) == 4 * int(r["clients"])  # every path generated the same tokens
        assert math.isfinite(float(r["vs engine"])) and float(r["vs engine"]) > 0
