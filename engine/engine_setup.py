"""What the engine is built from: the compute device, the tokenizer, the codec, the KV pool's plan and
memory, and the base streamer. `Engine.__init__` calls these once; `zostream` commands that need only a
device or a tokenizer call them directly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from typing import Any

import torch

from .config import EngineConfig
from .errors import RequestError
from .kv_cache import KVPlan, PagedKVCache, kv_bytes_per_token, plan_kv
from .store import WeightStore
from .streamer import LayerStreamer

log = logging.getLogger("zostream.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """The compute device; "emu" computes on the CPU (its emulated memory: emu_device(name))."""
    if name == "emu":
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RequestError("device cuda was asked for but CUDA is not available; use --device cpu", "device")
    return dev


def cpu_has_fast_kernels(dtype: torch.dtype) -> bool:
    """Whether this CPU's torch has oneDNN kernels for `dtype` matrix products (bf16: AVX-512 or Arm
    BF16; fp16: AVX-512 FP16 or AMX-FP16). Without them torch multiplies bf16 / fp16 through a
    reference path: 1.5 GFLOP/s against fp32's 108 on a 2-core AVX2-only EPYC Zen 3 (bench/cpu_dtype.py)."""
    probe = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    if dtype not in probe:
        return True
    try:
        return bool(getattr(torch.ops.mkldnn, probe[dtype])())
    except (AttributeError, RuntimeError):  # a torch without the probe: keep the model's dtype
        return True


def ram_bytes() -> int:
    """Physical memory of this machine (0 when the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def compute_dtype(
    name: str, model_dtype: torch.dtype, device: str, num_params: int = 0, host_memory: int | None = None
) -> torch.dtype:
    """The dtype blocks are computed in for --dtype `name` on --device `device`. "auto": the model's
    dtype, except on the CPU (--device cpu, or auto without CUDA) when it has no fast kernels for it:
    float32 there, as transformers computes on a CPU, if the float32 copies of the weights (`num_params`
    x 4 bytes; the mmap'd weights themselves are used without a copy only in the model's dtype) take at
    most half the machine's RAM and no --host-memory budget asks for a base larger than RAM. The
    emulated device stands for a GPU, so it computes in the model's dtype wherever it runs."""
    if name != "auto":
        return DTYPES[name]
    on_cpu = device != "emu" and resolve_device(device).type == "cpu"
    if on_cpu and model_dtype != torch.float32 and not cpu_has_fast_kernels(model_dtype):
        if host_memory is None and num_params * 4 <= ram_bytes() // 2:
            return torch.float32
        why = (
            "float32 copies of the weights would take over half the RAM"
            if host_memory is None
            else "--host-memory reads the base from disk in place, which float32 copies would not"
        )
        log.warning(
            "computing in %s, which this CPU multiplies slowly (no AVX-512): %s; --dtype float32 forces it",
            str(model_dtype).removeprefix("torch."),
            why,
        )
    return model_dtype


def emu_device(name: str) -> Any:
    """The process's emulated device for --device emu, else None."""
    if name != "emu":
        return None
    from .emu import shared_device

    return shared_device()


def load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def eos_ids(tokenizer: Any, raw_config: dict) -> set[int]:
    """End-of-sequence token ids: the model config's and the tokenizer's."""
    ids: set[int] = set()
    for src in (raw_config.get("eos_token_id"), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, list):
            ids.update(int(x) for x in src)
    return ids


def open_codec(store: WeightStore, cfg: EngineConfig, device: torch.device):
    """(codec, its cache of packed blocks), or (None, None) for the raw weights."""
    if cfg.codec.name == "none":
        return None, None
    from .codec_cache import open_codec_cache
    from .codecs import get_codec

    codec = get_codec(cfg.codec)
    return codec, open_codec_cache(store, cfg.codec, device=device if device.type == "cuda" else None)


def streaming_floor_bytes(store: WeightStore, codec_cache: Any, dtype: torch.dtype, stream: Any) -> int:
    """Outer weights + streaming slots + one decoded block: what any plan keeps on the device."""
    st, n, item = store, store.num_layers, dtype.itemsize
    packed = codec_cache.block_nbytes if codec_cache is not None else st.block_nbytes
    decoded = max((sum(t.numel() for t in st.block(i).values()) * item for i in range(n)), default=0)
    outer = sum(t.numel() for t in st.outer().values()) * item
    return outer + stream.prefetch_depth * max((packed(i) for i in range(n)), default=0) + decoded


