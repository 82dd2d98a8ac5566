"""What `zostream model info` computes, from the safetensors headers alone: sizes, bytes per block (packed
by a codec), the residency plan for a GPU budget, the KV pool, the host tier's disk reads and the
predicted seconds per pass. Printing is clients/cmd_model.py's."""

from __future__ import annotations

FITS_WARNING = "fits in the GPU budget: every block stays resident; streaming buys nothing"


def model_info(
    model_dir: str,
    gpu_memory: int | None,
    link_gbps: float,
    codec: str = "none",
    dtype: str = "auto",
    max_batch: int = 16,
    max_seq_len: int = 2048,
    kv_memory: int | None = None,
    host_memory: int | None = None,
    disk_gbps: float | None = None,
    kv_offload: bool = False,
) -> dict:
    """The facts `zostream model info` prints, from the safetensors headers alone."""
    import math

    import torch

    from zostream.clients.common import open_store
    from zostream.engine.config import CodecConfig, LimitsConfig, StreamConfig
    from zostream.engine.kv_cache import kv_bytes_per_token, plan_kv
    from zostream.engine.residency import plan_residency

    store = open_store(model_dir)
    fam, spec = store.family, store.spec
    compute = store.dtype if dtype == "auto" else getattr(torch, dtype)
    n = store.num_layers
    block_bytes = [store.block_nbytes(i) for i in range(n)]
    dense = [
        {
            local: (
                store.infos[fam.layer_prefix(i) + local].shape,
                store.infos[fam.layer_prefix(i) + local].dtype,
            )
            for local in fam.block_tensors(spec)
        }
        for i in range(n)
    ]
    packed = block_bytes if codec == "none" else [_packed_nbytes(codec, d) for d in dense]
    decoded = [sum(math.prod(s) for s, _ in d.values()) * compute.itemsize for d in dense]
    outer = sum(math.prod(store.infos[name].shape) for name in fam.outer_tensors(spec)) * compute.itemsize
    depth = StreamConfig().prefetch_depth
    rate = link_gbps * 1e9
    out = {
        "model": str(store.dir),
        "family": spec.family,
        "model_type": spec.model_type,
        "layers": n,
        "parameters": store.num_parameters(),
        "dtype": str(store.dtype).removeprefix("torch."),
        "compute_dtype": str(compute).removeprefix("torch."),
        "bytes_per_block": max(block_bytes, default=0),
        "block_bytes": block_bytes,
        "outer_bytes": store.outer_nbytes(),
        "codec": CodecConfig(name=codec).name,
        "packed_bytes_per_block": max(packed, default=0),
        "packed_block_bytes": packed,
        "link_gbps": link_gbps,
        "all_streamed_bytes_per_pass": sum(packed),
        "all_streamed_seconds_per_pass": sum(packed) / rate,
        "budget_bytes": gpu_memory,
        "prefetch_depth": depth,
        "warnings": [],
    }
    # The paged KV cache comes out of the budget first; the weights' plan gets the rest
    # (engine_setup.plan_kv_and_stream).
    max_seq_len = min(max_seq_len, spec.max_positions)
    per_token = kv_bytes_per_token(n, getattr(spec, "kv_heads", spec.heads), spec.head_dim, compute.itemsize)
    share = depth / n if kv_offload else 1.0  # offloaded: depth staging pools on the device
    bs = LimitsConfig().kv_block_size
    fixed = outer + depth * max(packed, default=0) + max(decoded, default=0)  # outer + streaming slots
    kv = plan_kv(per_token, bs, max_batch, max_seq_len, kv_memory, gpu_memory, share, fixed)
    out |= {
        "kv_bytes_per_token": per_token,
        "kv_block_size": kv.block_size,
        "kv_blocks": kv.num_blocks,
        "kv_bytes": kv.nbytes,
        "kv_tokens": kv.tokens,  # concurrent tokens (prompts + generated, all sequences) the budget holds
        "kv_full_sequences": kv.tokens // max_seq_len,
        "max_seq_len": max_seq_len,
    }
    layer_kv = kv.nbytes // n
    device_kv = depth * layer_kv if kv_offload else kv.nbytes
    weights_budget = max(0, gpu_memory - device_kv) if gpu_memory else gpu_memory
    # offloaded: a resident block keeps its layer's pool on the device (engine: resident_extra_bytes)
    plan = plan_residency(
        packed, [d + layer_kv for d in decoded] if kv_offload else decoded, outer, weights_budget, depth
    )
    streamed = sum(packed[i] for i in plan.streamed)
    offloaded = len(plan.streamed) if kv_offload and plan.streamed else 0
    out |= {
        "kv_offload": bool(offloaded),
        "kv_device_bytes": kv.nbytes - offloaded * layer_kv + (depth * layer_kv if offloaded else 0),
        "kv_host_bytes": offloaded * layer_kv,
        # what a decode pass moves for the offloaded layers with the pool full (up; new rows come back)
        "kv_streamed_bytes_per_pass_full": offloaded * layer_kv,
    }
    out |= {
        "resident_blocks": list(plan.resident),
        "streamed_blocks": list(plan.streamed),
        "resident_bytes": plan.resident_bytes + outer,
        "slot_bytes": plan.slot_bytes,
        "streamed_bytes_per_pass": streamed,
        "seconds_per_pass": streamed / rate,
        "fits": gpu_memory is not None and plan.all_resident,
    }
    out |= _disk_plan(store, packed, plan, outer, host_memory, disk_gbps, depth, rate)
    if out["fits"]:
        out["warnings"].append(FITS_WARNING)
    if gpu_memory:
        # plan.resident_bytes already holds resident layers' KV pools when offloaded
        kv_dev = depth * layer_kv if offloaded else (0 if kv_offload else kv.nbytes)
        slots = depth * plan.slot_bytes + (max(decoded) if plan.streamed else 0)
        need = outer + plan.resident_bytes + slots + kv_dev
        if need > gpu_memory:
            out["warnings"].append(
                f"the plan needs {need:,} device bytes, more than the {gpu_memory:,} budget "
                f"(KV on the device {kv_dev:,}); use --kv-offload, a codec, or lower --max-seq-len / "
                "--kv-memory"
            )
    return out


