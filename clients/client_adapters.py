"""The client's Adapters calls: list, get, delete, update logs out and in, weights as directories out and
PEFT directories in."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zostream.clients.client_base import ClientBase, PathOrBytes, file_chunks, to_dict
from zostream.clients.errors import ZostreamError
from zostream.v1 import adapters_pb2


class AdapterCalls(ClientBase):
    """Adapters: the adapters the server serves, their update logs and weights."""

    # ---- adapters ------------------------------------------------------------------------------
    def list_adapters(self) -> list[dict[str, Any]]:
        return list(self._pages(self._ad.ListAdapters, adapters_pb2.ListAdaptersRequest(), "adapters"))

    def get_adapter(self, adapter_id: str) -> dict[str, Any]:
        return to_dict(
            self._unary(self._ad.GetAdapter, adapters_pb2.GetAdapterRequest(adapter_id=adapter_id))
        )

    def delete_adapter(self, adapter_id: str) -> None:
        self._unary(self._ad.DeleteAdapter, adapters_pb2.DeleteAdapterRequest(adapter_id=adapter_id))

    def _export(
        self, adapter_id: str | None, job_id: str | None, timeout: float | None, upto: int | None = None
    ) -> Iterator[adapters_pb2.ExportUpdateLogResponse]:
        if (adapter_id is None) == (job_id is None):
            raise ValueError("give exactly one of adapter_id or job_id")
        req = (
            adapters_pb2.ExportUpdateLogRequest(adapter_id=adapter_id)
            if adapter_id is not None
            else adapters_pb2.ExportUpdateLogRequest(job_id=job_id)
        )
        if upto is not None:
            req.upto = upto
        return self._stream(self._ad.ExportUpdateLog, req, timeout)

    def export_update_log_to(
        self,
        path: str | os.PathLike[str],
        adapter_id: str | None = None,
        job_id: str | None = None,
        timeout: float | None = None,
        upto: int | None = None,
    ) -> int:
        """Download an adapter's or a job's update log to `path` (atomically); returns its size.
        upto: only its first `upto` steps."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        size, total = 0, 0
        try:
            with open(tmp, "wb") as f:
                for r in self._export(adapter_id, job_id, timeout, upto):
                    f.write(r.chunk)
                    size, total = size + len(r.chunk), r.total_bytes
            if size != total:
                raise ZostreamError("DATA_LOSS", f"received {size} bytes of a {total}-byte update log")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return size

    def export_update_log(
        self,
        adapter_id: str | None = None,
        job_id: str | None = None,
        timeout: float | None = None,
        upto: int | None = None,
    ) -> bytes:
        """An adapter's or a job's update log (upto: only its first `upto` steps), in memory."""
        parts, total = [], 0
        for r in self._export(adapter_id, job_id, timeout, upto):
            parts.append(r.chunk)
            total = r.total_bytes
        data = b"".join(parts)
        if len(data) != total:
            raise ZostreamError("DATA_LOSS", f"received {len(data)} bytes of a {total}-byte update log")
        return data

    def import_update_log(
        self,
        path_or_bytes: PathOrBytes,
        adapter_id: str = "",
        display_name: str = "",
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Register an update log made elsewhere as an adapter; returns the Adapter."""
        meta = adapters_pb2.ImportUpdateLogMetadata(adapter_id=adapter_id, display_name=display_name)

        def requests() -> Iterator[adapters_pb2.ImportUpdateLogRequest]:
            yield adapters_pb2.ImportUpdateLogRequest(metadata=meta)
            yield from (adapters_pb2.ImportUpdateLogRequest(chunk=c) for c in file_chunks(path_or_bytes))

        return to_dict(self._unary(self._ad.ImportUpdateLog, requests, timeout))

    # ---- weights as directories ------------------------------------------------------------------
    def download_weights(
        self,
        out_dir: str | os.PathLike[str],
        adapter_id: str | None = None,
        job_id: str | None = None,
        checkpoint: str = "",
        timeout: float | None = None,
        upto: int | None = None,
    ) -> list[str]:
        """Download an adapter's PEFT files, a job's checkpoint or a job's result into `out_dir`
        (created; files written whole or not at all); returns the relative paths written.
        upto (with job_id): the job's weights after its first `upto` steps, replayed by the server."""
        if (adapter_id is None) == (job_id is None):
            raise ValueError("give exactly one of adapter_id or job_id")
        req = adapters_pb2.DownloadWeightsRequest(checkpoint=checkpoint)
        if upto is not None:
            req.upto = upto
        if adapter_id is not None:
            req.adapter_id = adapter_id
        else:
            req.job_id = job_id or ""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written: list[str] = []
        f, current, size, total, got = None, None, 0, 0, 0

        def close() -> None:
            if f is not None:
                f.close()
                if size != sizes[current]:
                    raise ZostreamError(
                        "DATA_LOSS", f"received {size} of {sizes[current]} bytes of {current}"
                    )
                os.replace(tmp, out / current)
                written.append(current)

        sizes: dict[str, int] = {}
        tmp = out / ".download.part"
        for r in self._stream(self._ad.DownloadWeights, req, timeout, bounded=False):
            if r.path != current:
                close()
                rel = Path(r.path)
                if rel.is_absolute() or ".." in rel.parts:
                    raise ZostreamError("DATA_LOSS", f"refusing a file outside the directory: {r.path!r}")
                (out / rel).parent.mkdir(parents=True, exist_ok=True)
                current, size, sizes[r.path] = r.path, 0, r.file_bytes
                f = open(tmp, "wb")  # noqa: SIM115 - closed by close()
            f.write(r.chunk)
            size += len(r.chunk)
            got += len(r.chunk)
            total = r.total_bytes
        close()
        if got != total:
            raise ZostreamError("DATA_LOSS", f"received {got} of {total} bytes")
        return written

    def import_peft(
        self,
        adapter_dir: str | os.PathLike[str],
        adapter_id: str = "",
        display_name: str = "",
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Upload a PEFT LoRA directory (adapter_config.json, adapter_model.safetensors) as an adapter."""
        d = Path(adapter_dir)
        meta = adapters_pb2.ImportPeftAdapterMetadata(adapter_id=adapter_id, display_name=display_name)

        def requests() -> Iterator[adapters_pb2.ImportPeftAdapterRequest]:
            yield adapters_pb2.ImportPeftAdapterRequest(metadata=meta)
            for name in ("adapter_config.json", "adapter_model.safetensors"):
                for c in file_chunks(d / name):
                    yield adapters_pb2.ImportPeftAdapterRequest(
                        file=adapters_pb2.FileChunk(path=name, chunk=c)
                    )

        return to_dict(self._unary(self._ad.ImportPeftAdapter, requests, timeout))
