"""Property-based fuzzing of every RPC (stress/fuzz.py): random and boundary messages, corrupt wire
bytes, invalid UTF-8, hostile names and ids, oversized uploads. Every answer's status is one the RPC
documents (never INTERNAL / UNKNOWN), no error message names a server path, the server stays SERVING
with unchanged greedy output, and no file outside the data dir is written (a Python audit hook sees
every open, rename and delete of the server's threads).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from stress import fuzz

_AUDIT: list[fuzz.Audit] = []  # sys.addaudithook cannot be undone: one hook for the session


def audit() -> fuzz.Audit:
    if not _AUDIT:
        _AUDIT.append(fuzz.Audit())
    return _AUDIT[0]


def check(fig: dict, n: int) -> None:
    assert fig["failures"] == 0, fig["failure_examples"]
    assert fig["internal_or_unknown"] == 0
    assert fig["requests"] >= n
    assert set(fig["rpcs_covered"]) == set(fuzz.METHODS), set(fuzz.METHODS) - set(fig["rpcs_covered"])
    assert fig["serving_after"] and fig["engine_alive_after"] and fig["greedy_unchanged"]
    assert fig["writes_outside_data_dir"] == [] and fig["reads_outside_allowed"] == []
    assert fig["new_files_next_to_data_dir"] == []
    assert fig["files_written"] > 0  # the audit hook did see the server's writes
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= set(fig["codes"])
    assert fig["ok"]


def test_fuzz_short(tmp_path: Path) -> None:
    fig = fuzz.run(500, seed=7, workdir=tmp_path, audit=audit())
    check(fig, 500)


@pytest.mark.slow
def test_fuzz_10000(tmp_path: Path) -> None:
    fig = fuzz.run(10_000, seed=0, workdir=tmp_path, audit=audit())
    check(fig, 10_000)
    assert fig["codes"].get("RESOURCE_EXHAUSTED", 0) > 0  # oversized uploads were sent and refused
    assert fig["jobs_created"] > 0 and fig["datasets_uploaded"] > 0 and fig["adapters_imported"] > 0
