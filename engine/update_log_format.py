"""Update log format: the header (LogHeader, its JSON and the file prefix), the records (Step, StepRecord)
and the decoding of the body versions (plain and compacted, each with or without the step's loss). The
layout is in update_log.py's docstring; the file handle (open, repair, append) is UpdateLog there.
"""

from __future__ import annotations

import binascii
import json
import math
import struct
import zlib
from dataclasses import dataclass, field, fields
from typing import Any

from zostream import defaults as D

MAGIC = b"ZOLOG\0"
FORMAT_PLAIN = 1
FORMAT_COMPACTED = 2
FORMAT_PLAIN_LOSS = 3  # v1 records plus the step's training loss (f32)
FORMAT_COMPACTED_LOSS = 4  # v2 runs plus one f32 loss per step
FORMATS = (FORMAT_PLAIN, FORMAT_COMPACTED, FORMAT_PLAIN_LOSS, FORMAT_COMPACTED_LOSS)
RECORD_SIZE = 16
RECORD_SIZE_LOSS = 20
FLAG_SKIPPED = 1  # divergence guard: the step is logged but was not applied
FLAG_RESERVED = 2
MAX_Q = 256  # direction is a u8
RUN_MAX_STEPS = 4096  # bounds what one damaged run of a compacted log can lose
NOISE_KINDS = ("gaussian", "rademacher")
ROUNDING_MODES = ("nearest", "stochastic")
MASTER_DTYPES = ("float32", "bfloat16", "float16", "float64")

_PREFIX = struct.Struct("<6sHI")
U32 = struct.Struct("<I")
_RECORD = struct.Struct("<IBBffH")
_RECORD_BODY = struct.Struct("<IBBff")
_RECORD_LOSS = struct.Struct("<IBBfffH")
_RECORD_LOSS_BODY = struct.Struct("<IBBfff")
RUN_HEAD = struct.Struct("<IIf")
RUN_SIZE = RUN_HEAD.size + U32.size
_MAX_HEADER_JSON = 1 << 20
assert _RECORD.size == RECORD_SIZE and _RECORD_LOSS.size == RECORD_SIZE_LOSS and RUN_SIZE == 16


def has_loss(version: int) -> bool:
    """Whether a body of this format version records each step's training loss."""
    return version in (FORMAT_PLAIN_LOSS, FORMAT_COMPACTED_LOSS)


def is_compacted(version: int) -> bool:
    return version in (FORMAT_COMPACTED, FORMAT_COMPACTED_LOSS)


def record_size(version: int) -> int:
    """Bytes per direction record of a plain body."""
    return RECORD_SIZE_LOSS if has_loss(version) else RECORD_SIZE


class LogCorruptError(ValueError):
    """The file is not a readable update log (bad magic, version or header); the message names it."""


def record_seed(step: int) -> int:
    """CRC-16 seed for the records of `step`: binds every record to its place in the file."""
    return binascii.crc_hqx(U32.pack(step), 0x5A0C)


