"""OPT: learned positions (offset 2), ReLU, pre-LN (or post-LN for 350m), project_in/out, tied head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ModelError
from .attention import LayerAttention, LoraSet, linear

MODEL_TYPES = ("opt",)
POS_OFFSET = 2  # OPT's learned positions are indexed position + 2 (historic padding_idx)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


@dataclass(frozen=True)
class Spec:
    family: str
    model_type: str
    num_layers: int
    hidden: int
    ffn: int
    vocab: int
    heads: int
    head_dim: int
    embed_dim: int  # word_embed_proj_dim
    max_positions: int
    pre_ln: bool
    final_ln: bool
    bias: bool
    ln_affine: bool
    act: str
    tied: bool

    @property
    def kv_heads(self) -> int:
        return self.heads


def make_spec(cfg: Any) -> Spec:
    act = cfg.activation_function
    if act not in ("relu", "gelu"):
        raise ModelError(f"config.json: unsupported activation_function {act!r} for OPT")
    return Spec(
        family="opt",
        model_type="opt",
        num_layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        ffn=cfg.ffn_dim,
        vocab=cfg.vocab_size,
        heads=cfg.num_attention_heads,
        head_dim=cfg.hidden_size // cfg.num_attention_heads,
        embed_dim=cfg.word_embed_proj_dim,
        max_positions=cfg.max_position_embeddings,
        pre_ln=bool(cfg.do_layer_norm_before),
        final_ln=bool(cfg.do_layer_norm_before) and not getattr(cfg, "_remove_final_layer_norm", False),
        bias=bool(getattr(cfg, "enable_bias", True)),
        ln_affine=bool(getattr(cfg, "layer_norm_elementwise_affine", True)),
        act=act,
        tied=bool(getattr(cfg, "tie_word_embeddings", True)),
    )


def layer_prefix(i: int) -> str:
    return f"model.decoder.layers.{i}."


def _ln(name: str, dim: int, s: Spec) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (dim,), f"{name}.bias": (dim,)} if s.ln_affine else {}


def outer_tensors(s: Spec) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {
        "model.decoder.embed_tokens.weight": (s.vocab, s.embed_dim),
        "model.decoder.embed_positions.weight": (s.max_positions + POS_OFFSET, s.hidden),
    }
    if s.embed_dim != s.hidden:
        out["model.decoder.project_in.weight"] = (s.hidden, s.embed_dim)
        out["model.decoder.project_out.weight"] = (s.embed_dim, s.hidden)
    if s.final_ln:
        out |= _ln("model.decoder.final_layer_norm", s.hidden, s)
    if not s.tied:
        out["lm_head.weight"] = (s.vocab, s.embed_dim)
    return out


def block_tensors(s: Spec) -> dict[str, tuple[int, ...]]:
    h = s.hidden
    out: dict[str, tuple[int, ...]] = {}
    for name, shape in (
        ("self_attn.q_proj", (h, h)),
        ("self_attn.k_proj", (h, h)),
        ("self_attn.v_proj", (h, h)),
        ("self_attn.out_proj", (h, h)),
        ("fc1", (s.ffn, h)),
        ("fc2", (h, s.ffn)),
    ):
        out[f"{name}.weight"] = shape
        if s.bias:
            out[f"{name}.bias"] = (shape[0],)
    return out | _ln("self_attn_layer_norm", h, s) | _ln("final_layer_norm", h, s)


def expected_tensors(s: Spec) -> dict[str, tuple[int, ...]]:
    out = dict(outer_tensors(s))
    for i in range(s.num_layers):
        out |= {layer_prefix(i) + k: v for k, v in block_tensors(s).items()}
    return out


def module_names(s: Spec) -> dict[str, str]:
    return {
        n.rsplit(".", 2)[-2]: n.rsplit(".", 1)[0]
        for n in block_tensors(s)
        if n.endswith(".weight") and ("proj" in n or n.startswith("fc"))
    }


def _layer_norm(x: torch.Tensor, w: dict, name: str) -> torch.Tensor:
    weight, bias = w.get(name + ".weight"), w.get(name + ".bias")
    return F.layer_norm(x, (x.shape[-1],), weight, bias, 1e-5)


def embed(outer: dict, input_ids: torch.Tensor, positions: torch.Tensor, s: Spec) -> torch.Tensor:
    h = F.embedding(input_ids, outer["model.decoder.embed_tokens.weight"])
    if s.embed_dim != s.hidden:
        h = F.linear(h, outer["model.decoder.project_in.weight"])
    pos = F.embedding(positions + POS_OFFSET, outer["model.decoder.embed_positions.weight"])
    return h + pos.to(h.dtype)


def head(h: torch.Tensor, outer: dict, s: Spec, out: torch.Tensor | None = None) -> torch.Tensor:
    """h [..., hidden] -> logits [..., V]; out: a buffer of that shape to write them into (same bits)."""
    if s.final_ln:
        h = _layer_norm(h, outer, "model.decoder.final_layer_norm")
    if s.embed_dim != s.hidden:
        h = F.linear(h, outer["model.decoder.project_out.weight"])
    w = outer["model.decoder.embed_tokens.weight"] if s.tied else outer["lm_head.weight"]
    if out is None or not out.dtype == h.dtype == w.dtype:  # mixed dtypes: F.linear's own result
        return F.linear(h, w)
    return torch.matmul(h, w.t(), out=out)


def block(
    h: torch.Tensor, w: dict, attn: LayerAttention, s: Spec, lora: LoraSet | None = None
) -> torch.Tensor:
    B, T, _ = h.shape
    residual = h
    x = _layer_norm(h, w, "self_attn_layer_norm") if s.pre_ln else h
    # OPT scales q before the product (its original order), then attends with scale 1.
    q = linear(x, w, "self_attn.q_proj", lora) * s.head_dim**-0.5
    k = linear(x, w, "self_attn.k_proj", lora)
    v = linear(x, w, "self_attn.v_proj", lora)
    q, k, v = (t.view(B, T, s.heads, s.head_dim).transpose(1, 2) for t in (q, k, v))
    o = attn(q, k, v, scale=1.0).transpose(1, 2).reshape(B, T, s.hidden)
    h = residual + linear(o, w, "self_attn.out_proj", lora)
    if not s.pre_ln:
        h = _layer_norm(h, w, "self_attn_layer_norm")
    residual = h
    x = _layer_norm(h, w, "final_layer_norm") if s.pre_ln else h
    x = linear(x, w, "fc1", lora)
    x = F.relu(x) if s.act == "relu" else F.gelu(x)
    h = residual + linear(x, w, "fc2", lora)
    if not s.pre_ln:
        h = _layer_norm(h, w, "final_layer_norm")
    return h
