"""Llama family: Llama 2/3 (rope scaling), Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm); GQA; tied or not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import ModelError
from .attention import LayerAttention, LoraSet, linear

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Spec:
    family: str
    model_type: str
    num_layers: int
    hidden: int
    intermediate: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    tied: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    act: str
    max_positions: int
    inv_freq: tuple[float, ...]  # RoPE inverse frequencies, from transformers' rope init
    rope_scale: float  # attention_scaling applied to cos/sin

    @property
    def kv_shape(self) -> tuple[int, int]:
        return self.kv_heads, self.head_dim


def make_spec(cfg: Any) -> Spec:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    rope_type = rope.get("rope_type", "default")
    if rope_type == "default":
        base = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        scale = 1.0
    elif rope_type in ROPE_INIT_FUNCTIONS:
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](cfg, "cpu")
    else:
        raise ModelError(f"config.json: unsupported rope_type {rope_type!r}")
    if rope_type == "dynamic":
        raise ModelError(
            "config.json: dynamic RoPE scaling is not supported (positions would rescale per call)"
        )
    act = getattr(cfg, "hidden_act", "silu")
    if act not in ("silu", "gelu", "gelu_pytorch_tanh"):
        raise ModelError(f"config.json: unsupported hidden_act {act!r}")
    qkv_bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
    return Spec(
        family="llama",
        model_type=cfg.model_type,
        num_layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size,
        vocab=cfg.vocab_size,
        heads=cfg.num_attention_heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        eps=float(cfg.rms_norm_eps),
        tied=bool(getattr(cfg, "tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=bool(getattr(cfg, "attention_bias", False)) and cfg.model_type != "qwen2",
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        qk_norm=cfg.model_type == "qwen3",
        act=act,
        max_positions=cfg.max_position_embeddings,
        inv_freq=tuple(float(x) for x in inv_freq),
        rope_scale=float(scale),
    )


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def outer_tensors(s: Spec) -> dict[str, tuple[int, ...]]:
    out = {"model.embed_tokens.weight": (s.vocab, s.hidden), "model.norm.weight": (s.hidden,)}
    if not s.tied:
        out["lm_head.weight"] = (s.vocab, s.hidden)
    return out


def block_tensors(s: Spec) -> dict[str, tuple[int, ...]]:
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    out: dict[str, tuple[int, ...]] = {
        "input_layernorm.weight": (s.hidden,),
        "self_attn.q_proj.weight": (q, s.hidden),
        "self_attn.k_proj.weight": (kv, s.hidden),
        "self_attn.v_proj.weight": (kv, s.hidden),
        "self_attn.o_proj.weight": (s.hidden, q),
        "post_attention_layernorm.weight": (s.hidden,),
        "mlp.gate_proj.weight": (s.intermediate, s.hidden),
        "mlp.up_proj.weight": (s.intermediate, s.hidden),
        "mlp.down_proj.weight": (s.hidden, s.intermediate),
    }
    if s.qkv_bias:
        out |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    if s.o_bias:
        out["self_attn.o_proj.bias"] = (s.hidden,)
    if s.mlp_bias:
        out |= {"mlp.gate_proj.bias": (s.intermediate,), "mlp.up_proj.bias": (s.intermediate,)}
        out["mlp.down_proj.bias"] = (s.hidden,)
    if s.qk_norm:
        out |= {"self_attn.q_norm.weight": (s.head_dim,), "self_attn.k_norm.weight": (s.head_dim,)}
    return out


def expected_tensors(s: Spec) -> dict[str, tuple[int, ...]]:
    out = dict(outer_tensors(s))
    for i in range(s.num_layers):
        out |= {layer_prefix(i) + k: v for k, v in block_tensors(s).items()}
    return out


def module_names(s: Spec) -> dict[str, str]:
    """LoRA target short name ("q_proj") -> block-local module name ("self_attn.q_proj")."""
    return {n.rsplit(".", 2)[-2]: n.rsplit(".", 1)[0] for n in block_tensors(s) if "_proj." in n}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    # The same roundings as transformers' x32 * r, .to(dtype), weight * ...: in place where the operand is
    # a temporary of the result's dtype (x.float() of a float32 x is x itself: never written).
    x32 = x32.mul_(r) if x32 is not x else x32 * r
    y = x32.to(dtype)  # x32 or a new tensor: a temporary either way
    return y.mul_(weight) if y.dtype == weight.dtype else weight * y


def embed(outer: dict, input_ids: torch.Tensor, positions: torch.Tensor, s: Spec) -> torch.Tensor:
    return F.embedding(input_ids, outer["model.embed_tokens.weight"])


def head(h: torch.Tensor, outer: dict, s: Spec, out: torch.Tensor | None = None) -> torch.Tensor:
    """h [..., H] -> logits [..., V]; out: a buffer of that shape to write them into (same bits)."""
    h = rms_norm(h, outer["model.norm.weight"], s.eps)
    w = outer["model.embed_tokens.weight"] if s.tied else outer["lm_head.weight"]
    if out is None or not out.dtype == h.dtype == w.dtype:  # mixed dtypes: F.linear's own result
        return F.linear(h, w)
    return torch.matmul(h, w.t(), out=out)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1]: computed as [x2, x1] * [-s1, s2]
    (sin_signed, see _signed), the same products since negation is exact, one pass fewer."""
    half = x.shape[-1] // 2
    rotated = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    if not x.dtype == cos.dtype == sin_signed.dtype:
        return x * cos + rotated * sin_signed
    return (x * cos).add_(rotated.mul_(sin_signed))  # temporaries of x's dtype: same roundings in place


