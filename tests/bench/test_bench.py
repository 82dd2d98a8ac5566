"""Smoke test of the benches: each runs its --quick settings on the CPU and prints its tables.

Timings are never asserted (a loaded CI machine proves nothing about speed): only that every
expected row is there and every ratio is a finite positive number. The floors and the model
writer are pure and checked against hand-computed values and independent readers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.bench import bench_modules


@pytest.fixture(scope="module")
def bench() -> Iterator[dict[str, ModuleType]]:
    """bench/common.py, stream.py and zo.py, imported as the scripts see each other (by folder)."""
    with bench_modules("common", "stream", "zo") as mods:
        yield mods


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-cache")  # shared: the nf4 cache is encoded once


def _finite_positive(cell: str) -> bool:
    try:
        v = float(cell)
    except ValueError:
        return False
    return math.isfinite(v) and v > 0


def test_stream_quick_prints_every_row_with_finite_ratios(bench, cache, capsys):
    stream, common = bench["stream"], bench["common"]
    assert stream.main(["--quick", "--device", "cpu", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    link = common.parse_table(out, stream.LINK_TITLE)
    assert [r["link"] for r in link] == ["host memcpy"]
    assert _finite_positive(link[0]["H2D GB/s"])
    srows = common.parse_table(out, stream.STREAMER_TITLE)
    assert [(r["shape"], r["codec"]) for r in srows] == [("tiny", "none"), ("tiny", "nf4")]
    # nf4 packs 4 bits + one fp32 absmax per 64 weights: 4.5 / 16 of the bf16 bytes of the matrices.
    none_mb, nf4_mb = (float(r["packed MB/pass"]) for r in srows)
    assert float(srows[1]["dense MB/pass"]) == none_mb
    assert 4.5 / 16 < nf4_mb / none_mb < 4.5 / 16 + 0.01  # + the norms, which travel raw
    assert all(_finite_positive(r["streamer/link"]) for r in srows)
    drows = common.parse_table(out, stream.DECODE_TITLE)
    assert [(r["codec"], r["batch"]) for r in drows] == [
        ("none", "1"),
        ("none", "4"),
        ("nf4", "1"),
        ("nf4", "4"),
    ]
    for r in drows:
        for col in ("streamed tok/s", "resident tok/s", "floor tok/s", "streamed/floor", "streamed/resident"):
            assert _finite_positive(r[col]), (col, r)


def test_zo_quick_prints_every_row_with_finite_ratios(bench, cache, capsys):
    zo, common = bench["zo"], bench["common"]
    assert zo.main(["--quick", "--device", "cpu", "--cache", str(cache)]) == 0
    rows = common.parse_table(capsys.readouterr().out, zo.TITLE)
    assert [(r["method"], r["codec"]) for r in rows] == [
        ("full", "none"),
        ("full", "nf4"),
        ("lora", "none"),
        ("lora", "nf4"),
    ]
    assert rows[1]["streamed s/step"] == zo.REFUSED
    for r in rows[:1] + rows[2:]:
        for col in (
            "streamed s/step",
            "resident s/step",
            "floor s/step",
            "streamed/floor",
            "streamed/resident",
        ):
            assert _finite_positive(r[col]), (col, r)
        assert r["peak MB streamed"] == "-"  # no device memory on the CPU
    assert not list((cache / "jobs").iterdir())  # job dirs (working copies) are cleaned up


def test_floors_match_hand_computed_values(bench):
    c = bench["common"]
    link = c.LinkRates(h2d=50e9, d2h=40e9, both=80e9, kind="test")
    # 1 GB streamed per pass at 50 GB/s: 50 passes/s, 8 tokens per pass.
    assert c.decode_floor_tokens_per_s(8, 50e9, 1_000_000_000) == pytest.approx(400.0)
    # block 0 compute-bound (2 x 30 ms), block 1 H2D-bound (1 GB / 50 GB/s = 20 ms > 2 x 5 ms),
    # block 2 bound by both ways: (1 + 1) GB / 80 GB/s = 25 ms > 1/50 and 1/40 (= 25 ms, tie).
    fwd, h2d, d2h = [0.030, 0.005, 0.001], [0.0, 1e9, 1e9], [0.0, 0.0, 1e9]
    assert c.zo_step_floor(fwd, h2d, d2h, link) == pytest.approx(0.060 + 0.020 + 0.025)
    assert c.zo_step_floor(fwd, h2d, d2h, link, forwards=4) == pytest.approx(0.120 + 0.020 + 0.025)
    assert math.isnan(c.ratio(1.0, 0.0)) and c.ratio(3.0, 2.0) == 1.5


def test_tables_round_trip(bench):
    c = bench["common"]
    text = c.table("t", ["a", "b", "c"], [["x", 1234.5678, None], ["y", float("nan"), 2.5e-7]])
    assert c.parse_table("noise\n" + text + "\nafter", "t") == [
        {"a": "x", "b": "1235", "c": "-"},
        {"a": "y", "b": "-", "c": "2.50e-07"},
    ]


def test_make_model_matches_transformers_layout(bench, cache):
    """Names and shapes as the transformers model of the same config has them, read back with the
    safetensors library; random matrices N(0, 0.02), norms 1, biases 0; the second call is cached."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    c = bench["common"]
    d = c.make_model("tiny-opt", 2, torch.bfloat16, cache)
    assert c.make_model("tiny-opt", 2, torch.bfloat16, cache) == d
    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(c.hf_config("tiny-opt", 2))
    expected = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k != "lm_head.weight"}  # tied
    got: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            got |= {k: sf.get_tensor(k) for k in sf.keys()}  # noqa: SIM118 - safe_open has no __iter__
    assert {k: tuple(v.shape) for k, v in got.items()} == expected
    assert all(v.dtype == torch.bfloat16 for v in got.values())
    fc1 = got["model.decoder.layers.1.fc1.weight"].float()
    assert abs(fc1.std().item() - 0.02) < 0.001 and abs(fc1.mean().item()) < 0.001
    assert torch.equal(
        got["model.decoder.layers.0.final_layer_norm.weight"], torch.ones(256, dtype=torch.bfloat16)
    )
    assert not got["model.decoder.layers.0.fc2.bias"].any()


