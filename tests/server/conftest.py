"""Fixtures for the server acceptance tests: a tiny model with a real tokenizer, real servers on loopback.

Servers run either in a thread of the test process (`start_in_thread`, so the tests can look at
`app.engine` / `app.inflight`) or as a subprocess (`python -m zostream serve`), for kill -9 and SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.tiny import make_tiny_model
from zostream.engine.config import CodecConfig, EngineConfig, LimitsConfig
from zostream.server.app import ServerConfig, launch_in_thread, start_in_thread
from zostream.v1 import adapters_pb2_grpc, finetuning_pb2_grpc, generation_pb2_grpc

VOCAB = 101  # tests/tiny.py: vocab_size of the "llama" config
MAX_POSITIONS = 1024  # widened from tiny's 128 so a generation can outlast a 0.5 s deadline
EOS = 99


def write_tokenizer(model_dir: Path) -> None:
    """A WordLevel tokenizer: the text "i" is token i for 1..98; 0 is <pad>, 99 is </s> (EOS), 100 <unk>.

    The special tokens have names that never occur inside a number, so any text of numbers tokenizes
    to exactly those numbers.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{str(i): i for i in range(1, EOS)}, "</s>": EOS, "<unk>": 100}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(model_dir)


def make_model(root: Path, seed: int = 0) -> Path:
    d = make_tiny_model(root, "llama", seed=seed)
    cfg = json.loads((d / "config.json").read_text())
    cfg["max_position_embeddings"] = MAX_POSITIONS  # RoPE has no learned positions: any length works
    (d / "config.json").write_text(json.dumps(cfg))
    write_tokenizer(d)
    return d


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same shapes, other weights: another base fingerprint."""
    return make_model(tmp_path_factory.mktemp("models-other"), seed=1)


def engine_config(
    model: Path, codec: str = "none", cache_dir: Path | None = None, **limits: int
) -> EngineConfig:
    lim = {"max_batch": 8, "max_seq_len": 512, "max_new_tokens": 500, **limits}
    return EngineConfig(
        str(model),
        device="cpu",
        compute_dtype="float32",
        limits=LimitsConfig(**lim),
        codec=CodecConfig(codec, cache_dir=str(cache_dir) if cache_dir else None),
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stubs:
    channel: grpc.Channel
    gen: Any = field(init=False)
    ft: Any = field(init=False)
    ad: Any = field(init=False)
    health: Any = field(init=False)

    def __post_init__(self) -> None:
        self.gen = generation_pb2_grpc.TextGenerationStub(self.channel)
        self.ft = finetuning_pb2_grpc.FineTuningStub(self.channel)
        self.ad = adapters_pb2_grpc.AdaptersStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)


@dataclass
class ThreadServer:
    """A server in a thread of this process: `app` is the live App (engine, inflight, jobs, metrics)."""

    app: Any
    stop: Any
    port: int
    cfg: ServerConfig

    def stubs(self, channel: grpc.Channel | None = None) -> Stubs:
        return Stubs(channel or grpc.insecure_channel(f"127.0.0.1:{self.port}"))


@contextlib.contextmanager
def thread_server(cfg: ServerConfig) -> Iterator[ThreadServer]:
    app, stop = start_in_thread(cfg, timeout=60)
    if app.engine is None:
        stop()
        raise RuntimeError(f"the engine did not start: {app.engine_error}")
    try:
        yield ThreadServer(app, stop, app.bound_port, cfg)
    finally:
        stop()
        app.metrics.close()


@contextlib.contextmanager
def unready_thread_server(cfg: ServerConfig) -> Iterator[tuple[Any, threading.Event, int]]:
    """Like thread_server, but yields as soon as the port is bound: the engine may still be loading.

    Yields (app, ready, port); `ready` is set once health is SERVING.
    """
    ready, stop = launch_in_thread(cfg)
    deadline = time.monotonic() + 30
    while not hasattr(ready, "app"):  # serve() sets ready.app once the port is bound
        assert time.monotonic() < deadline, "the server did not bind its port"
        time.sleep(0.005)
    app = ready.app  # type: ignore[attr-defined]
    try:
        yield app, ready, app.bound_port
    finally:
        ready.wait(30)
        stop()
        app.metrics.close()


def server_config(model: Path, data_dir: Path, **kw: Any) -> ServerConfig:
    eng = kw.pop("engine", None) or engine_config(model)
    return ServerConfig(eng, str(data_dir), port=0, metrics_port=kw.pop("metrics_port", None), **kw)


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadServer]:
    """The module's main server: auth off, /metrics on a free port, a fresh data dir."""
    cfg = server_config(model_dir, tmp_path_factory.mktemp("data"), metrics_port=0)
    with thread_server(cfg) as s:
        yield s


@pytest.fixture(scope="module")
def stubs(server: ThreadServer) -> Iterator[Stubs]:
    s = server.stubs()
    yield s
    s.channel.close()


# ---- subprocess servers ----------------------------------------------------------------------------
@dataclass
class ProcServer:
    """`python -m zostream serve` in a subprocess; its output goes to `log`."""

    proc: subprocess.Popen
    port: int
    log: Path
    channel: grpc.Channel

    def stubs(self) -> Stubs:
        return Stubs(self.channel)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def wait_serving(self, timeout: float = 60.0) -> None:
        wait_serving(self.channel, self.proc, self.output, timeout)

    def kill(self, sig: int) -> int | None:
        """Send sig; for SIGKILL wait for the exit. Returns the exit code if the process ended."""
        self.channel.close()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        if sig == signal.SIGKILL:
            return self.proc.wait(10)
        return None


def start_process(model: Path, data_dir: Path, workdir: Path, *extra: str) -> ProcServer:
    port = free_port()
    log = workdir / f"server-{port}.log"
    cmd = [
        sys.executable,
        "-m",
        "zostream",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
        "--metrics-port",
        "-1",
        "--data-dir",
        str(data_dir),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        *extra,
    ]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=workdir)
    ps = ProcServer(proc, port, log, grpc.insecure_channel(f"127.0.0.1:{port}"))
    try:
        ps.wait_serving()
    except BaseException:
        stop_process(ps)
        raise
    return ps


def stop_process(ps: ProcServer) -> None:
    """Teardown: end the process we started (SIGKILL after a grace period)."""
    ps.channel.close()
    if ps.proc.poll() is None:
        ps.proc.terminate()
        try:
            ps.proc.wait(15)
        except subprocess.TimeoutExpired:
            ps.proc.kill()
            ps.proc.wait(10)


def wait_serving(
    channel: grpc.Channel, proc: subprocess.Popen, output: Callable[[], str], timeout: float
) -> None:
    """Poll the health service until SERVING; RuntimeError with the server's `output()` if the process
    exits first or `timeout` seconds pass."""
    h = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{output()}")
        with contextlib.suppress(grpc.RpcError):
            if (
                h.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                == health_pb2.HealthCheckResponse.SERVING
            ):
                return
        time.sleep(0.05)
    raise RuntimeError(f"server not SERVING after {timeout} s:\n{output()}")
