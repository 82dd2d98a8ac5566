"""Client-side CLI plumbing: connection flags, error reporting, and `zostream generate --server`.

Every remote command takes the same connection flags (add_connection_args), builds its client
with client_from_args and runs its body through `run`, which turns a ZostreamError into
`zostream CMD: error: STATUS: message` and exit code 1 (UNAVAILABLE: "cannot reach the server").
Results go to stdout, progress and errors to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from zostream.clients.cli import UsageError
from zostream.clients.client import GenerateResult, ZostreamClient, ZostreamError
from zostream.clients.common import _finite, print_json

DEFAULT_SERVER = "127.0.0.1:50051"
_HINTS = {
    "DEADLINE_EXCEEDED": " (raise --timeout)",
    "UNAUTHENTICATED": " (give the key with --api-key-file FILE or $ZOSTREAM_API_KEY)",
}


def add_connection_args(
    p: argparse.ArgumentParser, server: bool = True, timeout: float | None = 60.0
) -> None:
    """--server, --api-key-file, --tls-ca, --timeout. server=False when the command adds --server itself."""
    if server:
        p.add_argument(
            "--server",
            metavar="ADDR",
            default=None,
            help=f"server host:port (default: $ZOSTREAM_SERVER or {DEFAULT_SERVER})",
        )
    p.add_argument(
        "--api-key-file",
        metavar="FILE",
        default=None,
        help="file whose first line is the API key (default: $ZOSTREAM_API_KEY, else none)",
    )
    p.add_argument(
        "--tls-ca",
        metavar="PEM",
        default=None,
        help="connect with TLS, trusting this CA certificate (default: plaintext)",
    )
    what = f"default: {timeout:g}" if timeout else "default: none"
    p.add_argument(
        "--timeout",
        type=_timeout_arg,
        default=None,
        metavar="S",
        help=f"deadline of each call in seconds ({what})",
    )


def _timeout_arg(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return v


def server_address(args: argparse.Namespace) -> str:
    return getattr(args, "server", None) or os.environ.get("ZOSTREAM_SERVER") or DEFAULT_SERVER


def api_key(args: argparse.Namespace) -> str | None:
    """--api-key-file's first line, else args.api_key, else $ZOSTREAM_API_KEY, else None."""
    path = getattr(args, "api_key_file", None)
    if path:
        try:
            key = Path(path).read_text().splitlines()[0].strip()
        except (OSError, IndexError, UnicodeDecodeError) as exc:
            reason = "it is empty" if isinstance(exc, IndexError) else str(exc)
            raise UsageError(f"--api-key-file: cannot read a key from {path} ({reason})") from None
        if not key:
            raise UsageError(f"--api-key-file: the first line of {path} is empty")
        return key
    return getattr(args, "api_key", None) or os.environ.get("ZOSTREAM_API_KEY") or None


def client_from_args(args: argparse.Namespace, default_timeout: float | None = 60.0) -> ZostreamClient:
    """A client for the command's connection flags; default_timeout applies when --timeout is absent."""
    tls_ca = getattr(args, "tls_ca", None)
    if tls_ca and not Path(tls_ca).is_file():
        raise UsageError(f"--tls-ca: no such file: {tls_ca}")
    timeout = getattr(args, "timeout", None)
    try:
        return ZostreamClient(
            server_address(args),
            api_key=api_key(args),
            tls_ca=tls_ca,
            timeout=timeout if timeout is not None else default_timeout,
        )
    except OSError as exc:
        raise UsageError(f"--tls-ca: cannot read {tls_ca} ({exc})") from None


def report(command: str, args: argparse.Namespace, exc: ZostreamError) -> int:
    """Print a failed call as `zostream CMD: error: ...` on stderr; returns the exit code 1."""
    if exc.code == "UNAVAILABLE":
        msg = f"cannot reach the server at {server_address(args)} ({exc.message})"
    else:
        msg = f"{exc.code}: {exc.message}{_HINTS.get(exc.code, '')}"
    print(f"zostream {command}: error: {msg}", file=sys.stderr, flush=True)
    return 1


