"""Fixtures of the reliability tests: the server tests' tiny model, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from stress.common import tiny_model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("stress-models"))
