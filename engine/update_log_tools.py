"""Read-only tools over an update log file: verify every record, compact a log (v1 -> v2, v3 -> v4), export
it as JSON (`zostream log verify / compact / info`)."""

from __future__ import annotations

import math
import os
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from .update_log import scan_file, write_new
from .update_log_format import (
    RUN_HEAD,
    RUN_MAX_STEPS,
    U32,
    LogCorruptError,
    encode_header,
    has_loss,
    is_compacted,
)


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    steps: int  # complete, intact steps
    stops_at: int | None  # first step that is missing or damaged; None when ok
    reason: str | None


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """Check every record; never modifies the file."""
    try:
        scan = scan_file(os.fspath(path))
    except LogCorruptError as e:
        return VerifyReport(False, 0, 0, str(e))
    if scan.reason is None:
        return VerifyReport(True, len(scan.steps), None, None)
    return VerifyReport(False, len(scan.steps), len(scan.steps), scan.where())


def compact(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> int:
    """Write the intact steps of `src` as a compacted log at `dst` (v2; v4 when `src` records losses);
    return its size in bytes.

    Every step is kept (skipped ones too: replay needs the numbering) and reads back identical;
    consecutive steps with bitwise-equal float32 lr share one run header.
    """
    scan = scan_file(os.fspath(src))
    q, steps, loss = scan.header.q, scan.steps, has_loss(scan.version)
    out = [encode_header(scan.header, compacted=True, loss=loss)]
    i = 0
    while i < len(steps):
        lr_bits = struct.pack("<f", steps[i].lr)  # bitwise: 0.0 and -0.0 stay apart
        j = i + 1
        while j < len(steps) and j - i < RUN_MAX_STEPS and struct.pack("<f", steps[j].lr) == lr_bits:
            j += 1
        bits = bytearray((j - i + 7) // 8)
        for k, st in enumerate(steps[i:j]):
            bits[k >> 3] |= st.skipped << (k & 7)
        payload = bytes(bits) + struct.pack(
            f"<{(j - i) * q}f", *(g for st in steps[i:j] for g in st.directions)
        )
        if loss:
            payload += struct.pack(f"<{j - i}f", *(st.loss for st in steps[i:j]))
        head = RUN_HEAD.pack(i, j - i, steps[i].lr)
        out += [head, U32.pack(zlib.crc32(payload, zlib.crc32(head))), payload]
        i = j
    dst = os.fspath(dst)
    write_new(dst, b"".join(out))
    return os.path.getsize(dst)


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None  # a skipped step's g may be NaN/inf; JSON has no such value


def export_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Header and intact steps as plain JSON data (`zostream log info --json`); never modifies the file."""
    path = os.fspath(path)
    scan = scan_file(path)
    return {
        "path": path,
        "format_version": scan.version,
        "compacted": is_compacted(scan.version),
        "size_bytes": scan.file_size,
        "num_steps": len(scan.steps),
        "damage": None if scan.reason is None else scan.where(),
        "header": scan.header.to_dict(),
        "steps": [
            {"step": s.step, "lr": s.lr, "g": [_json_float(g) for g in s.directions], "skipped": s.skipped}
            | ({} if s.loss is None else {"loss": _json_float(s.loss)})
            for s in scan.steps
        ],
    }
