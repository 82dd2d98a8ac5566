"""Weights in and out as directories of files: DownloadWeights (adapters, checkpoints, FULL results)
and ImportPeftAdapter (a PEFT LoRA directory made elsewhere). Paths are resolved inside the data
directory from ids and names only; nothing sent back names a server path."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from zostream.engine import finetune
from zostream.engine.errors import NotFoundError, PreconditionError, RequestError, ResourceExhaustedError
from zostream.engine.jobs import check_name
from zostream.v1 import adapters_pb2

CHUNK = 1 << 20
PEFT_FILES = ("adapter_config.json", "adapter_model.safetensors")
MAX_PEFT_BYTES = 1 << 30


def weights_dir(app: Any, request: adapters_pb2.DownloadWeightsRequest) -> Path:
    """The directory a DownloadWeights request names (raises NOT_FOUND / FAILED_PRECONDITION)."""
    jobs = app.jobs
    which = request.WhichOneof("source")
    if which is None:
        raise RequestError("set adapter_id or job_id", "source")
    if which == "adapter_id":
        aid = request.adapter_id
        if request.checkpoint:
            raise RequestError("checkpoints are named with job_id, not adapter_id", "checkpoint")
        if aid in jobs.jobs:  # a LoRA job's adapter: its result, else its latest checkpoint
            d = jobs.job_dir(aid)
            if (d / "adapter" / "adapter_config.json").exists():
                return d / "adapter"
            cps = sorted(p for p in (d / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
            if cps:
                return cps[-1]
            if jobs.get(aid).spec["method"] == "lora":
                raise PreconditionError("the job has no checkpoint yet; retry after its first", "adapter_id")
            raise NotFoundError(
                f"no adapter {aid[:64]!r}; a FULL job's weights are named by job_id", "adapter_id"
            )
        check_name(aid, "adapter_id")
        d = jobs.root / "adapters" / aid / "adapter"
        if not (d / "adapter_config.json").exists():
            raise NotFoundError(f"no adapter {aid[:64]!r}; list them with ListAdapters", "adapter_id")
        return d
    rec = jobs.get(request.job_id)
    d = jobs.job_dir(rec.id)
    if request.HasField("upto"):
        if request.checkpoint:
            raise RequestError("name a checkpoint or a step (upto), not both", "upto")
        return step_dir(app, d, request.upto)
    if request.checkpoint:
        check_name(request.checkpoint, "checkpoint")
        cp = d / "checkpoints" / request.checkpoint
        if not cp.is_dir() or request.checkpoint.endswith(".tmp"):
            raise NotFoundError(f"no checkpoint {request.checkpoint!r}; see ListCheckpoints", "checkpoint")
        return cp
    if rec.status != "succeeded":
        raise PreconditionError(
            f"the job is {rec.status}; its result exists once it succeeded (download a checkpoint instead)",
            "job_id",
        )
    out = d / ("adapter" if rec.spec["method"] == "lora" else "model")
    if not out.is_dir():
        raise NotFoundError("the job's result was deleted", "job_id")
    return out


_EXPORT_LOCK = threading.Lock()  # one replay at a time: two of one step would share its staging directory


def step_dir(app: Any, job_dir: Path, upto: int) -> Path:
    """JOBDIR/exports/step-N: the job's weights after its first N steps, replayed once and kept (blocking:
    call it off the event loop)."""
    out = job_dir / "exports" / f"step-{upto:06d}"
    with _EXPORT_LOCK:
        if not out.is_dir():
            finetune.materialize(app.ready_engine().store.dir, job_dir / "update.log", out, upto)
    return out


def files(root: Path) -> list[tuple[str, Path]]:
    """(relative path, file) for every regular file under root, sorted; symlinks are not followed."""
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out.append((p.relative_to(root).as_posix(), p))
    return out


def _content(rel: str, p: Path) -> bytes | None:
    """adapter_config.json with base_model_name_or_path cut to the model's name (not a server path)."""
    if rel != "adapter_config.json":
        return None
    cfg = json.loads(p.read_text())
    if cfg.get("base_model_name_or_path"):
        cfg["base_model_name_or_path"] = Path(str(cfg["base_model_name_or_path"])).name
    return json.dumps(cfg, indent=2).encode()


def stream_dir(root: Path) -> Iterator[adapters_pb2.FileChunk]:
    items = [(rel, p, _content(rel, p)) for rel, p in files(root)]
    sizes = [len(c) if c is not None else p.stat().st_size for _, p, c in items]
    total = sum(sizes)
    for (rel, p, content), size in zip(items, sizes, strict=True):
        if content is not None:
            for i in range(0, max(len(content), 1), CHUNK):
                yield adapters_pb2.FileChunk(
                    path=rel, chunk=content[i : i + CHUNK], file_bytes=size, total_bytes=total
                )
            continue
        with open(p, "rb") as f:
            first = True
            while (block := f.read(CHUNK)) or first:
                first = False
                yield adapters_pb2.FileChunk(path=rel, chunk=block, file_bytes=size, total_bytes=total)


async def read_peft_upload(request_iterator: AsyncIterator[Any]) -> tuple[Any, dict[str, bytes]]:
    """(metadata, {file name: bytes}) of an ImportPeftAdapter stream."""
    meta, out, total = None, {}, 0
    async for part in request_iterator:
        which = part.WhichOneof("part")
        if meta is None:
            if which != "metadata":
                raise RequestError("the first message must carry metadata (adapter_id)", "metadata")
            meta = part.metadata
            if meta.adapter_id:
                check_name(meta.adapter_id, "metadata.adapter_id")
            continue
        if which != "file":
            raise RequestError("metadata may only be sent first", "metadata")
        if part.file.path not in PEFT_FILES:
            raise RequestError(
                f"send only {' and '.join(PEFT_FILES)}, got {part.file.path[:64]!r}", "file.path"
            )
        total += len(part.file.chunk)
        if total > MAX_PEFT_BYTES:
            raise ResourceExhaustedError(
                f"adapters are limited to {MAX_PEFT_BYTES} bytes",
                "file",
                reason="UPLOAD_TOO_LARGE",
                retry_after_s=None,
            )
        out.setdefault(part.file.path, bytearray()).extend(part.file.chunk)
    if meta is None:
        raise RequestError("no metadata received", "metadata")
    missing = [f for f in PEFT_FILES if f not in out]
    if missing:
        raise RequestError(f"missing {', '.join(missing)}", "file")
    return meta, {k: bytes(v) for k, v in out.items()}


def stage_peft(root: Path, aid: str, data: dict[str, bytes]) -> Path:
    """Write the upload to adapters/<aid>.importing/adapter; returns that directory."""
    tmp = root / "adapters" / f"{aid}.importing"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "adapter").mkdir(parents=True)
    for name, blob in data.items():
        (tmp / "adapter" / name).write_bytes(blob)
    return tmp / "adapter"
