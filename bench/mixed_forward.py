"""What-if: a bf16 LoRA forward that keeps the perturbation's small effect out of some of its roundings.

A LoRA job's θ ± εz changes the bf16 activations by a little, and each bf16 rounding on the way adds noise
to the loss difference L+ - L- (bench/lora_precision.py). Three groups of roundings can be lifted here,
alone or together (KEEP, a comma list):

  head   the logits: the final norm and the head run in fp32 (the head's weight upcast on each call);
  resid  the residual stream: h is carried in fp32 from block to block; each norm's output is rounded to
         the weights' dtype for the matmuls that read it, as before;
  lora   the LoRA'd projections: y + Δy is added in fp32 (not rounded to bf16 first), and attention (q, k,
         v, scores, weights) runs in fp32; its output is rounded to bf16 for o_proj.

The engine is not changed: patch(keep) replaces the Llama family's `block` and `head` in this process only
(Llama-family models; an fp32 model runs the same arithmetic either way). Used by
`bench/lora_precision.py --keep KEEP`, and for a training run:

  python bench/mixed_forward.py KEEP train --model M --method lora ...   (zostream's CLI, patched)
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from zostream.engine.models import llama as L

KEEPS = ("head", "resid", "lora")


def _linear(x: torch.Tensor, w: dict, name: str, lora, keep: set[str]) -> torch.Tensor:
    """attention.linear, with y + Δy in fp32 under 'lora' (the engine rounds Δy to y's dtype first)."""
    y = F.linear(x, w[name + ".weight"], w.get(name + ".bias"))
    for ad in (lora or {}).get(name, []):
        xa = x if ad.rows is None else x[ad.rows]
        delta = F.linear(F.linear(xa.to(ad.A.dtype), ad.A), ad.B) * ad.scale  # fp32
        y, delta = (y.float(), delta) if "lora" in keep else (y, delta.to(y.dtype))
        y = y + delta if ad.rows is None else y.index_add(0, ad.rows, delta)
    return y


def _block(keep: set[str]):
    def block(h: torch.Tensor, w: dict, attn, s, lora=None) -> torch.Tensor:
        """llama.block's arithmetic, with the roundings in `keep` lifted (see the module docstring)."""
        wd = w["input_layernorm.weight"].dtype
        h = h.float() if "resid" in keep else h
        B, T, _ = h.shape
        x = L.rms_norm(h, w["input_layernorm.weight"], s.eps).to(wd)
        q, k, v = (_linear(x, w, f"self_attn.{p}_proj", lora, keep) for p in "qkv")
        if "lora" in keep:
            q, k, v = q.float(), k.float(), v.float()
        q = q.view(B, T, s.heads, s.head_dim).transpose(1, 2)  # [B,heads,T,D]
        k = k.view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(B, T, s.kv_heads, s.head_dim).transpose(1, 2)
        if s.qk_norm:
            q = L.rms_norm(q, w["self_attn.q_norm.weight"], s.eps)
            k = L.rms_norm(k, w["self_attn.k_norm.weight"], s.eps)
        cos, sin = L.rope_tables(attn.batch.positions, s, q.dtype)
        sin_signed = L._signed(sin)
        q, k = L._rope(q, cos, sin_signed), L._rope(k, cos, sin_signed)
        o = attn(q, k, v).transpose(1, 2).reshape(B, T, s.heads * s.head_dim)
        h = h + _linear(o.to(wd), w, "self_attn.o_proj", lora, keep)
        x = L.rms_norm(h, w["post_attention_layernorm.weight"], s.eps).to(wd)
        act = F.silu(_linear(x, w, "mlp.gate_proj", lora, keep)) * _linear(x, w, "mlp.up_proj", lora, keep)
        return h + _linear(act, w, "mlp.down_proj", lora, keep)

    return block


def _head(keep: set[str], engine_head):
    def head(h: torch.Tensor, outer: dict, s, out: torch.Tensor | None = None) -> torch.Tensor:
        """[..., H] -> logits [..., V]: fp32 under 'head'; else the engine's head on h rounded to bf16."""
        norm = outer["model.norm.weight"]
        if "head" not in keep:
            return engine_head(h.to(norm.dtype), outer, s, out)
        w = outer["model.embed_tokens.weight"] if s.tied else outer["lm_head.weight"]
        return F.linear(L.rms_norm(h.float(), norm.float(), s.eps), w.float())

    return head


def patch(keep: str) -> None:
    """Replace the Llama family's block and head per KEEP (a comma list of KEEPS; '' patches nothing)."""
    chosen = {k for k in keep.split(",") if k}
    if chosen - set(KEEPS):
        raise SystemExit(f"mixed_forward: KEEP must name some of {', '.join(KEEPS)}, got {keep!r}")
    if chosen:
        L.block, L.head = _block(chosen), _head(chosen, L.head)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    patch(sys.argv[1])
    from zostream.clients.cli import main

    sys.argv = ["zostream", *sys.argv[2:]]
    sys.exit(main())
