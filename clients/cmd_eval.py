"""`zostream eval`: loss (and accuracy for choice records) of a model or adapter on a JSONL dataset."""

from __future__ import annotations

import argparse
import math

from zostream.clients.cmd_train import LIMITS, load_data, pad_id
from zostream.clients.common import (
    add_json_arg,
    add_runtime_args,
    load_adapter,
    load_tokenizer,
    open_engine,
    open_store,
    positive_int,
    print_json,
)


def register(sub: argparse._SubParsersAction) -> None:
    _register_eval(sub)


def _register_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="loss (and accuracy for choice datasets) of a model or adapter on a JSONL dataset",
        description="Mean token loss over --data; length-normalised multiple-choice accuracy for choice "
        "records.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="model directory")
    p.add_argument("--adapter", metavar="DIR", help="PEFT LoRA adapter directory to apply")
    p.add_argument("--data", required=True, metavar="FILE", help="evaluation JSONL")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="default: 8")
    p.add_argument("--max-len", type=positive_int, default=1024, metavar="N", help="tokens per example")
    add_runtime_args(p)
    add_json_arg(p)
    p.set_defaults(func=evaluate)


def evaluate(args: argparse.Namespace) -> int:
    from zostream.engine.config import LimitsConfig
    from zostream.engine.evaluation import evaluate as run_eval

    store = open_store(args.model)
    del store  # opened first so that a bad dir is reported as such
    tok = load_tokenizer(args.model)
    ds = load_data(args.data, tok, args.max_len, "--data")
    eng = open_engine(args, LimitsConfig(**LIMITS), tokenizer=tok)
    lora_fn = None
    if args.adapter:
        ad = load_adapter(args.adapter, eng)
        lora_fn = lambda i: {m: [lw] for m, lw in ad.layer(i).items()}  # noqa: E731
    res = run_eval(eng.family, eng.spec, eng.streamer, ds, pad_id(tok), eng.device, lora_fn, args.batch_size)
    res = {
        "loss": res["loss"],
        "perplexity": math.exp(min(res["loss"], 700.0)),
        "accuracy": res.get("accuracy"),
        "examples": len(ds.choices or ds.examples),
        "data": str(args.data),
    }
    if args.json:
        print_json(res)
    else:
        print(f"loss        {res['loss']:.6f}")
        print(f"perplexity  {res['perplexity']:.4f}")
        if res["accuracy"] is not None:
            print(f"accuracy    {res['accuracy']:.4f}")
        print(f"examples    {res['examples']}")
    return 0
