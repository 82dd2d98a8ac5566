"""Text output shared by the server commands (jobs, adapters, datasets): enum names, numbers, tables."""

from __future__ import annotations

import sys


def short(enum_name: str) -> str:
    """'JOB_STATUS_RUNNING' -> 'running', 'TUNING_METHOD_LORA' -> 'lora'."""
    for prefix in ("JOB_STATUS_", "TUNING_METHOD_", "ADAPTER_STATUS_", "LR_SCHEDULE_", "NOISE_KIND_"):
        if enum_name.startswith(prefix):
            return enum_name.removeprefix(prefix).lower()
    return enum_name


def num(v: float | None, fmt: str = ".4f") -> str:
    return "-" if v is None else format(v, fmt)


def abs_or_none(v: float | None) -> float | None:
    return None if v is None else abs(v)


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    sys.stdout.flush()
