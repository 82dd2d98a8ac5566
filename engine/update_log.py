"""Update log: the checkpoint delta of a ZO fine-tuning job (docs/ARCHITECTURE.md, "The update log").

A few bytes per step from which replay rebuilds the tuned weights exactly. Little-endian:

  header   b"ZOLOG\\0" | u16 format version | u32 n | n bytes JSON (UTF-8, sorted keys) | u32 CRC32(JSON)
  v1 body  16-byte records, q per step (directions 0..q-1), steps contiguous from 0:
           u32 step | u8 direction | u8 flags | f32 g | f32 lr | u16 crc
           crc = binascii.crc_hqx(record[:14], record_seed(s)) where s is the step the record's
           *position* implies (index // q), so a record copied to the wrong place fails its check.
  v2 body  compacted (read-only; header JSON also has "compacted": true): runs of steps sharing one lr,
           u32 first_step | u32 n | f32 lr | u32 crc32(run[:12] + payload), then the payload:
           skipped bitmap (ceil(n/8) bytes; bit k&7 of byte k>>3 is step first_step+k), n*q f32 g.

A step counts once its records are fsync'd. On open, a torn tail, a bad CRC or a sequence break
truncates the file to the last complete step (repair=True). One writer at a time (flock).
"""

from __future__ import annotations

import binascii
import contextlib
import errno
import fcntl
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field, fields
from typing import Any

MAGIC = b"ZOLOG\0"
FORMAT_PLAIN = 1
FORMAT_COMPACTED = 2
RECORD_SIZE = 16
FLAG_SKIPPED = 1  # divergence guard: the step is logged but was not applied
FLAG_RESERVED = 2
MAX_Q = 256  # direction is a u8
RUN_MAX_STEPS = 4096  # bounds what one damaged run of a compacted log can lose
NOISE_KINDS = ("gaussian", "rademacher")
ROUNDING_MODES = ("nearest", "stochastic")
MASTER_DTYPES = ("float32", "bfloat16", "float16", "float64")

_PREFIX = struct.Struct("<6sHI")
_U32 = struct.Struct("<I")
_RECORD = struct.Struct("<IBBffH")
_RECORD_BODY = struct.Struct("<IBBff")
_RUN_HEAD = struct.Struct("<IIf")
_RUN_SIZE = _RUN_HEAD.size + _U32.size
_MAX_HEADER_JSON = 1 << 20
assert _RECORD.size == RECORD_SIZE and _RUN_SIZE == 16


class LogCorruptError(ValueError):
    """The file is not a readable update log (bad magic, version or header); the message names it."""


def record_seed(step: int) -> int:
    """CRC-16 seed for the records of `step`: binds every record to its place in the file."""
    return binascii.crc_hqx(_U32.pack(step), 0x5A0C)


def _f32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


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
    scope: dict[str, Any]  # {"kind": "full"} | {"kind": "lora", "r", "alpha", "targets", "init_seed"}
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
    """One direction of one step, as stored (16 bytes); g and lr are float32 values."""

    step: int
    direction: int
    g: float
    lr: float
    flags: int = 0

    def pack(self) -> bytes:
        body = _RECORD_BODY.pack(self.step, self.direction, self.flags, self.g, self.lr)
        return body + struct.pack("<H", binascii.crc_hqx(body, record_seed(self.step)))


@dataclass(frozen=True)
class Step:
    """One optimiser step: its lr and the projected gradient g of each of its q directions."""

    step: int
    lr: float
    directions: tuple[float, ...]
    skipped: bool = False

    def __post_init__(self) -> None:
        if not (_is_int(self.step) and 0 <= self.step < 2**32):
            raise ValueError(f"Step.step must be an int in [0, 2**32), got {self.step!r}")
        object.__setattr__(self, "directions", tuple(float(g) for g in self.directions))
        object.__setattr__(self, "lr", float(self.lr))
        if not self.directions:
            raise ValueError(f"step {self.step}: directions is empty; give g for each of the q directions")


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    steps: int  # complete, intact steps
    stops_at: int | None  # first step that is missing or damaged; None when ok
    reason: str | None


@dataclass(frozen=True)
class _Scan:
    version: int
    header: LogHeader
    data_offset: int
    steps: list[Step]
    good_size: int  # header + intact complete steps, in bytes
    file_size: int
    reason: str | None  # first problem after the good prefix

    def where(self) -> str:
        after = f"after step {len(self.steps) - 1}" if self.steps else "after the header (no complete step)"
        return f"{self.file_size - self.good_size} bytes {after}: {self.reason}"


