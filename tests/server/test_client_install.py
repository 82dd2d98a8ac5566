"""A client-only install: `pip install zostream` brings gRPC and protobuf, not torch (pyproject.toml's base
dependencies); the engine is the `engine` extra.

The wheel is built from this checkout and installed without dependencies into a fresh virtual environment;
its gRPC / protobuf packages are this environment's, linked in one by one (no torch, numpy or transformers
among them: offline and fast). From there the Python client and the `zostream` CLI talk to a live server,
and a command that runs the model locally says what to install.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests.server.conftest import ThreadServer

ROOT = Path(__file__).resolve().parents[2]
CLIENT_DEPS = {"grpcio", "grpcio-health-checking", "grpcio-status", "protobuf"}
# What those need at import time, linked from this environment's site-packages.
LINKED = ("grpc", "grpc_status", "grpc_health", "google", "typing_extensions.py")
ENGINE = ("torch", "transformers", "numpy", "safetensors", "tokenizers", "numba", "prometheus_client")


def test_base_dependencies_are_the_client_only() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip() for d in project["dependencies"]}
    assert names == CLIENT_DEPS
    engine = " ".join(project["optional-dependencies"]["engine"])
    assert all(m.replace("_", "-") in engine for m in ENGINE)
    assert "zostream[engine]" in project["optional-dependencies"]["dev"]


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("client-install")
    wheels = tmp / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(ROOT)]
    subprocess.run(build, check=True, timeout=600, cwd=tmp)
    (whl,) = wheels.glob("zostream-*.whl")
    with zipfile.ZipFile(whl) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        reqs = [
            ln.split(":", 1)[1].strip()
            for ln in z.read(meta).decode().splitlines()
            if ln.startswith("Requires-Dist:")
        ]
    base = {
        r.split(">")[0].split("=")[0].split("<")[0].split(";")[0].strip() for r in reqs if "extra ==" not in r
    }
    assert base == CLIENT_DEPS, reqs
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(py), "install", "--no-deps", "--no-index", str(whl)], check=True, timeout=300
    )
    shim = tmp / "linked"
    shim.mkdir()
    here = Path(sysconfig.get_paths()["purelib"])
    for name in LINKED:
        (shim / name).symlink_to(here / name)
    site = subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        env=_env(),
    ).stdout.strip()
    (Path(site) / "client-deps.pth").write_text(f"{shim}\n")
    return venv


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        list(argv), capture_output=True, text=True, timeout=120, env=_env(), cwd=cwd, check=False
    )


def test_client_only_install_talks_to_a_server(
    client_venv: Path, server: ThreadServer, tmp_path: Path
) -> None:
    py, cli = str(client_venv / "bin" / "python"), str(client_venv / "bin" / "zostream")
    probe = f"import importlib.util as u; print([m for m in {ENGINE!r} if u.find_spec(m)])"
    res = _run(py, "-c", probe, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr  # no engine module is installed
    addr = f"127.0.0.1:{server.port}"
    code = (
        "from zostream.clients.client import ZostreamClient\n"
        f"with ZostreamClient({addr!r}) as c:\n"
        "    r = c.generate(token_ids=[5, 17, 3], max_new_tokens=4)\n"
        "    print(len(r.token_ids), c.model_info()['base_fingerprint'] != '')\n"
    )
    res = _run(py, "-c", code, cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.split() == ["4", "True"], res.stderr
    res = _run(cli, "jobs", "list", "--server", addr, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = _run(cli, "train", "--model", "m", "--data", "d", "--method", "lora", "--out", "o", cwd=tmp_path)
    assert res.returncode == 1 and "pip install 'zostream[engine]'" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr
