"""Fixtures shared by the engine's trainer-side tests: tiny model directories built once per module, and
one torch thread for the modules that ask for it (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from tests.engine.test_trainer import model_factory


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    return model_factory(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: thread fan-out only costs time (and thrashes on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