def to_f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def loss_f32(x: float) -> float:
    """A step's loss as the log stores it: float32, a value beyond float32's range as +-inf (never an error:
    a skipped step's loss may be anything)."""
    try:
        return to_f32(x)
    except OverflowError:
        return math.copysign(math.inf, x)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _json_normal(value: Any, name: str) -> Any:
    # Tuples become lists etc., so a header equals itself after a trip through the file.
    try:
        return json.loads(json.dumps(value, sort_keys=True, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be JSON-serialisable with finite numbers: {e}") from None


@dataclass(frozen=True)
class LogHeader:
    """Everything replay needs besides the base weights and the per-step records."""

    base_fingerprint: str
    # {"kind": "full"} | {"kind": "lora", "r", "alpha", "targets", "init_seed"[, "init_scale"]}
    scope: dict[str, Any]
    noise: str
    generator_version: int
    master_dtype: str
    rounding: str
    eps: float
    weight_decay: float
    decay_exclusions: list[str]
    job_seed: int
    q: int = 1  # directions per step
    extra: dict[str, Any] = field(default_factory=dict)  # free-form, e.g. the lr schedule

    def __post_init__(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"LogHeader: {msg}")

        if not isinstance(self.base_fingerprint, str) or not self.base_fingerprint:
            raise bad("base_fingerprint must be a non-empty str (the base model fingerprint)")
        scope = _json_normal(self.scope, "scope")
        if not isinstance(scope, dict) or scope.get("kind") not in ("full", "lora"):
            raise bad(f"scope must be a dict with kind 'full' or 'lora', got {self.scope!r}")
        if scope["kind"] == "lora":
            r, alpha, targets = scope.get("r"), scope.get("alpha"), scope.get("targets")
            if not (_is_int(r) and r > 0):
                raise bad(f"scope.r must be an int > 0 for LoRA, got {r!r}")
            if not (_is_num(alpha) and alpha > 0):
                raise bad(f"scope.alpha must be a number > 0 for LoRA, got {alpha!r}")
            if not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
                raise bad(f"scope.targets must be a non-empty list of module names, got {targets!r}")
            if not _is_int(scope.get("init_seed")):
                raise bad("scope.init_seed must be an int (replay rebuilds the LoRA init from it)")
            init_scale = scope.get("init_scale", 1.0)
            if not D.lora_init_scale_ok(init_scale):
                raise bad(
                    f"scope.init_scale must be a number in (0, {D.LORA_INIT_SCALE_MAX:g}] when present, "
                    f"got {init_scale!r}"
                )
        object.__setattr__(self, "scope", scope)
        if self.noise not in NOISE_KINDS:
            raise bad(f"noise must be one of {NOISE_KINDS}, got {self.noise!r}")
        if not (_is_int(self.generator_version) and self.generator_version >= 0):
            raise bad(f"generator_version must be an int >= 0, got {self.generator_version!r}")
        if self.master_dtype not in MASTER_DTYPES:
            raise bad(f"master_dtype must be one of {MASTER_DTYPES}, got {self.master_dtype!r}")
        if self.rounding not in ROUNDING_MODES:
            raise bad(f"rounding must be one of {ROUNDING_MODES}, got {self.rounding!r}")
        if not (_is_num(self.eps) and self.eps > 0):
            raise bad(f"eps must be a finite number > 0, got {self.eps!r}")
        if not (_is_num(self.weight_decay) and self.weight_decay >= 0):
            raise bad(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        object.__setattr__(self, "eps", float(self.eps))
        object.__setattr__(self, "weight_decay", float(self.weight_decay))
        excl = self.decay_exclusions
        if isinstance(excl, str) or not all(isinstance(x, str) for x in excl):
            raise bad(f"decay_exclusions must be a list of name patterns (str), got {excl!r}")
        object.__setattr__(self, "decay_exclusions", list(excl))
        if not (_is_int(self.job_seed) and 0 <= self.job_seed < 2**64):
            raise bad(f"job_seed must be an int in [0, 2**64), got {self.job_seed!r}")
        if not (_is_int(self.q) and 1 <= self.q <= MAX_Q):
            raise bad(f"q (directions per step) must be an int in 1..{MAX_Q}, got {self.q!r}")
        extra = _json_normal(self.extra, "extra")
        if not isinstance(extra, dict):
            raise bad(f"extra must be a dict, got {type(self.extra).__name__}")
        object.__setattr__(self, "extra", extra)

    def to_dict(self) -> dict[str, Any]:
        return _json_normal({f.name: getattr(self, f.name) for f in fields(self)}, "header")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LogHeader:
        names = [f.name for f in fields(cls)]
        if not isinstance(d, dict):
            raise ValueError(f"header JSON must be an object, got {type(d).__name__}")
        for name in names:
            if name not in d:
                raise ValueError(f"header JSON lacks field {name!r}")
        for name in d:
            if name not in names:
                raise ValueError(f"header JSON has unknown field {name!r} (written by a newer zostream?)")
        return cls(**d)

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, b: bytes) -> LogHeader:
        return cls.from_dict(json.loads(b.decode("utf-8")))


@dataclass(frozen=True)
class StepRecord:
    """One direction of one step, as stored: 16 bytes, or 20 with the step's loss (loss not None; format
    versions 3 and 4); g, lr and loss are float32 values."""

    step: int
    direction: int
    g: float
    lr: float
    flags: int = 0
    loss: float | None = None

    def pack(self) -> bytes:
        if self.loss is None:
            body = _RECORD_BODY.pack(self.step, self.direction, self.flags, self.g, self.lr)
        else:
            body = _RECORD_LOSS_BODY.pack(self.step, self.direction, self.flags, self.g, self.lr, self.loss)
        return body + struct.pack("<H", binascii.crc_hqx(body, record_seed(self.step)))


@dataclass(frozen=True)
class Step:
    """One optimiser step: its lr and the projected gradient g of each of its q directions; loss: the step's
    training loss (what the slow-climb rule reads, engine/climb.py), None in logs of format 1 and 2."""

    step: int
    lr: float
    directions: tuple[float, ...]
    skipped: bool = False
    loss: float | None = None

    def __post_init__(self) -> None:
        if not (_is_int(self.step) and 0 <= self.step < 2**32):
            raise ValueError(f"Step.step must be an int in [0, 2**32), got {self.step!r}")
        object.__setattr__(self, "directions", tuple(float(g) for g in self.directions))
        object.__setattr__(self, "lr", float(self.lr))
        if self.loss is not None:
            object.__setattr__(self, "loss", float(self.loss))
        if not self.directions:
            raise ValueError(f"step {self.step}: directions is empty; give g for each of the q directions")


def encode_header(header: LogHeader, compacted: bool, loss: bool = False) -> bytes:
    """The file prefix: magic, format version (1/2 plain/compacted; 3/4 the same with each step's loss)."""
    d = header.to_dict() | ({"compacted": True} if compacted else {})
    js = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    version = (FORMAT_COMPACTED if compacted else FORMAT_PLAIN) + (2 if loss else 0)
    return _PREFIX.pack(MAGIC, version, len(js)) + js + U32.pack(zlib.crc32(js))


def parse_header(f: Any, path: str) -> tuple[int, LogHeader, int]:
    prefix = f.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size:
        raise LogCorruptError(f"{path}: too short to be an update log ({len(prefix)} bytes)")
    magic, version, n = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise LogCorruptError(f"{path}: not a zostream update log (magic {magic!r}, expected {MAGIC!r})")
    if version not in FORMATS:
        raise LogCorruptError(f"{path}: format version {version} is not supported (this build reads 1 to 4)")
    blob = f.read(n + 4) if n <= _MAX_HEADER_JSON else b""
    if len(blob) < n + 4:
        raise LogCorruptError(f"{path}: the header is truncated or its length ({n}) is damaged")
    js, crc = blob[:n], U32.unpack(blob[n:])[0]
    if zlib.crc32(js) != crc:
        raise LogCorruptError(f"{path}: header CRC mismatch (the header is damaged)")
    try:
        d = json.loads(js.decode("utf-8"))
        compacted = d.pop("compacted", False) if isinstance(d, dict) else False
        header = LogHeader.from_dict(d)
    except (ValueError, TypeError, RecursionError) as e:  # RecursionError: JSON nested past the limit
        raise LogCorruptError(f"{path}: invalid header: {e}") from None
    if compacted != is_compacted(version):
        raise LogCorruptError(f"{path}: header says compacted={compacted} but format version is {version}")
    return version, header, _PREFIX.size + n + 4


def scan_plain(body: bytes, q: int, loss: bool = False) -> tuple[list[Step], int, str | None]:
    """Decode a plain body (loss: format 3's 20-byte records) -> (steps, good bytes, first problem)."""
    rec, size = (_RECORD_LOSS, RECORD_SIZE_LOSS) if loss else (_RECORD, RECORD_SIZE)
    steps: list[Step] = []
    gs: list[float] = []
    first = b""  # flags, lr and loss bytes of direction 0 of the step being read (bitwise: a NaN loss)
    reason = None
    n_full = len(body) // size
    for i in range(n_full):
        step, d = divmod(i, q)
        o = i * size
        s, dirn, flags, g, lr, *rest = rec.unpack_from(body, o)
        crc = rest[-1]
        shared = body[o + 5 : o + 6] + body[o + 10 : o + size - 2]
        if crc != binascii.crc_hqx(body[o : o + size - 2], record_seed(step)):
            reason = f"bad CRC at record {i} (step {step})"
        elif (s, dirn) != (step, d):
            reason = f"sequence break at record {i}: step {s} direction {dirn}, expected {step}/{d}"
        elif flags & ~FLAG_SKIPPED or not math.isfinite(lr):
            reason = f"invalid flags 0x{flags:02x} or lr {lr!r} at record {i}"
        elif d > 0 and shared != first:
            reason = f"record {i} disagrees with direction 0 of step {step} on lr, flags or loss"
        elif not flags & FLAG_SKIPPED and not math.isfinite(g):
            reason = f"non-finite g in applied step {step} at record {i}"
        if reason:
            break
        if d == 0:
            gs, first = [], shared
        gs.append(g)
        if d == q - 1:
            step_loss = rest[0] if loss else None
            steps.append(Step(step, lr, tuple(gs), bool(flags & FLAG_SKIPPED), step_loss))
    if reason is None and len(body) % size:
        reason = f"torn record at the end ({len(body) % size} of {size} bytes)"
    elif reason is None and n_full % q:
        reason = f"step {len(steps)} is incomplete ({n_full % q} of {q} directions)"
    return steps, len(steps) * q * size, reason


def scan_compacted(body: bytes, q: int, loss: bool = False) -> tuple[list[Step], int, str | None]:
    """Decode a compacted body (loss: format 4, n f32 losses after each run's g) -> (steps, good bytes,
    first problem)."""
    steps: list[Step] = []
    pos = 0
    while pos < len(body):
        if len(body) - pos < RUN_SIZE:
            return steps, pos, f"torn run header at byte {pos}"
        first, n, lr = RUN_HEAD.unpack_from(body, pos)
        crc = U32.unpack_from(body, pos + RUN_HEAD.size)[0]
        if first != len(steps) or not 1 <= n <= RUN_MAX_STEPS or not math.isfinite(lr):
            return steps, pos, f"bad run header at byte {pos} (first step {first}, {n} steps)"
        nbits, start = (n + 7) // 8, pos + RUN_SIZE
        end = start + nbits + 4 * q * n + (4 * n if loss else 0)
        if end > len(body):
            return steps, pos, f"torn run of steps {first}..{first + n - 1}"
        if zlib.crc32(body[start:end], zlib.crc32(body[pos : pos + RUN_HEAD.size])) != crc:
            return steps, pos, f"bad CRC in the run of steps {first}..{first + n - 1}"
        gs = struct.unpack_from(f"<{n * q}f", body, start + nbits)
        losses = struct.unpack_from(f"<{n}f", body, start + nbits + 4 * q * n) if loss else (None,) * n
        for k in range(n):
            skipped = bool(body[start + (k >> 3)] >> (k & 7) & 1)
            steps.append(Step(first + k, lr, gs[k * q : (k + 1) * q], skipped, losses[k]))
        pos = end
    return steps, pos, None
