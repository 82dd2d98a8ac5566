"""Packaging: bitsandbytes is an extra (`zostream[codecs]`), and a codec without it says what to install."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from zostream.engine import codecs

ROOT = Path(__file__).resolve().parents[2]


def test_bitsandbytes_is_an_extra() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("bitsandbytes") for d in project["dependencies"])
    assert any(d.startswith("bitsandbytes") for d in project["optional-dependencies"]["codecs"])


def test_missing_bitsandbytes_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "bitsandbytes.functional", raising=False)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if it were not installed
    with pytest.raises(ModuleNotFoundError) as exc:
        codecs._bnb()
    assert "zostream[codecs]" in str(exc.value) and "--codec none" in str(exc.value)


def test_the_client_imports_without_torch() -> None:
    """The Python client, its errors and the API defaults need grpc and protobuf only."""
    import subprocess

    code = (
        "import sys, zostream.clients.client, zostream.clients.errors, zostream.defaults\n"
        "heavy = [m for m in ('torch', 'transformers', 'numpy', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