def plan_kv_and_stream(
    spec: Any, dtype: torch.dtype, lim: Any, stream: Any, fixed: int = 0
) -> tuple[KVPlan, Any]:
    """The KV pool's plan, and the stream config whose budget is what the pool leaves for weights.
    fixed: device bytes the weights need whatever the plan (outer weights and streaming slots)."""
    kv_heads = getattr(spec, "kv_heads", spec.heads)
    per_token = kv_bytes_per_token(spec.num_layers, kv_heads, spec.head_dim, dtype.itemsize)
    budget = stream.gpu_memory_bytes
    share = stream.prefetch_depth / spec.num_layers if lim.kv_offload else 1.0
    plan = plan_kv(
        per_token,
        lim.kv_block_size,
        lim.max_batch,
        lim.max_seq_len,
        lim.kv_memory_bytes,
        budget,
        share,
        fixed,
    )
    if budget:  # None: "auto" measures free memory after the pool exists; 0: every block streams anyway
        # Offloaded: the device holds a staging pool per streaming slot (resident layers' pools are
        # charged to their blocks by the streamer's plan); otherwise every layer's pool.
        layer = plan.nbytes // spec.num_layers
        device_kv = stream.prefetch_depth * layer if lim.kv_offload else plan.nbytes
        stream = dataclasses.replace(stream, gpu_memory_bytes=max(0, budget - device_kv))
    return plan, stream


def allocate_kv(
    spec: Any,
    kv_plan: KVPlan,
    dtype: torch.dtype,
    device: torch.device,
    emu: Any,
    alloc: Callable[[int, int], torch.Tensor] | None = None,
) -> PagedKVCache:
    """Every layer's KV pool; on emu (an emu.EmuDevice) the pools are its counted device memory."""
    if alloc is None and emu is not None:
        alloc = lambda _i, n: emu.empty(n)  # noqa: E731 - the pools are emulated device memory, counted
    return PagedKVCache.allocate(
        spec.num_layers,
        kv_plan.num_blocks,
        kv_plan.block_size,
        getattr(spec, "kv_heads", spec.heads),
        spec.head_dim,
        dtype,
        device,
        alloc,
    )


def allocate_kv_offloaded(
    spec: Any, kv_plan: KVPlan, dtype: torch.dtype, device: torch.device, emu: Any, s: LayerStreamer
) -> PagedKVCache:
    """Streamed layers' pools in host memory, the rest on the device, and the KVOffload between them.
    Without a copying device (the direct CPU path) there is nothing to offload to."""
    from .kv_offload import KVOffload

    if not (s.copies and s.plan.streamed):
        return allocate_kv(spec, kv_plan, dtype, device, emu)
    streamed = set(s.plan.streamed)
    cache = allocate_kv(
        spec, kv_plan, dtype, device, emu, lambda i, n: s.dev.pinned(n) if i in streamed else s.dev.empty(n)
    )
    cache.offload = KVOffload(cache, s.plan.streamed, s.dev, s.depth)
    s.kv_travel = cache.offload
    return cache


def base_streamer(
    store: WeightStore,
    device: torch.device,
    dtype: torch.dtype,
    stream_cfg: Any,
    emu: Any,
    codec: Any,
    codec_cache: Any,
    resident_extra_bytes: int = 0,
) -> LayerStreamer:
    """The frozen base every generation pass and LoRA job reads (decoded by the codec, if any)."""
    extra = dict(resident_extra_bytes=resident_extra_bytes)
    if codec_cache is None:
        return LayerStreamer(store, device, dtype, stream_cfg, emu=emu, **extra)
    from .codecs import decode_block

    cc = codec_cache
    return LayerStreamer(
        store,
        device,
        dtype,
        stream_cfg,
        source=cc.block,
        decoder=lambda packed, dev, dt: decode_block(codec, packed, dev, dt),
        emu=emu,
        **extra,
    )