def _encode_header(header: LogHeader, compacted: bool) -> bytes:
    d = header.to_dict() | ({"compacted": True} if compacted else {})
    js = json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    version = FORMAT_COMPACTED if compacted else FORMAT_PLAIN
    return _PREFIX.pack(MAGIC, version, len(js)) + js + _U32.pack(zlib.crc32(js))


def _read_header(f: Any, path: str) -> tuple[int, LogHeader, int]:
    prefix = f.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size:
        raise LogCorruptError(f"{path}: too short to be an update log ({len(prefix)} bytes)")
    magic, version, n = _PREFIX.unpack(prefix)
    if magic != MAGIC:
        raise LogCorruptError(f"{path}: not a zostream update log (magic {magic!r}, expected {MAGIC!r})")
    if version not in (FORMAT_PLAIN, FORMAT_COMPACTED):
        raise LogCorruptError(f"{path}: format version {version} is not supported (this build reads 1, 2)")
    blob = f.read(n + 4) if n <= _MAX_HEADER_JSON else b""
    if len(blob) < n + 4:
        raise LogCorruptError(f"{path}: the header is truncated or its length ({n}) is damaged")
    js, crc = blob[:n], _U32.unpack(blob[n:])[0]
    if zlib.crc32(js) != crc:
        raise LogCorruptError(f"{path}: header CRC mismatch (the header is damaged)")
    try:
        d = json.loads(js.decode("utf-8"))
        compacted = d.pop("compacted", False) if isinstance(d, dict) else False
        header = LogHeader.from_dict(d)
    except (ValueError, TypeError, RecursionError) as e:  # RecursionError: JSON nested past the limit
        raise LogCorruptError(f"{path}: invalid header: {e}") from None
    if compacted != (version == FORMAT_COMPACTED):
        raise LogCorruptError(f"{path}: header says compacted={compacted} but format version is {version}")
    return version, header, _PREFIX.size + n + 4


def _scan_plain(body: bytes, q: int) -> tuple[list[Step], int, str | None]:
    steps: list[Step] = []
    gs: list[float] = []
    first = (0, 0.0)  # (flags, lr) of direction 0 of the step being read
    reason = None
    n_full = len(body) // RECORD_SIZE
    for i in range(n_full):
        step, d = divmod(i, q)
        o = i * RECORD_SIZE
        s, dirn, flags, g, lr, crc = _RECORD.unpack_from(body, o)
        if crc != binascii.crc_hqx(body[o : o + 14], record_seed(step)):
            reason = f"bad CRC at record {i} (step {step})"
        elif (s, dirn) != (step, d):
            reason = f"sequence break at record {i}: step {s} direction {dirn}, expected {step}/{d}"
        elif flags & ~FLAG_SKIPPED or not math.isfinite(lr):
            reason = f"invalid flags 0x{flags:02x} or lr {lr!r} at record {i}"
        elif d > 0 and (flags, lr) != first:
            reason = f"record {i} disagrees with direction 0 of step {step} on lr or flags"
        elif not flags & FLAG_SKIPPED and not math.isfinite(g):
            reason = f"non-finite g in applied step {step} at record {i}"
        if reason:
            break
        if d == 0:
            gs, first = [], (flags, lr)
        gs.append(g)
        if d == q - 1:
            steps.append(Step(step, lr, tuple(gs), bool(flags & FLAG_SKIPPED)))
    if reason is None and len(body) % RECORD_SIZE:
        reason = f"torn record at the end ({len(body) % RECORD_SIZE} of {RECORD_SIZE} bytes)"
    elif reason is None and n_full % q:
        reason = f"step {len(steps)} is incomplete ({n_full % q} of {q} directions)"
    return steps, len(steps) * q * RECORD_SIZE, reason


def _scan_compacted(body: bytes, q: int) -> tuple[list[Step], int, str | None]:
    steps: list[Step] = []
    pos = 0
    while pos < len(body):
        if len(body) - pos < _RUN_SIZE:
            return steps, pos, f"torn run header at byte {pos}"
        first, n, lr = _RUN_HEAD.unpack_from(body, pos)
        crc = _U32.unpack_from(body, pos + _RUN_HEAD.size)[0]
        if first != len(steps) or not 1 <= n <= RUN_MAX_STEPS or not math.isfinite(lr):
            return steps, pos, f"bad run header at byte {pos} (first step {first}, {n} steps)"
        nbits, start = (n + 7) // 8, pos + _RUN_SIZE
        end = start + nbits + 4 * q * n
        if end > len(body):
            return steps, pos, f"torn run of steps {first}..{first + n - 1}"
        if zlib.crc32(body[start:end], zlib.crc32(body[pos : pos + _RUN_HEAD.size])) != crc:
            return steps, pos, f"bad CRC in the run of steps {first}..{first + n - 1}"
        gs = struct.unpack_from(f"<{n * q}f", body, start + nbits)
        for k in range(n):
            skipped = bool(body[start + (k >> 3)] >> (k & 7) & 1)
            steps.append(Step(first + k, lr, gs[k * q : (k + 1) * q], skipped))
        pos = end
    return steps, pos, None


