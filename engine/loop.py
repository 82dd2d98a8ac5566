"""The engine's loop: the one thread that steps the engine, starts and finishes jobs, and reports.

The server runs `EngineLoop.run(stop)` on its engine thread; `Engine.generate` (the `zostream generate`
command, tests, benches) runs `EngineLoop.run_until(done)` in the caller's thread. Either way one
iteration is: let the job runner start / cancel jobs, wait for work or step once, hand a training step's
result to the runner, and tell the metrics (engine/metrics.Metrics, or None) what the pass did.
Everything here runs on the thread that owns the engine.
"""

from __future__ import annotations

import logging
import threading
import traceback
from collections.abc import Callable
from typing import Any

from .host_tier import process_io

log = logging.getLogger("zostream.engine")


class EngineLoop:
    def __init__(self, engine: Any, runner: Any = None, metrics: Any = None) -> None:
        """runner: a job_runner.JobRunner (None: generation only); metrics: an engine.metrics.Metrics."""
        self.engine, self.runner, self.metrics = engine, runner, metrics

    def run(self, stop: threading.Event) -> None:
        """Until `stop` is set; then the runner checkpoints its jobs (they resume on restart)."""
        try:
            while not stop.is_set():
                self.tick(idle_wait=0.05)
        finally:
            if self.runner is not None:
                self.runner.shutdown()

    def run_until(self, done: Callable[[], bool]) -> None:
        """Step until done() (errors propagate: the caller's requests are all there is)."""
        while not done():  # idle (e.g. a checkpoint building on its worker thread): wait for a post
            self.tick(idle_wait=0.01, catch=False)

    def tick(self, idle_wait: float = 0.05, catch: bool = True) -> None:
        """One iteration. catch: a failing pass is logged and its requests aborted, the loop goes on."""
        e, m, runner = self.engine, self.metrics, self.runner
        try:
            if runner is not None:
                runner.poll()
                if m is not None:
                    m.set_jobs(runner.store.counts())
            if not e.has_work():
                if idle_wait:
                    e.wait_for_work(idle_wait)
                return
            stats = e.step()
            train = stats.train
            if isinstance(train, BaseException):
                stats.train = None
            if m is not None:
                # Counted before the runner reports the step (its events, a job's "succeeded"): a reader
                # that saw the job end then finds every step of it in the metrics.
                m.observe_step(
                    stats,
                    codec=e.cfg.codec.name,
                    running=len(e.scheduler.running),
                    waiting=len(e.scheduler.waiting),
                    method=runner.method_of(stats.train_job) if runner and stats.train_job else None,
                )
            if runner is not None and stats.train_job:
                runner.after_step(stats.train_job, train)
                progress = runner.progress_of(stats.train_job)
                if m is not None and progress is not None:  # still training: progress, held-out figures
                    m.set_job_progress(*progress)
            if m is not None:
                tier = e.streamer.tier  # host tier: disk counters and measured residency
                m.observe_disk(process_io(), tier.ram_bytes() if tier is not None else None)
                if e.device.type == "cuda":
                    import torch

                    m.set_gpu_memory(
                        torch.cuda.memory_allocated(e.device),
                        torch.cuda.memory_reserved(e.device),
                        e.cfg.stream.gpu_memory_bytes,
                    )
        except Exception as exc:
            if not catch:
                raise
            # Keep serving; the failing requests get errors.
            log.error("internal error: %s", "".join(traceback.format_exception(exc)))
            e.abort_all()
