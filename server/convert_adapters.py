"""Adapter messages: an adapter's facts as the Adapter the API returns."""

from __future__ import annotations

from zostream.v1 import adapters_pb2

from .convert import ts
from .convert_jobs import METHOD_PB


def adapter_pb(
    aid: str,
    kind: str,
    fingerprint: str,
    steps: int,
    job_id: str,
    created: float,
    size: int,
    status: int,
    lora: dict | None,
    log_bytes: int,
) -> adapters_pb2.Adapter:
    a = adapters_pb2.Adapter(
        id=aid,
        kind=METHOD_PB[kind],
        base_fingerprint=fingerprint,
        steps=steps,
        source_job_id=job_id,
        created_at=ts(created),
        size_bytes=size,
        status=status,
        update_log_bytes=log_bytes,
    )
    if lora:
        a.lora.r, a.lora.alpha = lora["r"], lora["alpha"]
        a.lora.target_modules.extend(lora["targets"])
    return a
