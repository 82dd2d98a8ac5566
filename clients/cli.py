"""The `zostream` command: one subcommand module per area, each with `register(subparsers)`.

Exit codes: 0 ok, 1 runtime failure, 2 usage / bad input (argparse convention), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules; each defines `register(subparsers) -> None` and sets `func` on its parsers.
_COMMANDS = (
    "cmd_model",
    "cmd_generate",
    "cmd_train",
    "cmd_eval",
    "cmd_log",
    "cmd_serve",
    "cmd_jobs",
    "cmd_adapters",
    "cmd_datasets",
)


# Top-level modules of the `engine` extra (pyproject.toml): a client-only install has none of them.
ENGINE_MODULES = frozenset(
    {
        "torch",
        "transformers",
        "safetensors",
        "tokenizers",
        "jinja2",
        "numpy",
        "numba",
        "grpc_reflection",
        "prometheus_client",
        "tqdm",
        "platformdirs",
        "starlette",
        "uvicorn",
        "multipart",
    }
)


class UsageError(Exception):
    """Bad arguments or input discovered after parsing: exit code 2 with the message."""


def build_parser() -> argparse.ArgumentParser:
    from zostream import __version__

    parser = argparse.ArgumentParser(
        prog="zostream",
        description="Stream a huge LLM through one GPU: generation and zeroth-order fine-tuning.",
    )
    parser.add_argument("--version", action="version", version=f"zostream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"zostream.clients.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"zostream.clients.{name}":
                continue  # not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"zostream {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        if (exc.name or "").partition(".")[0] not in ENGINE_MODULES:
            raise
        print(
            f"zostream {args.command}: error: this command runs the model in this process and needs the "
            f"engine (module {exc.name} is missing): pip install 'zostream[engine]' (torch first, see the "
            "README); a client-only install talks to a server: the commands with --server",
            file=sys.stderr,
        )
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"zostream {args.command}: error: {exc}", file=sys.stderr)
        return 2
