"""`zostream adapters ...`: the adapters a zostream server holds (list, get, delete, export, import,
download, import-peft).

An adapter's update log (a few bytes per step) is its portable form: `export` downloads it,
`import` registers one made on another server with the same base model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from zostream.clients.cli import UsageError
from zostream.clients.client import ZostreamClient
from zostream.clients.common import nonneg_int
from zostream.clients.formatting import print_table, short
from zostream.clients.remote import add_connection_args, print_json, run


def register(sub: argparse._SubParsersAction) -> None:
    ad = sub.add_parser("adapters", help="adapters on a server (list, get, delete, export, import)")
    ad_sub = ad.add_subparsers(dest="adapters_command", metavar="ADAPTERS_COMMAND", required=True)

    p = ad_sub.add_parser("list", help="list adapters, newest first")
    _common(p, _list, json_what="one JSON array of adapters")

    p = ad_sub.add_parser("get", help="show one adapter")
    p.add_argument("adapter_id", metavar="ID")
    _common(p, _get)

    p = ad_sub.add_parser("delete", help="delete an adapter and its files (its job record stays)")
    p.add_argument("adapter_id", metavar="ID")
    _common(p, _delete, json_what=None)

    p = ad_sub.add_parser("export", help="download an adapter's update log")
    p.add_argument("adapter_id", metavar="ID")
    p.add_argument("--out", required=True, type=Path, metavar="FILE", help="where to write the update log")
    p.add_argument(
        "--upto", type=nonneg_int, default=None, metavar="N", help="only its first N steps (default: all)"
    )
    _common(p, _export, json_what='one JSON object {"path", "bytes"}')

    p = ad_sub.add_parser("import", help="register an update log made elsewhere as an adapter")
    p.add_argument("file", type=Path, metavar="FILE", help="update log file (from `adapters export`)")
    p.add_argument(
        "--id", default="", metavar="ID", help="id for the adapter (default: the server assigns one)"
    )
    p.add_argument("--name", default="", metavar="NAME", help="display name")
    _common(p, _import)

    p = ad_sub.add_parser(
        "download",
        help="download weights as files: an adapter (PEFT), a job's checkpoint or a job's result",
        description="Download an adapter's PEFT files (PeftModel.from_pretrained loads the directory), "
        "a LoRA job's checkpoint (--job ID --checkpoint NAME) or a job's result (--job ID: its adapter, "
        "or a FULL job's Hugging Face model directory).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("adapter_id", nargs="?", metavar="ID", help="adapter id")
    src.add_argument("--job", metavar="JOB_ID", help="a job's result or checkpoint instead")
    p.add_argument("--checkpoint", default="", metavar="NAME", help="with --job: e.g. step-000500")
    p.add_argument(
        "--upto",
        type=nonneg_int,
        default=None,
        metavar="N",
        help="with --job: the weights after its first N steps (any step logged, replayed by the server)",
    )
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="directory to write the files to")
    _common(p, _download, json_what='one JSON object {"dir", "files"}')

    p = ad_sub.add_parser(
        "import-peft", help="serve a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors)"
    )
    p.add_argument("dir", type=Path, metavar="DIR", help="PEFT adapter directory (e.g. from save_pretrained)")
    p.add_argument(
        "--id", default="", metavar="ID", help="id for the adapter (default: the server assigns one)"
    )
    p.add_argument("--name", default="", metavar="NAME", help="display name")
    _common(p, _import_peft)


def _common(p: argparse.ArgumentParser, func: object, json_what: str | None = "one JSON object") -> None:
    add_connection_args(p)
    if json_what:
        p.add_argument("--json", action="store_true", help=f"print {json_what} on stdout instead of text")
    p.set_defaults(func=func, json=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _row(a: dict) -> tuple[str, ...]:
    return (
        a["id"],
        short(a["kind"]),
        short(a["status"]),
        str(a.get("steps", 0)),
        human_bytes(int(a.get("size_bytes", 0))),
        a.get("source_job_id", "") or "-",
        a.get("display_name", ""),
    )


def _list(args: argparse.Namespace) -> int:
    def body(client: ZostreamClient) -> int:
        adapters = client.list_adapters()
        if args.json:
            print_json(adapters)
        else:
            print_table([("ID", "KIND", "STATUS", "STEPS", "SIZE", "JOB", "NAME"), *map(_row, adapters)])
        return 0

    return run("adapters list", args, body)


def _print_adapter(a: dict, as_json: bool) -> None:
    if as_json:
        print_json(a)
        return
    lora = a.get("lora", {})
    rows = [
        ("id", a["id"]),
        ("name", a.get("display_name", "")),
        ("kind", short(a["kind"])),
        ("status", short(a["status"])),
        ("steps", a.get("steps", 0)),
        ("job", a.get("source_job_id", "") or "-"),
        ("base", a.get("base_fingerprint", "")),
        ("size", human_bytes(int(a.get("size_bytes", 0)))),
        ("update log", human_bytes(int(a.get("update_log_bytes", 0)))),
        ("created", a.get("created_at", "-")),
    ]
    if lora:
        targets = ",".join(lora.get("target_modules", []))
        rows.append(("lora", f"r={lora.get('r', 0)} alpha={lora.get('alpha', '-')} targets={targets}"))
    print("\n".join(f"{k + ':':<12}{v}" for k, v in rows), flush=True)


def _get(args: argparse.Namespace) -> int:
    def body(client: ZostreamClient) -> int:
        _print_adapter(client.get_adapter(args.adapter_id), args.json)
        return 0

    return run("adapters get", args, body)


def _delete(args: argparse.Namespace) -> int:
    def body(client: ZostreamClient) -> int:
        client.delete_adapter(args.adapter_id)
        print(f"deleted {args.adapter_id}", flush=True)
        return 0

    return run("adapters delete", args, body)


def _export(args: argparse.Namespace) -> int:
    if args.out.is_dir():
        raise UsageError(f"--out: {args.out} is a directory; give a file name")

    def body(client: ZostreamClient) -> int:
        n = client.export_update_log_to(
            args.out, adapter_id=args.adapter_id, timeout=args.timeout, upto=args.upto
        )
        if args.json:
            print_json({"path": str(args.out), "bytes": n})
        else:
            print(f"{args.out} ({human_bytes(n)})", flush=True)
        return 0

    # a large log over a slow link: no deadline unless --timeout says so
    return run("adapters export", args, body, default_timeout=None)


def _download(args: argparse.Namespace) -> int:
    if args.checkpoint and not args.job:
        raise UsageError("--checkpoint goes with --job")
    if args.upto is not None and (not args.job or args.checkpoint):
        raise UsageError("--upto goes with --job, without --checkpoint")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out: {args.out} is a file; give a directory")

    def body(client: ZostreamClient) -> int:
        source = {"job_id": args.job} if args.job else {"adapter_id": args.adapter_id}
        names = client.download_weights(
            args.out, checkpoint=args.checkpoint, timeout=args.timeout, upto=args.upto, **source
        )
        if args.json:
            print_json({"dir": str(args.out), "files": names})
        else:
            print("\n".join(str(args.out / n) for n in names), flush=True)
        return 0

    return run("adapters download", args, body, default_timeout=None)


def _import_peft(args: argparse.Namespace) -> int:
    missing = [
        f for f in ("adapter_config.json", "adapter_model.safetensors") if not (args.dir / f).is_file()
    ]
    if missing:
        raise UsageError(f"DIR: {args.dir} has no {' or '.join(missing)}; give a PEFT LoRA adapter directory")

    def body(client: ZostreamClient) -> int:
        _print_adapter(client.import_peft(args.dir, adapter_id=args.id, display_name=args.name), args.json)
        return 0

    return run("adapters import-peft", args, body, default_timeout=None)


def _import(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise UsageError(f"FILE: no such file: {args.file}")

    def body(client: ZostreamClient) -> int:
        _print_adapter(
            client.import_update_log(args.file, adapter_id=args.id, display_name=args.name), args.json
        )
        return 0

    return run("adapters import", args, body, default_timeout=None)
