"""The server launcher of the stress drivers: every ServerConfig knob, a fixed torch thread count, and
optional fault injection that SIGKILLs the process at a chosen point of a fine-tuning job.

    python -m stress.serve --model DIR --data-dir DIR --port N [--fault KIND:ARGS] ...

Faults are installed from outside by patching engine functions before the server starts: nothing in
engine/ or server/ knows about them. Steps are 0-based step indices unless said otherwise.

    log_write:S     step S's records are written to update.log but not fsync'd, then SIGKILL
    log_torn:S      only part of step S's records is written (a torn tail), then SIGKILL
    pass:S:B        the pass of step S reaches block B (ZO2: blocks < B hold step S-1's update, the rest not)
    apply:S:K       half-way through the K-th group update that applies step S (half its tensors written)
    event_torn:N    half of the "step" event line for N steps done is written to events.jsonl
    checkpoint:K    the K-th LoRA checkpoint is half written (in its .tmp directory, before the rename)
    export          the job's export is half written (in its .tmp directory, before the rename)

`--only-job ID` leaves every other queued job queued (stress/faults.py: the kill rounds of one job do not
let the next one run ahead).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import sys
from pathlib import Path
from typing import Any

FAULT_KINDS = ("log_write", "log_torn", "pass", "apply", "event_torn", "checkpoint", "export")


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _cut_largest(directory: Path) -> None:
    """Leave the largest file of a half-written output directory half written."""
    files = sorted((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    if files:
        with open(files[-1], "r+b") as f:
            f.truncate(files[-1].stat().st_size // 2)


def install_fault(spec: str) -> None:
    """Arm one fault (see the module docstring); the process SIGKILLs itself when it is reached."""
    kind, _, rest = spec.partition(":")
    if kind not in FAULT_KINDS:
        raise SystemExit(f"--fault {spec}: kind must be one of {', '.join(FAULT_KINDS)}")
    args = [int(x) for x in rest.split(":") if x]
    from zostream.engine import jobs, trainer, update_log
    from zostream.engine.peft import LoraAdapter
    from zostream.engine.update_log_format import MAGIC, RECORD_SIZE, RECORD_SIZE_LOSS
    from zostream.engine.working_copy import WorkingCopy

    if kind in ("log_write", "log_torn"):
        write_all = update_log._write_all

        def write_records(fd: int, data: bytes) -> None:
            sizes = (RECORD_SIZE, RECORD_SIZE_LOSS)  # a step's q records, with or without its loss
            is_records = not data.startswith(MAGIC) and any(len(data) % n == 0 for n in sizes)
            if is_records and struct.unpack_from("<I", data)[0] == args[0]:
                write_all(fd, data if kind == "log_write" else data[: len(data) // 2 + 3])
                _die()
            write_all(fd, data)

        update_log._write_all = write_records
    elif kind == "pass":
        block = trainer.ZOStepWorkload.block

        def block_at(self: Any, i: int, w: dict) -> None:
            if (self.step, i) == (args[0], args[1]):
                _die()
            block(self, i, w)

        trainer.ZOStepWorkload.block = block_at
    elif kind == "apply":
        apply_step, seen = trainer.apply_step, [0]

        def apply_half(tensors: dict, step: Any, header: Any) -> None:
            if step.step == args[0]:
                seen[0] += 1
                if seen[0] == args[1]:
                    names = sorted(tensors)
                    apply_step({n: tensors[n] for n in names[: (len(names) + 1) // 2]}, step, header)
                    _die()
            apply_step(tensors, step, header)

        trainer.apply_step = apply_half
    elif kind == "event_torn":
        event = jobs.JobStore.event

        def torn_event(self: Any, job_id: str, type_: str, message: str = "", step: int = 0, metrics=None):
            if type_ == "step" and step == args[0]:
                line = json.dumps({"id": 10**6, "job_id": job_id, "type": type_, "message": "torn"}).encode()
                with open(self.job_dir(job_id) / "events.jsonl", "ab") as f:
                    f.write(line[: len(line) // 2])
                _die()
            return event(self, job_id, type_, message, step, metrics)

        jobs.JobStore.event = torn_event
    elif kind == "checkpoint" or kind == "export":
        save_peft, seen = LoraAdapter.save_peft, [0]

        def save_then_cut(self: Any, out_dir: Any, base_model: str = "") -> Path:
            name = Path(out_dir).name
            ckpt = name.startswith("step-") and name.endswith(".tmp")
            if kind == "checkpoint" and ckpt:
                seen[0] += 1
            out = save_peft(self, out_dir, base_model)
            if (kind == "checkpoint" and ckpt and seen[0] == args[0]) or (
                kind == "export" and name == "adapter.tmp"
            ):
                _cut_largest(Path(out_dir))
                _die()
            return out

        def export_half(self: Any, out_dir: Any) -> Path:
            tmp = Path(out_dir).with_name(Path(out_dir).name + ".tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            data = (self.dir / "model.safetensors").read_bytes()
            (tmp / "model.safetensors").write_bytes(data[: len(data) // 2])
            _die()
            return tmp  # pragma: no cover

        LoraAdapter.save_peft = save_then_cut
        if kind == "export":
            WorkingCopy.export = export_half


def only_job(job_id: str) -> None:
    """Start no queued job but `job_id` (the others stay queued, untouched)."""
    from zostream.engine.job_runner import JobRunner

    start = JobRunner._start

    def start_only(self: Any, rec: Any) -> None:
        if rec.id == job_id:
            start(self, rec)

    JobRunner._start = start_only


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m stress.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--metrics-port", type=int, default=-1, help="-1: no /metrics")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--codec", default="none")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--max-waiting", type=int, default=256)
    p.add_argument("--max-inflight", type=int, default=256)
    p.add_argument("--api-key", default=None)
    p.add_argument("--tls-cert", default=None)
    p.add_argument("--tls-key", default=None)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (equal across runs compared bitwise)"
    )
    p.add_argument("--fault", default=None, help="KIND:ARGS, see the module docstring")
    p.add_argument("--only-job", default=None, help="start no queued job but this one")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    from zostream.engine.config import CodecConfig, EngineConfig, LimitsConfig
    from zostream.server.app import ServerConfig, run_forever

    if a.fault:
        install_fault(a.fault)
    if a.only_job:
        only_job(a.only_job)
    limits = LimitsConfig(
        max_batch=a.max_batch,
        max_seq_len=a.max_seq_len,
        max_new_tokens=a.max_new_tokens,
        max_waiting=a.max_waiting,
    )
    engine = EngineConfig(
        a.model, device=a.device, compute_dtype=a.dtype, codec=CodecConfig(a.codec), limits=limits
    )
    run_forever(
        ServerConfig(
            engine,
            a.data_dir,
            port=a.port,
            host=a.host,
            metrics_port=None if a.metrics_port < 0 else a.metrics_port,
            api_key=a.api_key,
            tls_cert=a.tls_cert,
            tls_key=a.tls_key,
            max_inflight=a.max_inflight,
        )
    )


if __name__ == "__main__":
    main()
