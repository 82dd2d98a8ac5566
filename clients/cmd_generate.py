"""`zostream generate`: text generation in this process (or, with --server, over gRPC).

Several PROMPT arguments are one continuously batched run; prompt i uses seed S+i when --seed S
is given (otherwise the engine picks one per prompt and --json reports it).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from zostream import defaults
from zostream.clients.cli import UsageError
from zostream.clients.common import (
    add_json_arg,
    add_runtime_args,
    load_adapter,
    nonneg_float,
    nonneg_int,
    positive_float,
    positive_int,
    print_json,
    seed_int,
    unit_float,
    usage_error,
)

DEFAULT_MAX_NEW_TOKENS = defaults.MAX_NEW_TOKENS
MAX_BATCH = 8  # default KV-cache slots: more prompts wait and join as slots free (continuous batching)
_FLAGS = {
    "prompt": "PROMPT",
    "prompt_token_ids": "PROMPT",
    "adapter_id": "--adapter",
    "stop": "--stop",
    "seed": "--seed",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate text from a model dir (in-process) or a server (--server)",
        description="Generate text for one or more prompts. Greedy unless --temperature > 0. Several "
        "PROMPTs are batched together; the output is each completion followed by a newline (use --json "
        "to tell multi-line completions apart).",
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="prompt text; several prompts form a batch")
    p.add_argument("--model", metavar="DIR", help="Hugging Face model directory (safetensors + tokenizer)")
    p.add_argument("--server", metavar="ADDR", help="generate on a zostream server (host:port) instead")
    p.add_argument("--adapter", metavar="DIR", help="PEFT LoRA adapter directory to apply")
    p.add_argument(
        "--adapter-id",
        metavar="ID",
        default="",
        help="with --server: an adapter the server holds (a LoRA job's id, or an imported one), or "
        "JOB_ID:ckpt-step-N for step N of a LoRA job",
    )
    from zostream.clients.remote import add_connection_args

    add_connection_args(p, server=False, timeout=None)
    p.add_argument(
        "--chat", action="store_true", help="wrap each prompt as a user turn with the chat template"
    )
    p.add_argument("--system", metavar="TEXT", help="system message (implies --chat)")
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"default: {DEFAULT_MAX_NEW_TOKENS}, or what the model's positions leave after the prompt",
    )
    p.add_argument(
        "--temperature",
        type=nonneg_float,
        default=0.0,
        metavar="T",
        help="sampling temperature; 0 (default) is greedy",
    )
    p.add_argument(
        "--top-p", type=unit_float, default=1.0, metavar="P", help="nucleus sampling (default: 1, off)"
    )
    p.add_argument(
        "--top-k", type=nonneg_int, default=0, metavar="K", help="top-k sampling (default: 0, off)"
    )
    p.add_argument(
        "--repetition-penalty",
        type=positive_float,
        default=1.0,
        metavar="R",
        help="HF repetition penalty (default: 1, off)",
    )
    p.add_argument(
        "--seed",
        type=seed_int,
        default=None,
        metavar="S",
        help="sampling seed; prompt i uses S+i (default: random, reported by --json)",
    )
    p.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop when the output contains STR (repeatable)",
    )
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=MAX_BATCH,
        metavar="N",
        help=f"sequences decoded together (default: {MAX_BATCH})",
    )
    p.add_argument("--stream", action="store_true", help="write tokens to stdout as they are generated")
    add_runtime_args(p)
    add_json_arg(p, "one JSON object per prompt (a list when several)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.server:
        try:
            from zostream.clients import remote  # the gRPC client path
        except ModuleNotFoundError as exc:
            if exc.name != "zostream.clients.remote":
                raise
            raise UsageError("--server: this build has no gRPC client (zostream.clients.remote)") from None
        return int(remote.generate(args) or 0)
    if not args.model:
        raise UsageError("--model: required (a model directory), or --server ADDR")
    if args.stream and args.json:
        raise UsageError("--stream: cannot be combined with --json")
    if args.stream and len(args.prompts) > 1:
        raise UsageError("--stream: streams one PROMPT; give one prompt or drop --stream")
    _requests(args, args.max_new_tokens or 1)  # validates the sampling flags before the model is opened
    from zostream.clients.common import load_tokenizer, open_store

    store = open_store(args.model)
    tok = load_tokenizer(args.model)
    prompts = [_encode(tok, text, args.chat or args.system is not None, args.system) for text in args.prompts]
    for i, ids in enumerate(prompts):
        if not ids:
            raise UsageError(f"PROMPT {i + 1}: the prompt is empty after tokenisation")
    max_new = args.max_new_tokens
    if max_new is None:  # the default never exceeds what the model's positions leave
        max_new = max(1, min(DEFAULT_MAX_NEW_TOKENS, store.spec.max_positions - max(map(len, prompts))))
    requests = _requests(args, max_new)
    for r, ids in zip(requests, prompts, strict=True):
        r.prompt_ids = ids
    engine = _open(args, tok, prompts, max_new, store.spec.max_positions)
    if args.adapter:
        engine.adapters["cli"] = load_adapter(args.adapter, engine)
        for r in requests:
            r.adapter_id = "cli"
    if args.stream:
        requests[0].callback = _write_stream
    try:
        finals = engine.generate(requests)
    except ValueError as exc:  # RequestError from submit: a limit or an out-of-range token id
        raise usage_error(exc, _FLAGS, "PROMPT") from None
    return _report(args, [finals[r.request_id] for r in requests])


def _requests(args: argparse.Namespace, max_new_tokens: int) -> list[Any]:
    from zostream.engine.generation import GenerateRequest, StopParams
    from zostream.engine.sampling import SamplingParams

    out = []
    try:
        for i in range(len(args.prompts)):
            sp = SamplingParams(
                temperature=args.temperature,
                top_k=args.top_k,
                top_p=args.top_p,
                repetition_penalty=args.repetition_penalty,
                seed=None if args.seed is None else (args.seed + i) % 2**63,
            )
            st = StopParams(max_new_tokens=max_new_tokens, stop=tuple(args.stop), ignore_eos=args.ignore_eos)
            out.append(GenerateRequest(str(i), [], sp, st))
    except ValueError as exc:
        raise usage_error(exc, _FLAGS) from None
    return out


def _encode(tok: Any, text: str, chat: bool, system: str | None) -> list[int]:
    """Token ids of one prompt: plain (the tokenizer's special prefix) or rendered as a chat turn."""
    if not chat:
        return list(tok(text)["input_ids"])
    if not getattr(tok, "chat_template", None):
        raise UsageError("--chat: this model's tokenizer has no chat template; drop --chat and --system")
    msgs = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": text}
    ]
    rendered = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return list(tok(rendered, add_special_tokens=False)["input_ids"])


