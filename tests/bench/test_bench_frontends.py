"""Smoke test of bench/frontends.py: a tiny run prints one row per path with finite ratios (timings are
never asserted)."""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import torch

from tests.server.conftest import make_model

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_frontends_quick_prints_every_path(tmp_path: Path, capsys) -> None:
    saved = {n: sys.modules.pop(n) for n in ("common", "frontends") if n in sys.modules}
    sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()
    try:
        bench = importlib.import_module("frontends")
        common = importlib.import_module("common")
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
        assert bench.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(BENCH))
        for n in ("common", "frontends"):
            sys.modules.pop(n, None)
        sys.modules.update(saved)
    rows = common.parse_table(capsys.readouterr().out, "front-end overhead (streamed, greedy)")
    assert [(r["clients"], r["path"]) for r in rows] == [
        (c, p) for c in ("1", "2") for p in ("engine", "grpc", "http-raw", "http")
    ]
    for r in rows:
        assert int(r["tokens"]) == 4 * int(r["clients"])  # every path generated the same tokens
        assert math.isfinite(float(r["vs engine"])) and float(r["vs engine"]) > 0
