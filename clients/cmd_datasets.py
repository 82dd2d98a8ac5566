"""`zostream datasets ...`: the JSONL datasets a zostream server holds (upload, list, get, delete)."""

from __future__ import annotations

import argparse
from pathlib import Path

from zostream.clients.cli import UsageError
from zostream.clients.client import ZostreamClient
from zostream.clients.cmd_adapters import human_bytes
from zostream.clients.formatting import print_table
from zostream.clients.remote import add_connection_args, print_json, run


def register(sub: argparse._SubParsersAction) -> None:
    ds = sub.add_parser("datasets", help="datasets on a server (upload, list, get, delete)")
    ds_sub = ds.add_subparsers(dest="datasets_command", metavar="DATASETS_COMMAND", required=True)

    p = ds_sub.add_parser("upload", help="upload a JSONL file (validated record by record)")
    p.add_argument("file", type=Path, metavar="FILE", help="JSONL file")
    p.add_argument("--name", metavar="NAME", help="name on the server (default: the file's stem)")
    p.add_argument("--kind", default=None, choices=("completion", "text", "chat", "choice"))
    p.add_argument("--overwrite", action="store_true", help="replace a dataset of the same name")
    _common(p, _upload)

    p = ds_sub.add_parser("list", help="list datasets, by name")
    _common(p, _list, "one JSON array of datasets")

    p = ds_sub.add_parser("get", help="show one dataset")
    p.add_argument("name", metavar="NAME")
    _common(p, _get)

    p = ds_sub.add_parser("delete", help="delete a dataset (refused while an unfinished job uses it)")
    p.add_argument("name", metavar="NAME")
    _common(p, _delete, None)


def _common(p: argparse.ArgumentParser, func: object, json_what: str | None = "one JSON object") -> None:
    add_connection_args(p)
    if json_what:
        p.add_argument("--json", action="store_true", help=f"print {json_what} on stdout instead of text")
    p.set_defaults(func=func, json=False)


def _row(d: dict) -> tuple[str, ...]:
    return (
        d["name"],
        d.get("kind", ""),
        str(d.get("num_records", 0)),
        human_bytes(int(d.get("size_bytes", 0))),
    )


def _show(d: dict, as_json: bool) -> None:
    if as_json:
        print_json(d)
        return
    rows = [
        ("name", d["name"]),
        ("kind", d.get("kind", "")),
        ("records", d.get("num_records", 0)),
        ("size", human_bytes(int(d.get("size_bytes", 0)))),
        ("sha256", d.get("sha256", "")),
        ("created", d.get("created_at", "-")),
    ]
    print("\n".join(f"{k + ':':<9}{v}" for k, v in rows), flush=True)


def _upload(args: argparse.Namespace) -> int:
    if not args.file.is_file():
        raise UsageError(f"FILE: no such file: {args.file}")

    def body(client: ZostreamClient) -> int:
        name = args.name or args.file.stem
        _show(client.upload_dataset(name, args.file, kind=args.kind, overwrite=args.overwrite), args.json)
        return 0

    return run("datasets upload", args, body, default_timeout=None)


def _list(args: argparse.Namespace) -> int:
    def body(client: ZostreamClient) -> int:
        items = client.list_datasets()
        if args.json:
            print_json(items)
        else:
            print_table([("NAME", "KIND", "RECORDS", "SIZE"), *map(_row, items)])
        return 0

    return run("datasets list", args, body)


def _get(args: argparse.Namespace) -> int:
    def body(client: ZostreamClient) -> int:
        _show(client.get_dataset(args.name), args.json)
        return 0

    return run("datasets get", args, body)


def _delete(args: argparse.Namespace) -> int:
    def body(client: ZostreamClient) -> int:
        client.delete_dataset(args.name)
        print(f"deleted {args.name}", flush=True)
        return 0

    return run("datasets delete", args, body)
