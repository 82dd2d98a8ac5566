"""Shared pieces of the stress drivers: the tiny model, a server subprocess (stress.serve) with its RSS,
stubs, percentiles, and the JSON + markdown report every driver prints."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from tests.server.conftest import Stubs, free_port, make_model, wait_serving

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(root: Path) -> Path:
    """The server tests' tiny Llama (3 layers, hidden 32, vocab 101) with a WordLevel tokenizer:
    the text "i" is token i for 1..98 (tests/server/conftest.py)."""
    d = root / "tiny-llama"
    return d if (d / "config.json").exists() else make_model(root)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc), 0 when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class ServerProc:
    """`python -m stress.serve` in a subprocess (output in `log`): kill -9 it, restart it, read its RSS."""

    model: Path
    data_dir: Path
    log_dir: Path
    extra: tuple[str, ...] = ()
    port: int = 0
    proc: subprocess.Popen | None = None
    channel: grpc.Channel | None = None
    starts: int = 0
    log: Path = field(init=False)

    def start(
        self, fault: str | None = None, timeout: float = 120.0, wait: bool = True, only_job: str | None = None
    ) -> ServerProc:
        self.port = free_port()
        self.starts += 1
        self.log = self.log_dir / f"server-{self.starts:03d}.log"
        cmd = [
            sys.executable,
            "-m",
            "stress.serve",
            "--model",
            str(self.model),
            "--data-dir",
            str(self.data_dir),
            "--port",
            str(self.port),
            *self.extra,
            *(["--fault", fault] if fault else []),
            *(["--only-job", only_job] if only_job else []),
        ]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        if wait:
            self.wait_serving(timeout)
        return self

    def stubs(self) -> Stubs:
        assert self.channel is not None
        return Stubs(self.channel)

    def output(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_serving(self, timeout: float = 120.0) -> None:
        assert self.channel is not None and self.proc is not None
        wait_serving(self.channel, self.proc, self.output, timeout)

    def rss(self) -> int:
        return rss_bytes(self.proc.pid) if self.alive() else 0  # type: ignore[union-attr]

    def wait_exit(self, timeout: float) -> int | None:
        """The exit code, or None if it still runs after `timeout` seconds."""
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill9(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        rc = self.proc.wait(30)
        self._close()
        return rc

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (drain), SIGKILL after `timeout`; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._close()
        return self.proc.returncode

    def _close(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None


# ---- figures ------------------------------------------------------------------------------------------
def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) samples, in value units per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mv = sum(v for _, v in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return 0.0 if var == 0 else 60 * sum((t - mt) * (v - mv) for t, v in samples) / var


def fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def markdown_table(rows: list[tuple[str, Any]], head: tuple[str, str] = ("figure", "value")) -> str:
    out = [f"| {head[0]} | {head[1]} |", "|---|---|"]
    out += [f"| {k} | {fmt(v)} |" for k, v in rows]
    return "\n".join(out)


def report(figures: dict[str, Any], markdown: str, json_out: str | None) -> None:
    """Print the figures as JSON, then the markdown summary; optionally also write the JSON to a file."""
    text = json.dumps(figures, indent=2, sort_keys=True, default=str)
    if json_out:
        Path(json_out).write_text(text + "\n")
    print(text)
    print()
    print(markdown)
