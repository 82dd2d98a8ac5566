"""How `zostream train` runs under torchrun (docs/SCALE_OUT.md): the launch environment, each rank's
device, and the micro-batch that keeps a job's update log the same on any number of ranks."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from zostream.clients.cli import UsageError


def env_of(args: argparse.Namespace) -> Any:
    """torchrun's environment when --distributed is given or the variables are set; None: one process."""
    from zostream.engine.distributed import launch_env

    try:
        env = launch_env()
    except ValueError as exc:
        raise UsageError(f"--distributed: {exc}") from None
    if args.distributed and env is None:
        raise UsageError(
            "--distributed: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are not set; launch every rank "
            "with torchrun, e.g. `torchrun --nproc-per-node 2 --no-python zostream train ...` "
            "(docs/SCALE_OUT.md)"
        )
    return env


def rank_device(args: argparse.Namespace, local_rank: int) -> None:
    """Under torchrun, --device auto / cuda means this rank's GPU: cuda:LOCAL_RANK."""
    import torch

    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        args.device = f"cuda:{local_rank}"


def micro_batch(args: argparse.Namespace, cfg: Any, world: int, log_path: Path) -> Any:
    """cfg with its micro-batch: --micro-batch; else the job's own when resuming (so a relaunch on another
    number of ranks continues the same job bitwise); else --batch-size / ranks under torchrun."""
    from zostream.engine.distributed import micro_per_rank
    from zostream.engine.update_log import read_header
    from zostream.engine.update_log_format import LogCorruptError

    mb = args.micro_batch
    if mb is None and log_path.exists():
        with contextlib.suppress(LogCorruptError, OSError):  # resume_config reports a bad log
            extra = read_header(log_path).extra
            if extra.get("batch_size") == cfg.batch_size:  # else resume_config names --batch-size
                mb = int(extra.get("micro_batch", cfg.batch_size))
    if mb is None and world > 1:
        if cfg.batch_size % world:
            raise UsageError(
                f"--batch-size: the global batch of {cfg.batch_size} examples does not split over {world} "
                f"ranks; use a multiple of {world}"
            )
        mb = cfg.batch_size // world
    if mb is None:
        return cfg
    try:
        micro_per_rank(cfg.batch_size, mb, world)
        return dataclasses.replace(cfg, micro_batch=mb)
    except ValueError as exc:
        what = str(exc).removeprefix("batch_size: ").removeprefix("micro_batch: ")
        raise UsageError(f"--micro-batch: {what}") from None
