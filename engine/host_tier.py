"""HostTier: host RAM as a budgeted tier between the disk and the compute, for a read-only base.

The base is a read-only shared mapping (engine/store.py), so its pages are clean page cache:
they can be read ahead, and dropped and re-read at will, without a copy. Under a host budget
(`--host-memory`) the first blocks that fit stay in RAM; the rest stream from the file:

- readahead: a background thread submits the next `depth` streamed blocks to the disk at once
  (posix_fadvise WILLNEED: a deep request queue) and, mode "read", preads them into a scratch
  buffer, so each is in the page cache before the compute touches it; mode "willneed" does not
  wait (the compute's page faults wait instead);
  it wraps around, so the end of one pass reads the start of the next;
- drop behind: once the pass is past a streamed block, madvise(MADV_DONTNEED) unmaps its
  pages here and posix_fadvise(DONTNEED) evicts them from the page cache, so RAM holds the
  resident blocks plus about `depth + 1` streamed ones whatever the size of the base.

The streamer calls `before(i)` / `after(i)` with block indices; the tier owns no CUDA state.
Linux only (madvise/posix_fadvise, /proc/self/maps); elsewhere `HostTier` is not built.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

PAGE = mmap.PAGESIZE
READ_CHUNK = 16 * 2**20  # pread size: large enough for sequential disk rates, small scratch buffer
_WINDOW = 16 * READ_CHUNK  # measure_read_rate keeps one window queued ahead of its preads
MODES = ("willneed", "read")  # bench/disk.py measured willneed faster on every pass (bench/RESULTS.md)


@dataclass(frozen=True)
class Span:
    """A byte range of a mapped file: where it is in the file and in this process's memory."""

    path: str
    offset: int
    addr: int
    nbytes: int


def file_spans(
    tensors: Iterable[torch.Tensor], maps: list[tuple[int, int, int, str]] | None = None
) -> list[Span]:
    """The file ranges behind `tensors` (mmap views), adjacent ranges merged; tensors in anonymous
    memory (copies) have no file behind them and are left out."""
    maps = read_maps() if maps is None else maps
    ranges = sorted((t.data_ptr(), t.numel() * t.element_size()) for t in tensors)
    spans: list[Span] = []
    for addr, n in ranges:
        if n == 0:
            continue
        hit = next(((s, off, p) for s, e, off, p in maps if s <= addr and addr + n <= e), None)
        if hit is None:
            continue
        start, off, path = hit
        fo = off + addr - start
        last = spans[-1] if spans else None
        if last and last.path == path and last.addr + last.nbytes >= addr:
            end = max(last.addr + last.nbytes, addr + n)
            spans[-1] = Span(path, last.offset, last.addr, end - last.addr)
        else:
            spans.append(Span(path, fo, addr, n))
    return spans


def read_maps() -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of every file-backed mapping of this process."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        out.append((lo, hi, int(parts[2], 16), parts[5]))
    return out


@dataclass(frozen=True)
class HostPlan:
    resident: tuple[int, ...]  # blocks kept in RAM (read once, never dropped)
    streamed: tuple[int, ...]  # blocks read from the file every pass and dropped behind it
    resident_bytes: int
    ring_bytes: int  # RAM for the streamed blocks in flight: (depth + 1) x the largest
    budget: int | None


def plan_host(block_bytes: list[int], outer_bytes: int, budget: int | None, depth: int) -> HostPlan:
    """The first blocks that fit `budget` (after the outer weights and the readahead ring) stay.

    budget None: every block stays (no tier: the page cache decides); 0: every block streams.
    """
    n = len(block_bytes)
    if budget is None:
        return HostPlan(tuple(range(n)), (), sum(block_bytes), 0, None)
    if sum(block_bytes) <= budget - outer_bytes:  # everything fits: no ring needed
        return HostPlan(tuple(range(n)), (), sum(block_bytes), 0, budget)
    ring = (depth + 1) * max(block_bytes, default=0)
    left = budget - outer_bytes - ring
    resident, used = [], 0
    for i in range(n):
        if used + block_bytes[i] > left:
            break
        used += block_bytes[i]
        resident.append(i)
    streamed = tuple(i for i in range(n) if i not in set(resident))
    return HostPlan(tuple(resident), streamed, used, ring if streamed else 0, budget)


