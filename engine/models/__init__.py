"""Model families: pure `embed` / `block` / `head` functions over weights passed in.

A family module provides:
    make_spec(hf_config) -> Spec                      frozen dims derived from the HF config
    expected_tensors(spec) -> {full name: shape}      everything the checkpoint must hold
    outer_tensors(spec) -> {full name: shape}         embeddings / positions / final norm / lm_head
    block_tensors(spec) -> {local name: shape}        one decoder block, names relative to layer_prefix
    layer_prefix(i) -> str                            "model.layers.{i}."
    embed(outer, input_ids [B,T], positions [B,T], spec) -> h [B,T,H]
    block(h [B,T,H], w, attn: LayerAttention, spec, lora: LoraSet | None) -> h [B,T,H]
    head(h [B,T,H], outer, spec) -> logits [B,T,V]
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from ..errors import ModelError

Family = ModuleType  # a family module with the functions above


def family_for(hf_config: Any) -> Family:
    from . import llama, opt

    model_type = getattr(hf_config, "model_type", None)
    for fam in (llama, opt):
        if model_type in fam.MODEL_TYPES:
            return fam
    supported = sorted(llama.MODEL_TYPES + opt.MODEL_TYPES)
    raise ModelError(f"unsupported architecture model_type={model_type!r}; supported: {', '.join(supported)}")
