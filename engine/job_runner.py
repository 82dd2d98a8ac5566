"""Runs fine-tuning jobs on the engine thread: start, step bookkeeping, eval, checkpoint,
export, cancel, fail, and resume after a restart. Every method runs on the engine thread."""

from __future__ import annotations

import errno
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import data as D
from . import session
from .checkpoints import SUFFIX, CheckpointSource
from .config import ZOConfig
from .engine import Engine
from .jobs import JobRecord, JobStore
from .trainer import ZOTrainer

MAX_ACTIVE = 1  # one job trains at a time; the rest wait QUEUED
# OSError errno -> Job.error.code: a full disk is a resource, a refused write a precondition of the data dir.
_OS_CODES = {
    **dict.fromkeys((errno.ENOSPC, errno.EDQUOT, errno.EFBIG), "RESOURCE_EXHAUSTED"),
    **dict.fromkeys((errno.EACCES, errno.EPERM, errno.EROFS), "FAILED_PRECONDITION"),
}


@dataclass
class ActiveJob:
    rec: JobRecord
    session: session.TrainingSession
    cfg: ZOConfig

    @property
    def trainer(self) -> ZOTrainer:
        return self.session.trainer


def zo_config(spec: dict[str, Any]) -> ZOConfig:
    hp = dict(spec.get("hyperparameters", {}))
    hp["method"] = spec["method"]
    if "lora_targets" in hp:
        hp["lora_targets"] = tuple(hp["lora_targets"])
    hp.pop("codec", None)
    hp.setdefault("average_decay", 0.0)  # jobs stored before the field served their iterates
    if spec["method"] == "lora":
        hp.setdefault("lora_init_scale", 1.0)  # jobs stored before the field started from PEFT's init
    for k in LIFECYCLE_KEYS:
        hp.pop(k, None)
    return ZOConfig(**hp)


LIFECYCLE_KEYS = ("keep_best", "early_stopping_patience")  # the job's, not the update log's


def policy_of(spec: dict[str, Any], cfg: ZOConfig) -> session.Policy:
    hp = spec.get("hyperparameters", {})
    return session.Policy.of(
        cfg, keep_best=bool(hp.get("keep_best", False)), patience=int(hp.get("early_stopping_patience", 0))
    )