def run(
    command: str,
    args: argparse.Namespace,
    body: Callable[[ZostreamClient], int],
    default_timeout: float | None = 60.0,
) -> int:
    """Run `body(client)`; ZostreamError -> message and exit 1, OSError (local files) -> exit 1."""
    client = client_from_args(args, default_timeout)
    try:
        return int(body(client) or 0)
    except ZostreamError as exc:
        return report(command, args, exc)
    except OSError as exc:
        print(f"zostream {command}: error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        client.close()


def json_line(obj: Any) -> str:
    """One JSON document on one line (NaN/inf become null)."""
    return json.dumps(_finite(obj), separators=(", ", ": "))


# ---- zostream generate --server --------------------------------------------------------------
def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = getattr(args, "prompts", None) or getattr(args, "prompt", None) or []
    return [prompts] if isinstance(prompts, str) else list(prompts)


def _params(args: argparse.Namespace, i: int) -> dict[str, Any]:
    """GenerateRequest parameters of prompt i (seed S+i, as the in-process command does)."""
    seed = getattr(args, "seed", None)
    return {
        "max_new_tokens": getattr(args, "max_new_tokens", None) or 0,
        "temperature": getattr(args, "temperature", None),
        "top_p": getattr(args, "top_p", None),
        "top_k": getattr(args, "top_k", None),
        "repetition_penalty": getattr(args, "repetition_penalty", None),
        "seed": None if seed is None else (seed + i) % 2**63,
        "stop": list(getattr(args, "stop", None) or ()),
        "ignore_eos": bool(getattr(args, "ignore_eos", False)),
        "adapter_id": getattr(args, "adapter_id", None) or "",
    }


def _prompt_kwargs(args: argparse.Namespace, text: str) -> dict[str, Any]:
    system = getattr(args, "system", None)
    if not (getattr(args, "chat", False) or system is not None):
        return {"prompt": text}
    messages = [{"role": "system", "content": system}] if system is not None else []
    return {"messages": [*messages, {"role": "user", "content": text}]}


def result_json(r: GenerateResult) -> dict[str, Any]:
    """The fields the in-process `generate --json` prints."""
    return {
        "text": r.text,
        "token_ids": list(r.token_ids),
        "finish_reason": r.finish_reason,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "seed": r.seed,
    }


def generate(args: argparse.Namespace) -> int:
    """`zostream generate --server ADDR PROMPT...`: the in-process command's output, over gRPC.

    Several prompts are sent at once (the server batches them); --stream writes one prompt's text
    as it arrives. No deadline unless --timeout is given: a generation's length is bounded by
    --max-new-tokens, and a streamed model can be slow.
    """
    if getattr(args, "adapter", None):
        raise UsageError(
            "--adapter: a local adapter dir cannot be used with --server; import its update "
            "log with `zostream adapters import FILE` and pass --adapter-id ID"
        )
    prompts = _prompts(args)
    if not prompts:
        raise UsageError("PROMPT: give at least one prompt")
    stream, as_json = bool(getattr(args, "stream", False)), bool(getattr(args, "json", False))
    if stream and as_json:
        raise UsageError("--stream: cannot be combined with --json")
    if stream and len(prompts) > 1:
        raise UsageError("--stream: streams one PROMPT; give one prompt or drop --stream")

    def body(client: ZostreamClient) -> int:
        if stream:
            for chunk in client.generate_stream(**_prompt_kwargs(args, prompts[0]), **_params(args, 0)):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            return 0
        with ThreadPoolExecutor(max_workers=min(len(prompts), 16)) as pool:
            futures = [
                pool.submit(client.generate, **_prompt_kwargs(args, text), **_params(args, i))
                for i, text in enumerate(prompts)
            ]
            results = [f.result() for f in futures]  # the first failure (ZostreamError) propagates
        if as_json:
            objs = [result_json(r) for r in results]
            print_json(objs[0] if len(objs) == 1 else objs)
        else:
            sys.stdout.write("".join(r.text + "\n" for r in results))
            sys.stdout.flush()
        return 0

    return run("generate", args, body, default_timeout=None)
