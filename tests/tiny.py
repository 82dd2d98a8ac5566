"""Tiny random Hugging Face models written to real safetensors directories (no network)."""

from __future__ import annotations

from pathlib import Path

import torch

TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
    "llama_tied": dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=101,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    ),
    "llama3_rope": dict(
        model_type="llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        vocab_size=101,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=32,
        ),
    ),
    "mistral": dict(
        model_type="mistral",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=128,
        sliding_window=None,
    ),
    "qwen2": dict(
        model_type="qwen2",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    ),
    "qwen3": dict(
        model_type="qwen3",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=101,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
    "opt": dict(
        model_type="opt",
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        vocab_size=101,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        do_layer_norm_before=True,
    ),
    "opt_proj": dict(
        model_type="opt",
        hidden_size=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=101,
        max_position_embeddings=128,
        word_embed_proj_dim=16,
        do_layer_norm_before=False,
    ),
}


def build_hf_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY_CONFIGS[name])
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # HF init is tiny-std; widen it so layers matter in parity tests
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.2 if p.dim() > 1 else 0.05)
    model = model.to(dtype).eval()
    return model


def make_tiny_model(root: Path, name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Save a tiny random model of family config `name` under root/name; return the directory."""
    out = Path(root) / f"{name}-{seed}-{str(dtype).split('.')[-1]}"
    if (out / "config.json").exists():
        return out
    build_hf_model(name, seed, dtype).save_pretrained(out)
    return out