def _scan(path: str) -> _Scan:
    with open(path, "rb") as f:
        version, header, off = _read_header(f, path)
        body = f.read()  # records are small: 20k steps are 320 KB
    scan = _scan_plain if version == FORMAT_PLAIN else _scan_compacted
    steps, good, reason = scan(body, header.q)
    return _Scan(version, header, off, steps, off + good, off + len(body), reason)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:  # one write() unless the kernel takes less
        view = view[os.write(fd, view) :]


def _write_new(path: str, blob: bytes) -> None:
    """Create `path` (never overwrite), write `blob`, make it and its directory entry durable."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        raise FileExistsError(
            errno.EEXIST, "file exists; open it to resume or choose another path", path
        ) from None
    try:
        _write_all(fd, blob)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class UpdateLog:
    """An open update log: the steps in memory, plus an append handle taken on the first write."""

    def __init__(
        self, path: str, scan: _Scan, repaired: str | None = None, damage: str | None = None
    ) -> None:
        self.path = path
        self.header = scan.header
        self.format_version = scan.version
        self.repaired = repaired  # what open() truncated, if anything
        self.damage = damage  # unreadable tail left in place (repair=False); appends are refused
        self._data_offset = scan.data_offset
        self._steps = scan.steps
        self._fd: int | None = None
        self._broken: str | None = None
        self._closed = False

    @property
    def compacted(self) -> bool:
        return self.format_version == FORMAT_COMPACTED

    @classmethod
    def create(cls, path: str | os.PathLike[str], header: LogHeader) -> UpdateLog:
        path = os.fspath(path)
        blob = _encode_header(header, compacted=False)
        _write_new(path, blob)
        return cls(path, _Scan(FORMAT_PLAIN, header, len(blob), [], len(blob), len(blob), None))

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, expect: LogHeader | None = None, repair: bool = True
    ) -> UpdateLog:
        path = os.fspath(path)
        scan = _scan(path)
        if expect is not None:
            for fld in fields(LogHeader):
                got, want = getattr(scan.header, fld.name), getattr(expect, fld.name)
                if got != want:
                    raise ValueError(
                        f"{path}: header field {fld.name!r} is {got!r} in the log but {want!r} was expected "
                        "(this log belongs to another job or base model)"
                    )
        if scan.reason is None:
            return cls(path, scan)
        if not repair:
            return cls(path, scan, damage=f"unreadable: {scan.where()}")
        try:
            f = open(path, "r+b")  # noqa: SIM115 (closed by the with below)
        except PermissionError:
            return cls(path, scan, damage=f"not repaired (file is read-only): {scan.where()}")
        with f:
            if not _try_lock(f.fileno()):
                return cls(path, scan, damage=f"not repaired (another process is writing): {scan.where()}")
            scan = _scan(path)  # again under the lock: a writer may have finished meanwhile
            if scan.reason is None:
                return cls(path, scan)
            f.truncate(scan.good_size)
            f.flush()
            os.fsync(f.fileno())
        return cls(path, scan, repaired=f"truncated {scan.where()}")

    def steps(self, start: int = 0, stop: int | None = None) -> list[Step]:
        if start < 0 or (stop is not None and stop < 0):
            raise ValueError(f"steps({start}, {stop}): bounds must be >= 0")
        return self._steps[start:stop]

    def __len__(self) -> int:
        return len(self._steps)

    def append(self, step: Step) -> None:
        """Write the q records of `step` in one write() and fsync: the step counts once this returns."""
        q = self.header.q
        if step.step != len(self._steps):
            raise ValueError(f"{self.path}: got step {step.step}, the next step must be {len(self._steps)}")
        if len(step.directions) != q:
            raise ValueError(f"step {step.step}: {len(step.directions)} directions, the log has q={q}")
        if not math.isfinite(step.lr):
            raise ValueError(f"step {step.step}: lr {step.lr} is not finite")
        if not step.skipped and not all(math.isfinite(g) for g in step.directions):
            raise ValueError(f"step {step.step}: non-finite g; log it with skipped=True (divergence guard)")
        flags = FLAG_SKIPPED if step.skipped else 0
        try:
            recs = [StepRecord(step.step, d, g, step.lr, flags) for d, g in enumerate(step.directions)]
            blob = b"".join(r.pack() for r in recs)
            stored = Step(step.step, _f32(step.lr), tuple(_f32(g) for g in step.directions), step.skipped)
        except OverflowError as e:
            raise ValueError(f"step {step.step}: {e} (g and lr are stored as float32)") from None
        fd = self._writer()
        try:
            _write_all(fd, blob)
            os.fsync(fd)
        except OSError as e:
            self._fail(fd, f"append of step {step.step} failed ({e})")
            raise
        self._steps.append(stored)

    def truncate(self, n_steps: int) -> None:
        """Drop steps >= n_steps (e.g. resume from an earlier checkpoint)."""
        if not 0 <= n_steps <= len(self._steps):
            raise ValueError(f"truncate({n_steps}): the log has {len(self._steps)} steps")
        fd = self._writer()
        try:
            os.ftruncate(fd, self._data_offset + n_steps * self.header.q * RECORD_SIZE)
            os.fsync(fd)
        except OSError as e:
            self._fail(fd, f"truncate to {n_steps} steps failed ({e})")
            raise
        del self._steps[n_steps:]

    def size_bytes(self) -> int:
        return os.path.getsize(self.path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the writer lock
            self._fd = None
        self._closed = True

    def __enter__(self) -> UpdateLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _writer(self) -> int:
        problem = None
        if self._closed:
            problem = "the log is closed"
        elif self.compacted:
            problem = "compacted logs are read-only; append to the original log"
        elif self.damage or self._broken:
            problem = f"{self.damage or self._broken}; reopen the log (repair=True) first"
        if problem:
            raise ValueError(f"{self.path}: {problem}")
        if self._fd is None:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            expected = self._data_offset + len(self._steps) * self.header.q * RECORD_SIZE
            if not _try_lock(fd):
                os.close(fd)
                raise BlockingIOError(errno.EWOULDBLOCK, "another process is writing this log", self.path)
            if os.fstat(fd).st_size != expected:
                os.close(fd)
                raise ValueError(f"{self.path}: the file changed since it was opened; reopen it")
            self._fd = fd
        return self._fd

    def _fail(self, fd: int, what: str) -> None:
        # After a failed write/fsync the on-disk state is unknown: cut back to what we know, refuse more.
        self._broken = what
        with contextlib.suppress(OSError):
            os.ftruncate(fd, self._data_offset + len(self._steps) * self.header.q * RECORD_SIZE)


def read_header(path: str | os.PathLike[str]) -> LogHeader:
    path = os.fspath(path)
    with open(path, "rb") as f:
        return _read_header(f, path)[1]


def verify(path: str | os.PathLike[str]) -> VerifyReport:
    """Check every record; never modifies the file."""
    try:
        scan = _scan(os.fspath(path))
    except LogCorruptError as e:
        return VerifyReport(False, 0, 0, str(e))
    if scan.reason is None:
        return VerifyReport(True, len(scan.steps), None, None)
    return VerifyReport(False, len(scan.steps), len(scan.steps), scan.where())


def compact(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> int:
    """Write the intact steps of `src` as a compacted (v2) log at `dst`; return its size in bytes.

    Every step is kept (skipped ones too: replay needs the numbering) and reads back identical;
    consecutive steps with bitwise-equal float32 lr share one run header.
    """
    scan = _scan(os.fspath(src))
    q, steps = scan.header.q, scan.steps
    out = [_encode_header(scan.header, compacted=True)]
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
        head = _RUN_HEAD.pack(i, j - i, steps[i].lr)
        out += [head, _U32.pack(zlib.crc32(payload, zlib.crc32(head))), payload]
        i = j
    dst = os.fspath(dst)
    _write_new(dst, b"".join(out))
    return os.path.getsize(dst)


def _json_float(x: float) -> float | None:
    return x if math.isfinite(x) else None  # a skipped step's g may be NaN/inf; JSON has no such value


def export_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Header and intact steps as plain JSON data (`zostream log info --json`); never modifies the file."""
    path = os.fspath(path)
    scan = _scan(path)
    return {
        "path": path,
        "format_version": scan.version,
        "compacted": scan.version == FORMAT_COMPACTED,
        "size_bytes": scan.file_size,
        "num_steps": len(scan.steps),
        "damage": None if scan.reason is None else scan.where(),
        "header": scan.header.to_dict(),
        "steps": [
            {"step": s.step, "lr": s.lr, "g": [_json_float(g) for g in s.directions], "skipped": s.skipped}
            for s in scan.steps
        ],
    }
