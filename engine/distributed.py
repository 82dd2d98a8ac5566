"""Data-parallel ZO fine-tuning over torch.distributed (docs/SCALE_OUT.md): the scalar control plane.

Every rank holds the whole model, draws the same step seeds and applies the same updates; ranks never
exchange tensors of the model, only a few float64 scalars per step. Per step t, on every rank:

  1. rank r of W runs its slice [r*B/W, (r+1)*B/W) of batch_order(n, B, seed, t), cut into micro-batches
     (trainer.ZOTrainer.batches), through the 2q perturbed forwards of one pass;
  2. `reduce_losses`: all_gather of [m*(2q+1) + 1] float64 per rank, i.e. per micro-batch the 2q NLL sums and
     its token count, plus the rank's stop flag (8 * (2q+2) = 32 bytes for q = 1 and one micro-batch);
  3. every rank reduces the gathered rows in rank order (workloads.reduce_partials): bitwise the value a
     process with the same micro_batch computes, so every rank logs the identical record;
  4. every `verify_every` steps, `verify_log` all_gathers a sha256 of each rank's update log (32 bytes) and
     every rank raises DistributedError if any differs from rank 0's.

all_gather rather than all_reduce: all_reduce's summation order is up to the backend, all_gather's rows come
back in rank order and each rank sums them itself, left to right. gloo carries the scalars even when the
model runs on GPUs: there is nothing for NCCL to move, and a gloo collective with a dead or silent peer
returns an error (connection reset at once, or the timeout) that is caught and explained here, where an NCCL
watchdog would abort the process. Steps run in a group with the short `timeout_s`; joining and `sync_log`
use the default group with `startup_timeout_s`, since ranks may load a large model at different speeds.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .update_log import UpdateLog

ENV_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
DIGEST_BYTES = 32  # sha256
_PEER_GONE = ("Connection reset", "Connection closed", "Broken pipe", "closed by peer")
T = TypeVar("T")


class DistributedError(RuntimeError):
    """A peer died, stopped answering, or computes something else; the message says what to do."""


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """The torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT[, LOCAL_RANK]), or None when it is
    not all there; ValueError naming the variable when a value is malformed."""
    env = os.environ if environ is None else environ
    if not all(env.get(k) for k in ENV_VARS):
        return None
    vals: dict[str, int] = {}
    for k in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"):
        try:
            vals[k] = int(env.get(k, env["RANK"] if k == "LOCAL_RANK" else ""))
        except ValueError:
            raise ValueError(f"{k}={env.get(k)!r} is not an integer (set by torchrun)") from None
    if not 0 <= vals["RANK"] < vals["WORLD_SIZE"]:
        raise ValueError(f"RANK={vals['RANK']} must be in 0..WORLD_SIZE-1 (WORLD_SIZE={vals['WORLD_SIZE']})")
    return LaunchEnv(
        vals["RANK"], vals["WORLD_SIZE"], vals["LOCAL_RANK"], env["MASTER_ADDR"], vals["MASTER_PORT"]
    )


def rank_dir(job_dir: str | os.PathLike[str], rank: int) -> Path:
    """Rank 0 owns the job directory; rank r > 0 keeps its own update log (and working copy) in rank-<r>/."""
    return Path(job_dir) if rank == 0 else Path(job_dir) / f"rank-{rank}"


def micro_per_rank(batch_size: int, micro_batch: int, world_size: int) -> int:
    """Micro-batches each rank runs per step; ValueError unless the batch splits evenly over the ranks."""
    if batch_size % micro_batch or (batch_size // micro_batch) % world_size:
        raise ValueError(
            f"batch_size: {batch_size} examples per step do not split into {world_size} ranks x whole "
            f"micro-batches of {micro_batch}; use a multiple of {world_size * micro_batch}"
        )
    return batch_size // micro_batch // world_size


class Distributed:
    """This rank's membership in a data-parallel job: collectives with bounded waits and a payload counter."""

    def __init__(
        self,
        env: LaunchEnv,
        timeout_s: float = 60.0,
        startup_timeout_s: float = 600.0,
        verify_every: int = 50,
    ) -> None:
        if timeout_s <= 0 or startup_timeout_s <= 0 or verify_every < 1:
            raise ValueError("timeout_s and startup_timeout_s must be > 0 seconds, verify_every >= 1 step")
        self.rank, self.world_size = env.rank, env.world_size
        self.timeout_s, self.verify_every = float(timeout_s), verify_every
        self.stop_requested = False  # set by the owner (Ctrl-C); gathered with every step's losses
        self.stop_agreed = False  # some rank asked to stop: every rank stops after the same step
        self.payload_bytes = 0  # bytes this rank contributed to collectives since the job started
        self.step_bytes = 0  # of which, per step: the loss gather
        self.steps = 0
        try:
            # env:// reads MASTER_ADDR/PORT from os.environ and honours torchrun's agent-hosted store.
            dist.init_process_group(
                "gloo",
                init_method="env://",
                rank=env.rank,
                world_size=env.world_size,
                timeout=datetime.timedelta(seconds=startup_timeout_s),
            )
            # The steps' own group: its short timeout bounds how long a rank waits for a silent peer.
            step_timeout = datetime.timedelta(seconds=timeout_s)
            self.group = dist.new_group(list(range(self.world_size)), timeout=step_timeout)
        except (RuntimeError, ValueError) as e:  # DistStoreError / DistNetworkError are RuntimeErrors
            raise DistributedError(
                f"rank {env.rank}/{env.world_size}: cannot join the job at {env.master_addr}:"
                f"{env.master_port} within {startup_timeout_s:g} s ({_first_line(e)}); start every rank with "
                "the same torchrun --rdzv-endpoint / MASTER_ADDR:MASTER_PORT"
            ) from None

    def close(self) -> None:
        if dist.is_initialized():
            with contextlib.suppress(RuntimeError):  # a dead peer: nothing left to tear down cleanly
                dist.destroy_process_group()

    # ---- per step -------------------------------------------------------------------------------
    def reduce_losses(self, rows: torch.Tensor, step: int) -> torch.Tensor:
        """This rank's partials [m, 2q+1] float64 -> every rank's, in rank order [W*m, 2q+1]; also agrees
        on stopping (stop_agreed). The trainer's `reducer`."""
        m, k = rows.shape
        flag = torch.tensor([1.0 if self.stop_requested else 0.0], dtype=torch.float64)
        local = torch.cat([rows.detach().to("cpu", torch.float64).reshape(-1), flag])  # [m*k + 1]
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        self._call(lambda: dist.all_gather(out, local, group=self.group), "the loss exchange", step)
        self.step_bytes = local.numel() * local.element_size()
        self.payload_bytes += self.step_bytes
        self.steps += 1
        self.stop_agreed = any(float(o[-1]) != 0.0 for o in out)
        return torch.cat([o[:-1].reshape(m, k) for o in out])

    def verify_log(self, path: str | os.PathLike[str], step: int, force: bool = False) -> None:
        """Every verify_every steps (or when forced): every rank's update log must hash like rank 0's."""
        if not force and step % self.verify_every:
            return
        data = Path(path).read_bytes() if Path(path).exists() else b""  # a new job: no log yet on any rank
        mine = torch.frombuffer(bytearray(hashlib.sha256(data).digest()), dtype=torch.uint8)
        out = [torch.empty_like(mine) for _ in range(self.world_size)]
        self._call(lambda: dist.all_gather(out, mine, group=self.group), "the update-log check", step)
        self.payload_bytes += DIGEST_BYTES
        bad = [r for r, d in enumerate(out) if not torch.equal(d, out[0])]
        if bad:
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: the update logs diverged by step {step}: rank(s) "
                f"{', '.join(map(str, bad))} hold a log whose sha256 differs from rank 0's, so the ranks no "
                "longer apply the same updates (different data, model files, code or device kinds?). "
                "Rank 0's JOBDIR/update.log is the job's record; fix the setup, remove the rank-<r>/ "
                "directories and relaunch"
            )

    # ---- startup --------------------------------------------------------------------------------
    def sync_log(self, path: str | os.PathLike[str]) -> int:
        """Before the trainer opens it: make this rank's update log the longest rank's (a rank killed
        mid-step may be a step behind or ahead of the others, or have none yet); returns its size in bytes.

        Every log must be a byte prefix of the longest one; anything else raises DistributedError.
        """
        path = Path(path)
        mine = b""
        if path.exists():
            UpdateLog.open(path).close()  # repairs a torn tail: whole steps only
            mine = path.read_bytes()
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        size = torch.tensor([len(mine)], dtype=torch.int64)
        self._call(lambda: dist.all_gather(sizes, size), "the update-log sync", None)
        n = [int(s) for s in sizes]
        if len(set(n)) == 1:
            self.verify_log(path, 0, force=True)
            return len(mine)
        leader = n.index(max(n))
        blob = torch.frombuffer(bytearray(mine.ljust(max(n), b"\0")), dtype=torch.uint8)
        self._call(lambda: dist.broadcast(blob, src=leader), "the update-log sync", None)
        self.payload_bytes += 16 + (blob.numel() if self.rank == leader else 0)
        best = blob.numpy().tobytes()
        if best[: len(mine)] != mine:
            raise DistributedError(
                f"rank {self.rank}/{self.world_size}: {path} is not a prefix of rank {leader}'s update log: "
                "the two belong to different jobs or diverged. Rank 0's JOBDIR/update.log is the job's "
                "record; remove the other ranks' rank-<r>/ directories and relaunch"
            )
        if len(best) > len(mine):
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as f:
                f.write(best[len(mine) :])
                f.flush()
                os.fsync(f.fileno())
        self.verify_log(path, 0, force=True)
        return len(best)

    # ---- errors ---------------------------------------------------------------------------------
    def _call(self, fn: Callable[[], T], what: str, step: int | None) -> T:
        try:
            return fn()
        except RuntimeError as e:  # gloo: connection reset / closed, or its timeout
            raise DistributedError(self.explain(e, what, step)) from None

    def explain(self, e: BaseException, what: str, step: int | None) -> str:
        text = str(e)
        if "Timed out" in text or "timeout" in text.lower():
            why = f"no answer within the {self.timeout_s:g} s timeout"
        elif any(s in text for s in _PEER_GONE):
            why = "its connection closed: the process died"
        else:
            why = _first_line(e)
        who = f"rank {1 - self.rank}" if self.world_size == 2 else "a peer rank"
        at = "at startup" if step is None else f"at step {step}"
        logged = ""
        if step is not None:
            logged = f" (its update log holds steps 0..{step - 1})" if step else " (no step logged yet)"
        return (
            f"rank {self.rank}/{self.world_size}: {who} stopped answering during {what} {at} ({why}); the "
            f"job stopped{logged} and resumes from its last logged step when every rank is relaunched with "
            "the same command"
        )


def attach(trainer: Any, d: Distributed) -> None:
    """Make `trainer` run this rank's slice of every batch and gather the losses through `d`."""
    cfg = trainer.cfg
    micro_per_rank(cfg.batch_size, cfg.micro_batch_size, d.world_size)
    trainer.shard = (d.rank, d.world_size)
    trainer.reducer = d.reduce_losses


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0][:300] if lines else type(e).__name__
