"""Waiting in tests: poll a condition until it holds, failing with what was awaited."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(cond: Callable[[], object], timeout: float, what: str, interval: float = 0.01) -> None:
    """Return once cond() is truthy; an AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(interval)
