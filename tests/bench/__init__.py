"""Smoke tests of the benches. `bench_modules` imports bench scripts as they see each other (by folder)."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"


@contextlib.contextmanager
def bench_modules(*names: str) -> Iterator[dict[str, ModuleType]]:
    """bench/<name>.py for each name, imported fresh with bench/ on sys.path; on leaving, the path, the
    modules of those names the tests had before and torch's thread count (benches set it) come back."""
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, str(BENCH))
    threads = torch.get_num_threads()
    try:
        yield {n: importlib.import_module(n) for n in names}
    finally:
        torch.set_num_threads(threads)
        sys.path.remove(str(BENCH))
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)
