"""Shared pieces of the in-process CLI commands: argument types, runtime flags, errors, JSON.

Conventions (see cli.py): results go to stdout, progress and warnings to stderr; bad input
raises `UsageError` (exit 2) with a one-line message that names the flag or file.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from typing import Any

from zostream.clients.cli import UsageError
from zostream.engine.config import CODECS, COMPUTE_DTYPES, parse_size

DEVICE_RE = re.compile(r"auto|cpu|emu|cuda(:\d+)?")


# ---- argument types (argparse turns ArgumentTypeError into "argument --flag: msg", exit 2) --------
def size_arg(text: str) -> int | None:
    """--gpu-memory: '24GiB', '512MB', '0' (stream every block) or 'auto' (None)."""
    try:
        return parse_size(text, "size")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("size: ")) from None


def _number(
    kind: type, low: float | None, high: float | None, low_open: bool = False, what: str = ""
) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if isinstance(v, float) and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if low is not None and (v <= low if low_open else v < low):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if high is not None and v > high:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return v

    parse.__name__ = what  # argparse names the type in its messages
    return parse


positive_int = _number(int, 1, None, what="an integer >= 1")
nonneg_int = _number(int, 0, None, what="an integer >= 0")
positive_float = _number(float, 0.0, None, low_open=True, what="a number > 0")
nonneg_float = _number(float, 0.0, None, what="a number >= 0")
unit_float = _number(float, 0.0, 1.0, low_open=True, what="a number in (0, 1]")
seed_int = _number(int, 0, 2**63 - 1, what="an integer in [0, 2^63)")


def device_arg(text: str) -> str:
    if not DEVICE_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, emu, cuda or cuda:N, got {text!r}")
    return text


def add_runtime_args(p: argparse.ArgumentParser, codec: bool = True, gpu_memory: bool = True) -> None:
    """--device, --dtype and (optionally) --gpu-memory / --codec, shared by every in-process command."""
    p.add_argument(
        "--device",
        type=device_arg,
        default="auto",
        metavar="auto|cpu|emu|cuda[:N]",
        help="compute device (default: auto, CUDA when available; emu: CPU memory playing a GPU)",
    )
    p.add_argument(
        "--dtype",
        choices=COMPUTE_DTYPES,
        default="auto",
        help="compute dtype (default: auto, the model's dtype; float32 on a CPU without fast kernels for it)",
    )
    if gpu_memory:
        p.add_argument(
            "--gpu-memory",
            type=size_arg,
            default=None,
            metavar="SIZE",
            help="device memory budget for weights, e.g. 24GiB; 0 streams every block "
            "(default: keep every block resident)",
        )
        p.add_argument(
            "--host-memory",
            type=size_arg,
            default=None,
            metavar="SIZE",
            help="host RAM budget for the base, e.g. 16GiB: blocks beyond it are read from disk each "
            "pass, read ahead and dropped behind; 0 reads every block from disk (default: no limit)",
        )
    if codec:
        p.add_argument(
            "--codec",
            choices=CODECS,
            default="none",
            help="transfer codec for the frozen base (default: none)",
        )


def add_json_arg(p: argparse.ArgumentParser, what: str = "one JSON object") -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} on stdout instead of text")


# ---- errors ---------------------------------------------------------------------------------
def flag(field: str) -> str:
    """Engine field name -> CLI flag: 'max_new_tokens' -> '--max-new-tokens'."""
    return "--" + field.replace("_", "-")


_FIELD_PREFIX = re.compile(r"^([a-z_][a-z0-9_]*): ")


def usage_error(exc: Exception, flags: dict[str, str] | None = None, default: str = "") -> UsageError:
    """A config / request error as a UsageError that names the flag.

    The field comes from RequestError.field or from a leading "field: " in the message (the
    config dataclasses' convention); `flags` maps fields whose flag is not simply --field-name.
    """
    msg = str(exc)
    field = getattr(exc, "field", "") or ""
    m = _FIELD_PREFIX.match(msg)
    if m and (not field or m.group(1) == field):
        field, msg = m.group(1), msg[m.end() :]
    elif field and msg.startswith(field + ": "):
        msg = msg[len(field) + 2 :]
    name = (flags or {}).get(field) or (flag(field) if field else default)
    return UsageError(f"{name}: {msg}" if name else msg)


def check_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device: {device} was asked for but CUDA is not available; use --device cpu")


def load_tokenizer(model_dir: str) -> Any:
    """The model dir's tokenizer (local files only); UsageError naming --model when it has none."""
    from zostream.engine.engine_setup import load_tokenizer as _load

    try:
        return _load(model_dir)
    except (
        Exception
    ) as exc:  # transformers raises OSError / ValueError / KeyError depending on what is missing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"--model: cannot load a tokenizer from {model_dir} ({first})") from None


def open_engine(args: argparse.Namespace, limits: Any, tokenizer: Any = None) -> Any:
    """An Engine for the command's --model / --device / --dtype / --gpu-memory / --codec."""
    from zostream.engine.config import CodecConfig, EngineConfig, StreamConfig
    from zostream.engine.engine import Engine
    from zostream.engine.errors import ModelError

    check_device(args.device)
    try:
        cfg = EngineConfig(
            model_dir=str(args.model),
            device=args.device,
            compute_dtype=args.dtype,
            stream=StreamConfig(
                gpu_memory_bytes=getattr(args, "gpu_memory", None),
                host_memory_bytes=getattr(args, "host_memory", None),
            ),
            codec=CodecConfig(name=getattr(args, "codec", "none")),
            limits=limits,
        )
    except ValueError as exc:
        raise usage_error(
            exc,
            {
                "model_dir": "--model",
                "compute_dtype": "--dtype",
                "gpu_memory": "--gpu-memory",
                "host_memory": "--host-memory",
                "name": "--codec",
            },
        ) from None
    if tokenizer is None:
        open_store(str(args.model))  # a bad dir is reported before the tokenizer's less clear error
        tokenizer = load_tokenizer(str(args.model))
    try:
        return Engine(cfg, tokenizer=tokenizer)
    except ModelError as exc:
        raise UsageError(f"--model: {exc}") from None


def open_store(model_dir: str) -> Any:
    """WeightStore (headers only, no weights read); UsageError naming --model on a bad dir."""
    from zostream.engine.errors import ModelError
    from zostream.engine.store import WeightStore

    try:
        return WeightStore(model_dir)
    except ModelError as exc:
        raise UsageError(f"--model: {exc}") from None


def load_adapter(adapter_dir: str, engine: Any) -> Any:
    """A PEFT LoRA adapter dir on the engine's device; UsageError naming --adapter when it is not one."""
    from zostream.engine.peft import LoraAdapter

    try:
        return LoraAdapter.load_peft(adapter_dir, engine.family, engine.spec, engine.device)
    except (OSError, KeyError, ValueError) as exc:  # RequestError is a ValueError
        msg = str(exc).removeprefix("adapter: ")
        raise UsageError(
            f"--adapter: {msg}" if str(adapter_dir) in msg else f"--adapter: {adapter_dir}: {msg}"
        ) from None


# ---- output ---------------------------------------------------------------------------------
def print_json(obj: Any) -> None:
    """One JSON document on one stdout line (NaN/inf become null); local and remote commands share it."""
    print(json.dumps(_finite(obj), separators=(", ", ": ")), flush=True)


def _finite(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def warn(command: str, msg: str) -> None:
    print(f"zostream {command}: {msg}", file=sys.stderr, flush=True)


def add_kv_args(p: argparse.ArgumentParser) -> None:
    """The batch and KV-cache limits `serve` takes (and `model info`, whose plan depends on them)."""
    from zostream import defaults

    p.add_argument("--max-batch", type=positive_int, default=16, help="concurrent sequences (default 16)")
    p.add_argument(
        "--max-seq-len",
        type=positive_int,
        default=defaults.SERVER_MAX_SEQ_LEN,
        help=f"longest prompt + generation (default {defaults.SERVER_MAX_SEQ_LEN})",
    )
    p.add_argument(
        "--kv-memory",
        type=size_arg,
        default=None,
        metavar="SIZE",
        help="paged KV cache size; requests wait while its blocks are taken "
        "(default auto: max-batch full sequences, at most half of --gpu-memory)",
    )
    p.add_argument(
        "--kv-offload",
        action="store_true",
        help="keep streamed layers' KV in host memory, copied to the device with the layer's weights "
        "(the device then holds resident layers' KV and one staging pool per streaming slot)",
    )
