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
  v3 body  v1 with the step's training loss (engine/climb.py reads it): 20-byte records,
           u32 step | u8 direction | u8 flags | f32 g | f32 lr | f32 loss | u16 crc (over record[:18]);
           the q records of a step carry the same lr, flags and loss (bitwise).
  v4 body  v2 with the loss: each run's payload ends with n f32 losses (step order).

New jobs write v3 (compact makes v4 of it); v1 and v2 logs keep reading, resuming (appending v1 records)
and replaying as before, without losses. A step's loss is the mean loss of its pass as the job reports
it (estimators.summary), float32; a skipped step's loss may be non-finite.

A step counts once its records are fsync'd. On open, a torn tail, a bad CRC or a sequence break
truncates the file to the last complete step (repair=True). One writer at a time (flock).

This module reads, appends to and repairs a log file (UpdateLog, read_header); the format itself (header,
records, decoding of both body versions) is update_log_format.py; the read-only tools (verify, compact,
export_json) are update_log_tools.py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import math
import os
from dataclasses import dataclass, fields

from .update_log_format import (
    FLAG_SKIPPED,
    FORMAT_PLAIN,
    FORMAT_PLAIN_LOSS,
    LogHeader,
    Step,
    StepRecord,
    encode_header,
    has_loss,
    is_compacted,
    loss_f32,
    parse_header,
    record_size,
    scan_compacted,
    scan_plain,
    to_f32,
)


@dataclass(frozen=True)
class Scan:
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


def scan_file(path: str) -> Scan:
    with open(path, "rb") as f:
        version, header, off = parse_header(f, path)
        body = f.read()  # records are small: 20k steps are 320 KB
    scan = scan_compacted if is_compacted(version) else scan_plain
    steps, good, reason = scan(body, header.q, has_loss(version))
    return Scan(version, header, off, steps, off + good, off + len(body), reason)


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


def write_new(path: str, blob: bytes) -> None:
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

    def __init__(self, path: str, scan: Scan, repaired: str | None = None, damage: str | None = None) -> None:
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
        return is_compacted(self.format_version)

    @property
    def has_loss(self) -> bool:
        """Whether the records carry each step's loss (format 3 / 4); older logs do not."""
        return has_loss(self.format_version)

    @property
    def step_bytes(self) -> int:
        """Bytes one appended step takes (q records)."""
        return self.header.q * record_size(self.format_version)

    @classmethod
    def create(cls, path: str | os.PathLike[str], header: LogHeader, loss: bool = False) -> UpdateLog:
        """A new plain log; loss True: format 3, every step must carry its loss (jobs write this);
        False: format 1, as logs were written before losses were recorded."""
        path = os.fspath(path)
        blob = encode_header(header, compacted=False, loss=loss)
        write_new(path, blob)
        version = FORMAT_PLAIN_LOSS if loss else FORMAT_PLAIN
        return cls(path, Scan(version, header, len(blob), [], len(blob), len(blob), None))

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], *, expect: LogHeader | None = None, repair: bool = True
    ) -> UpdateLog:
        path = os.fspath(path)
        scan = scan_file(path)
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
            scan = scan_file(path)  # again under the lock: a writer may have finished meanwhile
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
        loss = None
        if self.has_loss:
            if step.loss is None:
                raise ValueError(f"step {step.step}: this log records each step's loss; give Step.loss")
            loss = loss_f32(step.loss)
        # A format 1 log (a job from before losses were logged, resumed) keeps its format: no loss is stored.
        try:
            recs = [StepRecord(step.step, d, g, step.lr, flags, loss) for d, g in enumerate(step.directions)]
            blob = b"".join(r.pack() for r in recs)
            lr, gs = to_f32(step.lr), tuple(to_f32(g) for g in step.directions)
            stored = Step(step.step, lr, gs, step.skipped, loss)
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
            os.ftruncate(fd, self._data_offset + n_steps * self.step_bytes)
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
            expected = self._data_offset + len(self._steps) * self.step_bytes
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
            os.ftruncate(fd, self._data_offset + len(self._steps) * self.step_bytes)


def read_header(path: str | os.PathLike[str]) -> LogHeader:
    path = os.fspath(path)
    with open(path, "rb") as f:
        return parse_header(f, path)[1]
