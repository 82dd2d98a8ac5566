"""Durable job bookkeeping (imports no torch): records, states, events, datasets on disk.

data_dir/
  datasets/<name>.jsonl (+ <name>.json metadata)   uploaded training data (names only, no paths)
  jobs/<id>/spec.json      what was asked (immutable after create)
  jobs/<id>/status.json    state, progress, last metrics, error (atomic replace)
  jobs/<id>/events.jsonl   append-only, fsync'd, ids 1, 2, 3 ...
  jobs/<id>/update.log ... the trainer's files (see engine/finetune.py)
  adapters/<id>/           imported update logs
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import shutil
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from zostream import defaults

from .errors import NotFoundError, PreconditionError, RequestError

STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled")
MAX_DATASET_BYTES = 256 * 2**20


def check_name(name: str, field_name: str) -> str:
    """Names are identifiers, never paths: no separators, no '..', bounded length."""
    if not defaults.check_name(name):  # fullmatch: no trailing \n
        raise RequestError(
            f"{str(name)[:40]!r} is not a valid name: use 1-{defaults.NAME_MAX_CHARS} letters, digits, "
            "'.', '_' or '-' (starting with a letter or digit, no '..')",
            field_name,
        )
    return name


def _as_asked(spec: dict[str, Any]) -> dict[str, Any]:
    """A spec as the client asked it: a seed the server picked compares equal to an unset one."""
    if not spec.get("seed_picked") and spec.get("hyperparameters", {}).get("seed", 0) is not None:
        return spec
    hp = {**spec["hyperparameters"], "seed": None}
    return {**{k: v for k, v in spec.items() if k != "seed_picked"}, "hyperparameters": hp}


def _cut_torn_line(path: Path) -> None:
    """A kill or a full disk mid-append can leave a last line without its newline: cut it, so the
    next event starts on a line of its own instead of being glued to (and lost with) the torn one."""
    data = path.read_bytes() if path.exists() else b""
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
            os.fsync(f.fileno())


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class JobRecord:
    id: str
    spec: dict[str, Any]  # method, hyperparameters (ZOConfig fields), datasets, display_name, idempotency_key
    status: str = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float = 0.0
    finished_at: float = 0.0
    steps_done: int = 0
    tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: dict[str, str] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class JobStore:
    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.root = Path(data_dir)
        self.jobs_dir = self.root / "jobs"
        self.datasets_dir = self.root / "datasets"
        for d in (self.jobs_dir, self.datasets_dir, self.root / "adapters"):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self.jobs: dict[str, JobRecord] = {}
        self._event_ids: dict[str, int] = {}
        for d in sorted(self.jobs_dir.iterdir()):
            if d.name.startswith(".") and d.name.endswith(".deleting"):  # DeleteJob stopped mid-way
                shutil.rmtree(d, ignore_errors=True)
                continue
            if (d / "spec.json").exists() and (d / "status.json").exists():
                rec = JobRecord(**json.loads((d / "status.json").read_text()))
                self.jobs[rec.id] = rec
                _cut_torn_line(d / "events.jsonl")
                self._event_ids[rec.id] = max((e["id"] for e in self.events(rec.id)), default=0)

    # ---- datasets -----------------------------------------------------------------------------
    def dataset_path(self, name: str) -> Path:
        check_name(name, "training_dataset")
        p = self.datasets_dir / f"{name}.jsonl"
        if not p.exists():
            raise NotFoundError(
                f"no dataset {name!r}; upload it with UploadDataset first", "training_dataset"
            )
        return p

    def save_dataset(self, name: str, data: bytes, meta: dict[str, Any], overwrite: bool = False) -> dict:
        check_name(name, "metadata.name")
        p = self.datasets_dir / f"{name}.jsonl"
        with self._lock:
            if p.exists() and not overwrite:
                raise RequestError(
                    f"dataset {name!r} exists; set overwrite to replace it",
                    "metadata.name",
                    code="ALREADY_EXISTS",
                )
            _atomic_write(p, data)
            info = {
                "name": name,
                "size_bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
                "created_at": time.time(),
                **meta,
            }
            _atomic_write(self.datasets_dir / f"{name}.json", json.dumps(info).encode())
        return info

    def get_dataset(self, name: str, field_name: str = "name") -> dict:
        check_name(name, field_name)
        p = self.datasets_dir / f"{name}.json"
        if not p.exists():
            raise NotFoundError(f"no dataset {name!r}; list them with ListDatasets", field_name)
        return json.loads(p.read_text())

    def delete_dataset(self, name: str) -> None:
        """Refused while a job that has not finished names it (it is read when the job starts)."""
        self.get_dataset(name)
        with self._lock:
            users = [
                r.id
                for r in self.jobs.values()
                if not r.terminal
                and name in (r.spec.get("training_dataset"), r.spec.get("validation_dataset"))
            ]
            if users:
                raise PreconditionError(f"job {users[0]} uses it; cancel the job first", "name")
            (self.datasets_dir / f"{name}.jsonl").unlink(missing_ok=True)
            (self.datasets_dir / f"{name}.json").unlink(missing_ok=True)

    def delete_job(self, job_id: str) -> None:
        """Forget a finished job and remove its directory (events, log, checkpoints, result)."""
        with self._lock:
            rec = self.get(job_id)
            if not rec.terminal:
                raise PreconditionError(f"job {rec.id} is {rec.status}; cancel it first", "job_id")
            tomb = self.job_dir(rec.id).with_name(f".{rec.id}.deleting")
            os.replace(self.job_dir(rec.id), tomb)  # gone from a restart's scan even if rmtree stops
            del self.jobs[rec.id]
            self._event_ids.pop(rec.id, None)
            self._cond.notify_all()
        if (tomb / "working").is_symlink():  # a master kept in master_dir (a tmpfs): free its RAM too
            shutil.rmtree(os.path.realpath(tomb / "working"), ignore_errors=True)
        shutil.rmtree(tomb, ignore_errors=True)

    def list_datasets(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.datasets_dir.glob("*.json"))]

    # ---- jobs ---------------------------------------------------------------------------------
    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def create(self, spec: dict[str, Any]) -> tuple[JobRecord, bool]:
        """(record, created). An idempotency key returns the existing job instead of a second one."""
        with self._lock:
            key = spec.get("idempotency_key") or ""
            if key:
                for rec in self.jobs.values():
                    if rec.spec.get("idempotency_key") == key:
                        if _as_asked(rec.spec) != _as_asked(spec):
                            raise RequestError(
                                f"idempotency_key {key!r} was used for a different job ({rec.id})",
                                "idempotency_key",
                                code="ALREADY_EXISTS",
                            )
                        return rec, False
            hp = spec.get("hyperparameters", {})
            if hp.get("seed", 0) is None:  # unset: the server picks one, and Job reports it
                spec = {**spec, "hyperparameters": {**hp, "seed": secrets.randbits(63)}, "seed_picked": True}
            job_id = "job-" + uuid.uuid4().hex[:12]
            d = self.job_dir(job_id)
            d.mkdir(parents=True)
            _atomic_write(d / "spec.json", json.dumps(spec, sort_keys=True).encode())
            rec = JobRecord(job_id, spec)
            self.jobs[job_id] = rec
            self._event_ids[job_id] = 0
            self.save(rec)
            self.event(job_id, "created", f"{spec.get('method')} job queued")
            return rec, True

    def get(self, job_id: str) -> JobRecord:
        rec = self.jobs.get(job_id) if isinstance(job_id, str) else None
        if rec is None:
            raise NotFoundError(f"no job {str(job_id)[:64]!r}", "job_id")
        return rec

    def save(self, rec: JobRecord) -> None:
        with self._lock:
            _atomic_write(self.job_dir(rec.id) / "status.json", json.dumps(asdict(rec)).encode())
            self._cond.notify_all()

    def set_status(
        self, rec: JobRecord, status: str, message: str = "", error: dict[str, str] | None = None
    ) -> None:
        """`error`: Job.error's fields (code, message, field) for a FAILED job."""
        assert status in STATUSES
        with self._lock:
            # The event is written before the status flips: a reader that sees a terminal status
            # (StreamJobEvents ends there) is then sure to find the terminal event on disk.
            # Event types are the proto's (JobEvent.type): a job going RUNNING is "started".
            try:
                self.event(
                    rec.id, "started" if status == "running" else status, message or status, rec.steps_done
                )
            finally:  # a full disk may refuse the event; the state change still happens in memory
                self._apply_status(rec, status, error)

    def move(self, rec: JobRecord, status: str, message: str = "", *, only_from: tuple[str, ...]) -> bool:
        """set_status, only if the job is still in one of `only_from` (checked under the store's lock).

        The engine thread starts and ends jobs while request threads cancel them: a plain check-then-set
        would let a cancel land between the engine's read of "queued" and its "running", and be lost."""
        with self._lock:
            if rec.status not in only_from:
                return False
            self.set_status(rec, status, message)
            return True

    def request_cancel(self, rec: JobRecord) -> bool:
        """QUEUED or RUNNING -> CANCELLING (the engine finishes it); False if the job had already ended or
        was being cancelled."""
        return self.move(rec, "cancelling", "cancel requested", only_from=("queued", "running"))

    def _apply_status(self, rec: JobRecord, status: str, error: dict[str, str] | None) -> None:
        with self._lock:
            now = time.time()
            new = replace(rec, status=status)
            if status == "running" and not rec.started_at:
                new.started_at = now
            if status in TERMINAL:
                new.finished_at = now
            if error:
                new.error = error
            # Written before it is published: readers (GetJob, ListJobs) read records without the lock, so
            # a status they see is already in status.json. A refused write (disk full) still changes the
            # state in memory, and the error propagates.
            try:
                _atomic_write(self.job_dir(rec.id) / "status.json", json.dumps(asdict(new)).encode())
            finally:
                rec.status, rec.started_at, rec.finished_at, rec.error = (
                    new.status,
                    new.started_at,
                    new.finished_at,
                    new.error,
                )
                self._cond.notify_all()

    def list(self, statuses: tuple[str, ...] = ()) -> list[JobRecord]:
        with self._lock:
            recs = sorted(self.jobs.values(), key=lambda r: (r.created_at, r.id))
        return [r for r in recs if not statuses or r.status in statuses]

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
        for r in list(self.jobs.values()):
            out[r.status] += 1
        return out

    # ---- events -------------------------------------------------------------------------------
    def event(
        self,
        job_id: str,
        type_: str,
        message: str = "",
        step: int = 0,
        metrics: dict[str, float] | None = None,
    ) -> dict:
        finite = {k: float(v) for k, v in (metrics or {}).items() if v is not None and math.isfinite(v)}
        with self._lock:
            self._event_ids[job_id] += 1
            ev = {
                "id": self._event_ids[job_id],
                "job_id": job_id,
                "time": time.time(),
                "type": type_,
                "message": message,
                "step": step,
                "metrics": finite,
            }
            line = (json.dumps(ev, allow_nan=False, default=float) + "\n").encode()
            fd = os.open(self.job_dir(job_id) / "events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                except OSError:  # e.g. disk full after half a line: leave no torn line behind
                    self._event_ids[job_id] -= 1
                    os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
            self._cond.notify_all()
            return ev

    def events(self, job_id: str, after: int = 0) -> list[dict]:
        p = self.job_dir(job_id) / "events.jsonl"
        if not p.exists():
            return []
        out = []
        for line in p.read_text().splitlines():
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
            if ev["id"] > after:
                out.append(ev)
        return out

    def wait_for_change(self, timeout: float) -> None:
        with self._cond:
            self._cond.wait(timeout)