def _disk_plan(store, packed, plan, outer, host_memory, disk_gbps, depth, link_rate) -> dict:
    """The host tier's plan: which blocks are read from disk every pass, and the predicted pass time
    = max(link time, disk time) (readahead overlaps the two)."""
    from zostream.engine.host_tier import measure_read_rate, plan_host

    # Blocks kept on the device are read from the host once; a CPU engine (no budget) reads all.
    gpu_resident = set(plan.resident) if plan.budget is not None else set()
    sizes = [0 if i in gpu_resident else packed[i] for i in range(len(packed))]
    host = plan_host(sizes, outer, host_memory, depth)
    disk_bytes = sum(sizes[i] for i in host.streamed)
    out = {
        "host_budget_bytes": host_memory,
        "host_resident_blocks": [i for i in host.resident if i not in gpu_resident],
        "disk_blocks": list(host.streamed),
        "disk_bytes_per_pass": disk_bytes,
        "disk_gbps": disk_gbps,
        "disk_rate_measured": False,
        "link_seconds_per_pass": sum(packed[i] for i in plan.streamed) / link_rate,
    }
    if host_memory is not None and disk_gbps is None:
        files = sorted({info.file for info in store.infos.values()})
        m = measure_read_rate(files)
        out["disk_gbps"] = m["bytes_per_second"] / 1e9
        out["disk_rate_measured"] = True
    rate = (out["disk_gbps"] or 0) * 1e9
    out["disk_seconds_per_pass"] = disk_bytes / rate if rate else 0.0
    out["seconds_per_pass"] = max(out["link_seconds_per_pass"], out["disk_seconds_per_pass"])
    return out


def _packed_nbytes(codec: str, dense: dict) -> int:
    """Bytes of one block on the link under a lossy codec (only 2-D linear weights are encoded)."""
    import math

    from zostream.engine.codecs import block_layout, get_codec
    from zostream.engine.config import CodecConfig

    layout = block_layout(get_codec(CodecConfig(name=codec)), dense)
    return sum(math.prod(shape) * dt.itemsize for shape, dt in layout.values())
