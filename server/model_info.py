"""GetModelInfo's answer: what the served model is and how it is placed on the device."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from zostream import __version__
from zostream.v1 import generation_pb2


def model_info(app: Any) -> generation_pb2.ModelInfo:
    e = app.ready_engine()
    plan = e.streamer.plan
    return generation_pb2.ModelInfo(
        model_id=Path(e.cfg.model_dir).name,
        family=e.spec.model_type,
        num_layers=e.spec.num_layers,
        num_parameters=e.store.num_parameters(),
        dtype=str(e.store.dtype).removeprefix("torch."),
        compute_dtype=str(e.dtype).removeprefix("torch."),
        vocab_size=e.spec.vocab,
        max_sequence_length=e.limits.max_seq_len,
        max_new_tokens=e.limits.max_new_tokens,
        codec=e.cfg.codec.name,
        device=str(e.device),
        device_name=app.device_name,
        gpu_memory_budget_bytes=plan.budget or 0,
        resident_blocks=len(plan.resident),
        streamed_blocks=len(plan.streamed),
        has_chat_template=bool(getattr(e.tokenizer, "chat_template", None)),
        base_fingerprint=e.store.fingerprint,
        eos_token_ids=sorted(e.eos_ids),
        server_version=__version__,
    )