class JobRunner:
    def __init__(self, engine: Engine, store: JobStore, on_log_bytes=None) -> None:
        self.engine, self.store = engine, store
        self.active: dict[str, ActiveJob] = {}
        self.on_log_bytes = on_log_bytes or (lambda n: None)
        for rec in store.list(("running",)):
            # Restarted (cleanly or after kill -9): resume from the last logged step. A job that was
            # CANCELLING stays so, and the first poll ends it (its log already holds every step done).
            store.event(
                rec.id, "resumed", f"server restarted; resuming at step {rec.steps_done}", rec.steps_done
            )
            rec.status = "queued"
            store.save(rec)
        engine.adapter_source = CheckpointSource(store, engine)  # `<job_id>:ckpt-step-<N>` on first use

    def delete_job(self, job_id: str) -> None:
        """A finished job's files and served adapter (refused while a request generates with it)."""
        cached = [a for a in self.engine.adapters.cached if a.startswith(job_id + SUFFIX)]
        for aid in (job_id, *cached):
            self.engine.drop_adapter(aid, "job_id")
        self.store.delete_job(job_id)

    # ---- what the loop reports ---------------------------------------------------------------
    def method_of(self, job_id: str) -> str | None:
        aj = self.active.get(job_id)
        return aj.cfg.method if aj else None

    def progress_of(self, job_id: str) -> tuple[float, float | None, float | None] | None:
        """(fraction of steps done, held-out loss, held-out accuracy) of a job still training, else None."""
        aj = self.active.get(job_id)
        if aj is None:
            return None
        m = aj.rec.metrics
        return aj.trainer.step / max(aj.cfg.steps, 1), m.get("eval_loss"), m.get("eval_accuracy")

    # ---- lifecycle ----------------------------------------------------------------------------
    def poll(self) -> None:
        """Start queued jobs while there is room; finish cancellations."""
        for rec in self.store.list(("cancelling",)):
            if rec.id in self.active:
                self._stop(rec.id, "cancelled", "cancelled by request")
            else:
                self.store.set_status(rec, "cancelled", "cancelled before it started")
        if len(self.active) >= MAX_ACTIVE:
            return
        for rec in self.store.list(("queued",)):
            if len(self.active) >= MAX_ACTIVE:
                break
            self._start(rec)

    def _start(self, rec: JobRecord) -> None:
        e = self.engine
        try:
            cfg = zo_config(rec.spec)
            train = D.load_dataset(
                self.store.dataset_path(rec.spec["training_dataset"]), e.tokenizer, cfg.max_len
            )
            val = rec.spec.get("validation_dataset") or ""
            eval_ds = D.load_dataset(self.store.dataset_path(val), e.tokenizer, cfg.max_len) if val else None
            pad = e.tokenizer.pad_token_id if e.tokenizer.pad_token_id is not None else 0
            ses = session.TrainingSession.open(
                cfg,
                self.store.job_dir(rec.id),
                e.store,
                train,
                eval_ds,
                pad,
                e.device,
                e.dtype,
                e.streamer,
                e.cfg.stream,
                e.cfg.codec.name,
                policy=policy_of(rec.spec, cfg),
                on_event=lambda kind, step, data: self._on_event(rec, kind, step, data),
            )
        except Exception as exc:  # noqa: BLE001 - a job's failure never takes the engine down
            self._fail(rec, exc)
            return
        tr = ses.trainer
        rec.steps_done = tr.step
        if ses.repaired:
            self.store.event(
                rec.id,
                "log_repaired",
                f"update.log {ses.repaired}; resuming from the last intact step",
                tr.step,
            )
        if not self.store.move(rec, "running", f"training from step {tr.step}", only_from=("queued",)):
            ses.close()  # cancelled while it was being opened: the next poll marks it CANCELLED
            return
        self.active[rec.id] = ActiveJob(rec, ses, cfg)
        if (served := tr.served_adapter()) is not None:
            e.put_adapter(rec.id, served.clone())
        if ses.eval_ds is not None and tr.step == 0:
            try:  # the baseline, so the job reports held-out loss/accuracy before and after
                ses.begin()
                rec.metrics["eval_loss_before"] = rec.metrics["eval_loss"]
                if "eval_accuracy" in rec.metrics:
                    rec.metrics["eval_accuracy_before"] = rec.metrics["eval_accuracy"]
            except Exception as exc:  # noqa: BLE001
                self._detach(rec.id)
                self._fail(rec, exc)
                return
        if ses.finished:
            self._complete(rec.id)
            return
        e.add_job(rec.id, tr)

    def after_step(self, job_id: str, result: dict[str, Any] | BaseException) -> None:
        aj = self.active.get(job_id)
        if aj is None:
            return
        if isinstance(result, BaseException):
            self._detach(job_id)
            self._fail(aj.rec, result)
            return
        rec, ses = aj.rec, aj.session
        tr = ses.trainer
        rec.steps_done = tr.step
        rec.tokens += int(result.get("tokens", 0))
        rec.metrics.update(
            {
                "step": tr.step,  # steps done, as JobProgress.steps_done and JobEvent.step count them
                "train_loss": result["loss"],
                "loss_plus": result["loss_plus"],
                "loss_minus": result["loss_minus"],
                "projected_grad": result["projected_grad"],
                "learning_rate": result["lr"],
            }
        )
        self.on_log_bytes(tr.log.step_bytes)
        msg = f"skipped: {result['skipped']}" if result.get("skipped") else ""
        try:
            # JobEvent.step is the steps done so far (result["step"] is the 0-based index of this step).
            keys = ("loss", "loss_plus", "loss_minus", "projected_grad", "lr")
            self.store.event(job_id, "step", msg, tr.step, {k: result[k] for k in keys})
            if result.get("climb"):  # the divergence guard's slow-climb rule backed the lr off
                self.store.event(job_id, "guard", result["climb"], tr.step, {"train_loss": result["loss"]})
            ses.after_step()  # checkpoint / eval cadence, early stopping
            if ses.finished:
                self._complete(job_id)
            else:
                self.store.save(rec)
        except Exception as exc:  # noqa: BLE001
            self._detach(job_id)
            self._fail(rec, exc)

    def _on_event(self, rec: JobRecord, kind: str, step: int, data: dict[str, Any]) -> None:
        """The session's events: the job's metrics, its event stream, the served adapter."""
        if kind == "eval":
            rec.metrics.update({"eval_step": step, "eval_loss": data["loss"]})
            if "accuracy" in data:
                rec.metrics["eval_accuracy"] = data["accuracy"]
            self.store.event(rec.id, "eval", "", step, data)
        elif kind == "checkpoint":
            aj = self.active.get(rec.id)
            served = aj.session.trainer.served_adapter() if aj is not None else None
            if served is not None:
                self.engine.put_adapter(rec.id, served.clone())
            self.store.event(rec.id, "checkpoint", data.get("message") or data["name"], step)
        elif kind == "best":
            aj = self.active.get(rec.id)
            if aj is not None and (aj.session.policy.keep_best or aj.session.policy.patience):
                rec.metrics["best_step"] = step
                self.store.event(rec.id, "best", "the best held-out metric so far", step, data)
        elif kind == "early_stop":
            self.store.event(rec.id, "early_stop", "no better held-out metric: stopping", step, data)

    def _complete(self, job_id: str) -> None:
        aj = self.active[job_id]
        ses = aj.session
        res = ses.finish()
        assert res is not None
        if res.adapter is not None:
            self.engine.put_adapter(job_id, res.adapter)
        aj.rec.metrics["result_step"] = res.step
        self._detach(job_id)
        what = f"exported step {res.step} to {res.path.name}/"
        if ses.stopped:
            what = f"{ses.stopped}; {what}"
        elif res.step != ses.step:
            what = f"{what} (the best held-out {ses.best.metric})"
        self.store.set_status(aj.rec, "succeeded", what)

    def _stop(self, job_id: str, status: str, message: str) -> None:
        aj = self.active[job_id]
        try:
            aj.session.stop()
        finally:
            self._detach(job_id)
            self.store.set_status(aj.rec, status, message)

    def _detach(self, job_id: str) -> None:
        aj = self.active.pop(job_id, None)
        self.engine.remove_job(job_id)
        if aj is not None:
            aj.session.close()  # its fd and writer lock: one per finished job would leak otherwise

    def _fail(self, rec: JobRecord, exc: BaseException) -> None:
        field = getattr(exc, "field", "")
        code = getattr(exc, "code", "INTERNAL")
        message = str(exc).replace(f"{self.store.root}/", "")  # paths relative to the data dir
        if isinstance(exc, OSError):
            code = _OS_CODES.get(exc.errno, "INTERNAL")
            where = f" ({_relative(exc.filename, self.store.root)})" if exc.filename else ""
            message = (
                f"writing the job's files failed: {exc.strerror or exc}{where}; "
                "free space or fix the data directory's permissions, then create the job again"
            )
        try:
            self.store.set_status(
                rec,
                "failed",
                f"{type(exc).__name__}: {message}",
                {"code": code, "message": message, "field": field},
            )
        except OSError as exc2:  # the disk that failed the job may refuse its status too: FAILED in memory
            traceback.print_exception(exc2)
        if code == "INTERNAL":
            traceback.print_exception(exc)

    def shutdown(self) -> None:
        """SIGTERM: checkpoint running jobs; they stay RUNNING on disk and resume on restart."""
        for aj in list(self.active.values()):
            try:
                aj.session.stop("server shutting down")
            except Exception as exc:  # noqa: BLE001
                self.store.event(aj.rec.id, "error", f"checkpoint at shutdown failed: {exc}")
            finally:
                aj.session.close()


def _relative(path: Any, root: Path) -> str:
    """A path for a client's eyes: relative to the data dir, never the server's absolute layout."""
    try:
        return str(Path(path).resolve().relative_to(root.resolve()))
    except (ValueError, OSError, TypeError):
        return Path(str(path)).name