def _open(
    args: argparse.Namespace, tok: Any, prompts: list[list[int]], max_new: int, max_positions: int
) -> Any:
    """An engine whose KV cache holds exactly what this request needs."""
    from zostream.clients.common import open_engine
    from zostream.engine.config import LimitsConfig

    longest = max(len(p) for p in prompts)
    need = longest + max_new
    if need > max_positions:
        raise UsageError(
            f"--max-new-tokens: the longest prompt ({longest} tokens) + {max_new} new tokens "
            f"exceeds the model's {max_positions} positions"
        )
    limits = LimitsConfig(
        max_batch=min(len(prompts), args.max_batch),
        max_seq_len=need,
        max_new_tokens=max_new,
        max_waiting=len(prompts),
        max_prefill_tokens=max(longest, min(sum(len(p) for p in prompts), 8192)),
    )
    return open_engine(args, limits, tokenizer=tok)


def _write_stream(ev: Any) -> None:
    if ev.text:
        sys.stdout.write(ev.text)
        sys.stdout.flush()


def _report(args: argparse.Namespace, events: list[Any]) -> int:
    from zostream.engine.generation import FinishReason

    failed = [ev for ev in events if ev.finish_reason is FinishReason.ERROR]
    for ev in failed:
        print(f"zostream generate: error: prompt {int(ev.request_id) + 1}: {ev.error}", file=sys.stderr)
    if args.json:
        objs = [
            {
                "text": ev.text,
                "token_ids": list(ev.token_ids),
                "finish_reason": ev.finish_reason.value if ev.finish_reason else None,
                "prompt_tokens": ev.prompt_tokens,
                "completion_tokens": ev.completion_tokens,
                "seed": ev.seed,
            }
            | ({"error": ev.error} if ev.error else {})
            for ev in events
        ]
        print_json(objs[0] if len(objs) == 1 else objs)
    elif args.stream:
        sys.stdout.write("\n")
    else:
        for ev in events:
            sys.stdout.write(ev.text + "\n")
    sys.stdout.flush()
    return 1 if failed else 0
