"""bench/gpu_check.sh dry-runs on the emulated device, so the script a GPU machine runs cannot rot:
every stage runs (tiny sizes) and exits 0, and each writes its log under $OUT."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["environment", "pytest-cuda", "register", "generator", "pipeline", "zo", "stream"]


def test_gpu_check_dry_run_on_emu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert [line.split()[0] for line in summary] == STAGES, proc.stdout + proc.stderr
    logs = "\n".join(f"--- {s}\n" + (tmp_path / f"{s}.log").read_text()[-2000:] for s in STAGES)
    assert all(" rc=0 " in line for line in summary), summary + [logs]
    assert proc.returncode == 0, logs
    assert "| file, shared mapping | yes |" in (tmp_path / "register.log").read_text()
    assert "| mutable (H2D + D2H) | registered |" in (tmp_path / "pipeline.log").read_text()