@dataclass
class HostStats:
    bytes_read: int = 0  # by the readahead thread (mode willneed: submitted to the disk)
    read_seconds: float = 0.0  # the readahead thread's busy time
    stall_seconds: float = 0.0  # compute waiting for a block to arrive
    dropped_bytes: int = 0
    passes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class HostTier:
    def __init__(
        self,
        spans: list[list[Span]],
        outer_bytes: int,
        budget: int | None,
        depth: int = 2,
        mode: str = "willneed",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"host readahead mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.spans = spans
        self.depth = max(1, depth)
        self.mode = mode
        sizes = [sum(s.nbytes for s in b) for b in spans]
        self.plan = plan_host(sizes, outer_bytes, budget, self.depth)
        self._streamed = set(self.plan.streamed)
        self._loaded: set[int] = set()  # resident blocks already read once
        self._inflight: dict[int, Future] = {}
        self._fds: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="zostream-readahead")
        self._scratch = bytearray(READ_CHUNK)
        self.stats = HostStats()

    def keeps(self, i: int) -> bool:
        """Whether block i stays in RAM (read once, never dropped), rather than streaming from the file."""
        return i not in self._streamed

    # ---- the streamer's hooks --------------------------------------------------------------------
    def before(self, i: int) -> None:
        """Block i is about to be read: wait until it is in RAM, and read ahead the next ones."""
        if i not in self._streamed and i in self._loaded:
            return
        fut = self._inflight.pop(i, None) or self._submit(i)
        t0 = time.perf_counter()
        fut.result()
        self.stats.stall_seconds += time.perf_counter() - t0
        if i not in self._streamed:
            self._loaded.add(i)
        self._read_ahead(i)

    def after(self, i: int) -> None:
        """The pass is past block i: a streamed block leaves RAM (a resident one stays)."""
        if i in self._streamed:
            self.drop(i)
        if self.plan.streamed and i == self.plan.streamed[-1]:
            self.stats.passes += 1

    def drop(self, i: int) -> None:
        """Unmap block i's pages here (MADV_DONTNEED) and evict them from the page cache."""
        for s in self.spans[i]:
            lo, hi = _round_up(s.addr), (s.addr + s.nbytes) // PAGE * PAGE  # whole pages of this block only
            if hi <= lo:
                continue
            _madvise(lo, hi - lo, mmap.MADV_DONTNEED)
            os.posix_fadvise(self._fd(s.path), s.offset + lo - s.addr, hi - lo, os.POSIX_FADV_DONTNEED)
            self.stats.dropped_bytes += hi - lo

    def close(self) -> None:
        """Stop the readahead thread (after the reads in flight) and close the files; idempotent."""
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def ram_bytes(self) -> int:
        """Bytes of the base's blocks now in RAM (measured with mincore, not assumed)."""
        return resident_bytes(s for b in self.spans for s in b)

    # ---- readahead -------------------------------------------------------------------------------
    def _read_ahead(self, i: int) -> None:
        order = self.plan.streamed
        if not order:
            return
        # The next `depth` streamed blocks after i, wrapping into the next pass.
        at = next((k for k, b in enumerate(order) if b > i), 0)
        for k in range(self.depth):
            j = order[(at + k) % len(order)]
            if j != i and j not in self._inflight:
                self._inflight[j] = self._submit(j)

    def _submit(self, i: int) -> Future:
        return self._pool.submit(self._load, i)

    def _load(self, i: int) -> None:
        t0 = time.perf_counter()
        n = 0
        buf = memoryview(self._scratch)
        for s in self.spans[i]:
            fd = self._fd(s.path)
            # WILLNEED submits the whole span to the disk at once (deep queue); "read" then waits for it.
            os.posix_fadvise(fd, s.offset, s.nbytes, os.POSIX_FADV_WILLNEED)
            if self.mode == "willneed":
                n += s.nbytes
                continue
            off, end = s.offset, s.offset + s.nbytes
            while off < end:
                got = os.preadv(fd, [buf[: min(READ_CHUNK, end - off)]], off)
                if got <= 0:
                    break
                off += got
                n += got
        with self.stats._lock:
            self.stats.bytes_read += n
            self.stats.read_seconds += time.perf_counter() - t0

    def _fd(self, path: str) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)
        return fd


def measure_read_rate(paths: Iterable[str], max_bytes: int = 2**30, max_seconds: float = 3.0) -> dict:
    """Sequential read rate of the files from the disk (bytes/s): their pages are evicted first
    (posix_fadvise DONTNEED; pages another process maps stay cached and inflate the figure), read in
    READ_CHUNK preads with the next 256 MiB queued (WILLNEED) up to max_bytes or max_seconds, and
    evicted again."""
    buf = memoryview(bytearray(READ_CHUNK))
    total, t0 = 0, time.perf_counter()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
            off = 0
            while off < size and total < max_bytes and time.perf_counter() - t0 < max_seconds:
                if off % _WINDOW == 0:  # keep the next window queued at the disk, as the tier does
                    os.posix_fadvise(fd, off + _WINDOW, _WINDOW, os.POSIX_FADV_WILLNEED)
                    if off == 0:
                        os.posix_fadvise(fd, 0, _WINDOW, os.POSIX_FADV_WILLNEED)
                    else:  # and evict behind, so a large sample does not crowd the page cache
                        os.posix_fadvise(fd, 0, off, os.POSIX_FADV_DONTNEED)
                got = os.preadv(fd, [buf[: min(READ_CHUNK, size - off)]], off)
                if got <= 0:
                    break
                off += got
                total += got
            os.posix_fadvise(fd, 0, size, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        if total >= max_bytes or time.perf_counter() - t0 >= max_seconds:
            break
    seconds = time.perf_counter() - t0
    return {"bytes": total, "seconds": seconds, "bytes_per_second": total / seconds if seconds > 0 else 0.0}


def process_io() -> dict[str, int]:
    """Process-wide disk counters: bytes the storage layer read, major page faults, RSS of mapped files."""
    out = {"read_bytes": 0, "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt, "rss_file": 0}
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                out["read_bytes"] = int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                out["rss_file"] = int(line.split()[1]) * 1024
    except OSError:  # no /proc (not Linux): only the fault count
        pass
    return out


def _round_up(x: int) -> int:
    return (x + PAGE - 1) // PAGE * PAGE


_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _madvise(addr: int, n: int, advice: int) -> None:
    if _libc.madvise(addr, n, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"madvise({advice}) of {n} bytes failed: {os.strerror(err)}")


_libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p)


def resident_bytes(spans: Iterable[Span]) -> int:
    """Bytes of `spans` now in RAM (mincore over their whole pages)."""
    total = 0
    for s in spans:
        lo = s.addr // PAGE * PAGE
        pages = (_round_up(s.addr + s.nbytes) - lo) // PAGE
        vec = ctypes.create_string_buffer(pages)
        if _libc.mincore(lo, pages * PAGE, vec) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore of {pages} pages failed: {os.strerror(err)}")
        total += (pages - vec.raw.count(0)) * PAGE  # bit 0: resident; the other bits are reserved (0)
    return total
