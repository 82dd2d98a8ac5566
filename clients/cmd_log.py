"""`zostream log ...`: inspect, verify, replay / export and compact update logs.

`info` and `verify` never modify the file (a damaged tail is reported, not truncated); `replay`
reads the intact steps and warns about a damaged tail.
"""

from __future__ import annotations

import argparse
import math
import os
import struct
import sys
from pathlib import Path
from typing import Any

from zostream.clients.cli import UsageError
from zostream.clients.common import add_json_arg, nonneg_int, print_json, usage_error, warn

_PREFIX = struct.Struct("<6sHI")  # magic, format version, header JSON length (engine/update_log_format.py)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("log", help="inspect, verify, replay and compact update logs")
    log_sub = p.add_subparsers(dest="log_command", metavar="LOG_COMMAND", required=True)

    info = log_sub.add_parser(
        "info",
        help="header and step statistics of an update log",
        description="Summarise an update log: its header (scope, noise, eps, seed, ...), steps, bytes per "
        "step, first/last learning rate, mean |g|, skipped steps and any damage. Never modifies the file.",
    )
    info.add_argument("log", metavar="LOG", help="update log (JOBDIR/update.log)")
    add_json_arg(info)
    info.set_defaults(func=log_info)

    verify = log_sub.add_parser(
        "verify",
        help="check every record; exit 1 when the log is damaged",
        description="Check the header and every record's CRC and sequence. Exit 0 when intact, 1 when "
        "damaged (the intact prefix is reported). Never modifies the file.",
    )
    verify.add_argument("log", metavar="LOG", help="update log")
    add_json_arg(verify)
    verify.set_defaults(func=log_verify)

    for name, what in (("replay", "replay"), ("export", "export (an alias of replay)")):
        r = log_sub.add_parser(
            name,
            help=f"{what}: materialise the tuned weights from --base + LOG",
            description="Apply the log's steps to the base model and write the result: a PEFT adapter "
            "dir (LoRA jobs) or a safetensors model dir (full-parameter jobs). Bitwise what training "
            "produced on the same device kind.",
        )
        r.add_argument("log", metavar="LOG", help="update log")
        r.add_argument("--base", required=True, metavar="DIR", help="the base model the job was trained from")
        r.add_argument("--out", required=True, metavar="DIR", help="output directory (replaced if present)")
        r.add_argument("--upto", type=nonneg_int, default=None, metavar="K", help="apply only steps 0..K-1")
        add_json_arg(r)
        r.set_defaults(func=log_replay)

    compact = log_sub.add_parser(
        "compact",
        help="write a compacted (read-only) copy of a log",
        description="Fold runs of steps sharing one learning rate; the copy replays identically.",
    )
    compact.add_argument("src", metavar="SRC", help="update log")
    compact.add_argument("dst", metavar="DST", help="new file (must not exist)")
    add_json_arg(compact)
    compact.set_defaults(func=log_compact)


def _exists(path: str, name: str = "LOG") -> None:
    if not os.path.isfile(path):
        raise UsageError(f"{name}: {path} does not exist or is not a file")


def header_bytes(path: str) -> int:
    """Bytes before the first record: prefix + header JSON + CRC."""
    with open(path, "rb") as f:
        raw = f.read(_PREFIX.size)
    return _PREFIX.size + _PREFIX.unpack(raw)[2] + 4


def summarize(path: str) -> dict[str, Any]:
    """What `log info` shows, from update_log_tools.export_json (read-only)."""
    from zostream.engine.update_log_tools import export_json

    d = export_json(path)
    steps = d["steps"]
    h = d["header"]
    n = len(steps)
    records = d["size_bytes"] - header_bytes(path)
    applied = [s for s in steps if not s["skipped"]]
    gs = [abs(g) for s in applied for g in s["g"] if g is not None and math.isfinite(g)]
    # Logs of format 3 / 4 record each step's training loss: the mean of the first and last 20 accepted.
    losses = [s["loss"] for s in applied if s.get("loss") is not None]
    scope = h["scope"]
    return {
        "path": d["path"],
        "format_version": d["format_version"],
        "compacted": d["compacted"],
        "size_bytes": d["size_bytes"],
        "header_bytes": d["size_bytes"] - records,
        "steps": n,
        "bytes_per_step": records / n if n else None,
        "skipped_steps": n - len(applied),
        "first_lr": steps[0]["lr"] if steps else None,
        "last_lr": steps[-1]["lr"] if steps else None,
        "mean_abs_g": sum(gs) / len(gs) if gs else None,
        "first_loss": sum(losses[:20]) / len(losses[:20]) if losses else None,
        "last_loss": sum(losses[-20:]) / len(losses[-20:]) if losses else None,
        "damaged": d["damage"] is not None,
        "damage": d["damage"],
        "method": scope["kind"],
        "header": h,
    }