def test_zo_peer_runs_every_row_on_a_tiny_model(tmp_path, capsys):
    """bench/zo_peer.py end to end on a tiny llama (its rows call the engine's workloads and trainer, whose
    names move: an import that went stale is caught here, not on the next machine that runs the bench)."""
    from tests.tiny import make_tiny_model

    model = make_tiny_model(tmp_path, "llama")
    args = ["--model", str(model), "--batch", "2", "--seq", "8", "--steps", "1", "--threads", "1"]
    with bench_modules("common", "zo_peer") as mods:
        assert mods["zo_peer"].main(args) == 0
    rows = {
        line.split("|")[1].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| ")
    }
    want = {"2 forwards (hf)", "2 forwards (zs)", "zostream full", "peer full", "zostream lora", "peer lora"}
    assert want <= rows


def test_cpu_dtype_prints_each_dtype_and_the_auto_choice(capsys):
    """bench/cpu_dtype.py at its smallest: a row per dtype with a finite positive rate, and the dtype the
    engine's rule picks on this CPU (the rule itself: tests/engine/test_compute_dtype.py)."""
    from zostream.engine import engine_setup as setup

    with bench_modules("cpu_dtype") as mods:
        assert mods["cpu_dtype"].main(["--threads", "1", "--tokens", "8", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line.split("|") for line in out.splitlines() if line.startswith("| ")}
    assert {"float32", "bfloat16", "float16"} <= rows.keys()
    assert all(_finite_positive(rows[d][3].strip()) for d in ("float32", "bfloat16", "float16"))
    want = setup.compute_dtype("auto", torch.bfloat16, "cpu", num_params=134_515_008)
    assert out.rstrip().endswith(str(want))
