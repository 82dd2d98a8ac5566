"""Fixtures shared by the engine's trainer-side tests: tiny model directories built once per module (the
one_thread fixture is tests/conftest.py's)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.engine.test_trainer import model_factory


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    return model_factory(tmp_path_factory.mktemp("models"))