def _signed(sin: torch.Tensor) -> torch.Tensor:
    """[-s1, s2] of sin = [s1, s2] (halves of the last dim)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope_tables(positions: torch.Tensor, s: Spec, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B,T] -> cos, sin [B,1,T,D] in `dtype` (computed in fp32, as transformers does)."""
    # Built on the host and sent asynchronously: torch.tensor(..., device=cuda) would synchronise the host.
    inv_freq = torch.tensor(s.inv_freq, dtype=torch.float32).to(positions.device, non_blocking=True)
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos() * s.rope_scale, emb.sin() * s.rope_scale
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]


def block(
    h: torch.Tensor, w: dict, attn: LayerAttention, s: Spec, lora: LoraSet | None = None
) -> torch.Tensor:
    B, T, _ = h.shape
    x = rms_norm(h, w["input_layernorm.weight"], s.eps)
    q = linear(x, w, "self_attn.q_proj", lora).view(B, T, s.heads, s.head_dim)
    k = linear(x, w, "self_attn.k_proj", lora).view(B, T, s.kv_heads, s.head_dim)
    v = linear(x, w, "self_attn.v_proj", lora).view(B, T, s.kv_heads, s.head_dim)
    if s.qk_norm:
        q = rms_norm(q, w["self_attn.q_norm.weight"], s.eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], s.eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B,heads,T,D]
    key = ("rope signed", h.dtype)
    if key not in attn.batch.memo:  # the same for every layer of the pass: compute once
        cos, sin = rope_tables(attn.batch.positions, s, h.dtype)
        attn.batch.memo[key] = cos, _signed(sin)
    cos, sin_signed = attn.batch.memo[key]
    q, k = _rope(q, cos, sin_signed), _rope(k, cos, sin_signed)
    o = attn(q, k, v).transpose(1, 2).reshape(B, T, s.heads * s.head_dim)
    h = _residual(h, linear(o, w, "self_attn.o_proj", lora))
    x = rms_norm(h, w["post_attention_layernorm.weight"], s.eps)
    gate = linear(x, w, "mlp.gate_proj", lora)  # a new tensor: the activation may overwrite it
    if s.act == "silu":
        act = F.silu(gate, inplace=True)
    else:
        act = F.gelu(gate, approximate="tanh" if "tanh" in s.act else "none")
    up = linear(x, w, "mlp.up_proj", lora)
    act = act.mul_(up) if act.dtype == up.dtype else act * up
    return _residual(h, linear(act, w, "mlp.down_proj", lora))


def _residual(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """h + y, written into y (a new tensor from a linear) when the dtypes allow: same bits, no allocation."""
    return y.add_(h) if y.dtype == h.dtype else h + y