def log_info(args: argparse.Namespace) -> int:
    _exists(args.log)
    s = summarize(args.log)
    if s["damage"]:
        warn("log info", f"WARNING: damaged tail: {s['damage']} (`zostream log verify` exits 1)")
    if args.json:
        print_json(s)
        return 0
    h, sc = s["header"], s["header"]["scope"]
    scope = sc["kind"]
    ex = h.get("extra", {})
    if scope == "lora":
        scope += f" r={sc['r']} alpha={sc['alpha']:g} targets={','.join(sc['targets'])}"
        scope += f" init_scale={sc.get('init_scale', 1.0):g}"
        avg = ex.get("average")
        scope += f"; serves the EMA of its factors, decay {avg['decay']:g}" if avg else "; serves its factors"
    sched = f"{ex['lr_schedule']} (lr {ex.get('lr')})" if "lr_schedule" in ex else "n/a"

    def num(x: float | None, fmt: str = ".4g") -> str:
        return "n/a" if x is None else format(x, fmt)

    rows = [
        ("log", f"{s['path']} (format {s['format_version']}{', compacted' if s['compacted'] else ''})"),
        ("base", h["base_fingerprint"]),
        ("scope", scope),
        ("noise", f"{h['noise']} (generator v{h['generator_version']}), eps {h['eps']:g}, q {h['q']}"),
        ("master", f"{h['master_dtype']} ({h['rounding']} rounding), weight decay {h['weight_decay']:g}"),
        ("seed", str(h["job_seed"])),
        ("schedule", sched),
        ("steps", f"{s['steps']} ({s['skipped_steps']} skipped)"),
        (
            "bytes",
            f"{s['size_bytes']:,} ({s['header_bytes']:,} header, {num(s['bytes_per_step'], '.4g')} per step)",
        ),
        ("lr", f"{num(s['first_lr'])} -> {num(s['last_lr'])}"),
        ("mean |g|", num(s["mean_abs_g"])),
        ("loss", f"{num(s['first_loss'])} -> {num(s['last_loss'])} (mean of the first / last 20 steps)"),
        ("damage", s["damage"] or "none"),
    ]
    for k, v in rows:
        print(f"{k:<10}{v}")
    return 0


def log_verify(args: argparse.Namespace) -> int:
    from zostream.engine.update_log_tools import verify

    _exists(args.log)
    rep = verify(args.log)
    if args.json:
        print_json(
            {
                "path": args.log,
                "ok": rep.ok,
                "steps": rep.steps,
                "stops_at": rep.stops_at,
                "reason": rep.reason,
            }
        )
    elif rep.ok:
        print(f"ok: {rep.steps} intact steps")
    else:
        print(f"damaged: {rep.steps} intact steps, then {rep.reason}")
    return 0 if rep.ok else 1


def log_replay(args: argparse.Namespace) -> int:
    from zostream.engine.errors import ModelError
    from zostream.engine.replay import replay
    from zostream.engine.update_log_format import LogCorruptError
    from zostream.engine.update_log_tools import export_json

    _exists(args.log)
    if not os.path.isdir(args.base):
        raise UsageError(f"--base: {args.base} does not exist or is not a directory")
    d = export_json(args.log)
    if d["damage"]:
        warn(
            f"log {args.log_command}", f"WARNING: replaying the {d['num_steps']} intact steps; {d['damage']}"
        )
    if args.upto is not None and args.upto > d["num_steps"]:
        raise UsageError(f"--upto: the log has {d['num_steps']} steps, got {args.upto}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a directory")
    try:
        path = replay(args.base, args.log, out, upto=args.upto, progress=True)
    except ModelError as exc:
        raise UsageError(f"--base: {exc}") from None
    except LogCorruptError as exc:
        raise UsageError(f"LOG: {exc}") from None
    except ValueError as exc:  # PreconditionError: another base model
        raise usage_error(exc, {"base": "--base"}) from None
    n = d["num_steps"] if args.upto is None else args.upto
    if args.json:
        print_json({"out": str(path), "steps": n, "method": d["header"]["scope"]["kind"]})
    else:
        print(f"replayed {n} steps ({d['header']['scope']['kind']}) into", file=sys.stderr)
        print(path)
    return 0


def log_compact(args: argparse.Namespace) -> int:
    from zostream.engine.update_log_tools import compact, export_json

    _exists(args.src, "SRC")
    if os.path.lexists(args.dst):
        raise UsageError(f"DST: {args.dst} exists; choose a new path")
    src = export_json(args.src)
    if src["damage"]:
        warn("log compact", f"WARNING: compacting the {src['num_steps']} intact steps; {src['damage']}")
    size = compact(args.src, args.dst)
    res = {
        "src": args.src,
        "dst": args.dst,
        "steps": src["num_steps"],
        "src_bytes": src["size_bytes"],
        "dst_bytes": size,
    }
    if args.json:
        print_json(res)
    else:
        print(f"{args.dst}: {src['num_steps']} steps, {src['size_bytes']:,} -> {size:,} bytes")
    return 0
