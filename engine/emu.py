"""The emulated device (`--device emu`): CPU memory playing a separate accelerator.

Compute runs on the CPU as usual; what is emulated is the part of a GPU the streamer drives:
- device memory: every allocation is a real, separate CPU buffer, counted (bytes now and peak);
- copy engines: each stream other than the compute stream is a worker thread executing its
  operations in submission order, so a transfer really is asynchronous to the host;
- events with CUDA semantics: `record(stream)` captures the work submitted to the stream so far,
  `stream.wait_event(ev)` orders later work after it, `query()` / `synchronize()` ask the host;
- the compute stream is the host thread itself: work "on" it runs inline, and waiting it on an event
  blocks the host until the event has completed (the CPU cannot run ahead of its own compute).

Optional injected delays (seeded, per copy) change how copy engines interleave with each other and with
compute, so that a missing wait shows up as a wrong result or a recorded violation instead of luck.

Checks a GPU cannot make, recorded in `violations` (the tests assert it stays empty):
- a region in use by compute (between `begin_use` and `end_use`) is written by a copy;
- compute starts using a region while a copy into it is still queued or running.
The copy timeline (stream, tag, bytes, start, end) shows what overlapped; it also holds the spans
during which compute used a block ("kernels") and those during which the host waited ("host-wait").

Device memory, placed and compute-allocated, is counted by engine/emu_memory.py (EmuDevice's base).
"""

from __future__ import annotations

import atexit
import queue
import random
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .emu_memory import DeviceMemory


@dataclass(frozen=True)
class EmuOptions:
    """max_delay_s: each copy sleeps uniform(0, max_delay_s) first (seeded by seed); 0: no delay.
    host_register: whether registering host memory succeeds (False exercises the staging path)."""

    max_delay_s: float = 0.0
    seed: int = 0
    host_register: bool = True

    def __post_init__(self) -> None:
        if self.max_delay_s < 0:
            raise ValueError(f"max_delay_s must be >= 0, got {self.max_delay_s}")


@dataclass(frozen=True)
class CopyRecord:
    stream: str
    tag: str
    nbytes: int
    start: float
    end: float
    pinned: bool = False  # its host side was registered or pinned(): on CUDA an asynchronous DMA


def _inside(span: tuple[int, int], ranges: Iterable[tuple[int, int]]) -> bool:
    return any(lo <= span[0] and span[1] <= hi for lo, hi in ranges)


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first byte, one past the last byte) of a tensor's memory."""
    n = t.numel() * t.element_size()
    return t.data_ptr(), t.data_ptr() + n


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


class EmuCopyError(RuntimeError):
    """A copy failed on a copy engine (reported at the host's next wait, like an asynchronous CUDA error)."""


class EmuEvent:
    """A CUDA-like event: completes when the work recorded before it on its stream has run."""

    def __init__(self, dev: EmuDevice) -> None:
        self.dev = dev
        self.recorded = 0  # generation of the latest record()
        self.completed = 0  # highest generation that has completed
        self.completed_at = 0.0  # perf_counter() when it last completed (elapsed_time)

    def record(self, stream: EmuStream) -> None:
        with self.dev.cond:
            self.recorded += 1
            gen = self.recorded
        stream._submit(("record", self, gen))

    def query(self) -> bool:
        self.dev.raise_errors()
        with self.dev.cond:
            return self.completed >= self.recorded

    def synchronize(self) -> None:
        """The host waits (recorded in the timeline as "host-wait" when it had to)."""
        with self.dev.cond:
            gen = self.recorded
            self.dev._host_wait(lambda: self.completed >= gen or self.dev.stopped(), "synchronize")
        self.dev.raise_errors()

    def elapsed_time(self, end: EmuEvent) -> float:
        """Milliseconds from this event's completion to `end`'s, as torch.cuda.Event.elapsed_time."""
        with self.dev.cond:
            return (end.completed_at - self.completed_at) * 1e3

    def _complete(self, gen: int) -> None:
        with self.dev.cond:
            self.completed = max(self.completed, gen)
            self.completed_at = time.perf_counter()
            self.dev.cond.notify_all()


class EmuStream:
    """A copy engine (worker thread) or, with host=True, the compute stream (runs inline)."""

    def __init__(self, dev: EmuDevice, name: str, host: bool = False) -> None:
        self.dev, self.name, self.host = dev, name, host
        self._q: queue.Queue = queue.Queue()
        if not host:
            self._thread = threading.Thread(target=self._run, name=f"emu-{name}", daemon=True)
            self._thread.start()
            _STREAMS.add(self)

    def wait_event(self, ev: EmuEvent) -> None:
        with self.dev.cond:
            gen = ev.recorded
        self._submit(("wait", ev, gen))

    def synchronize(self) -> None:
        ev = EmuEvent(self.dev)
        ev.record(self)
        ev.synchronize()

    def _submit(self, op: tuple) -> None:
        if self.host:
            self._execute(op)
            return
        if op[0] == "copy":
            self.dev._queued(op[1])
        self._q.put(op)

    def _run(self) -> None:
        # Host tensors made inside a pass are inference tensors: writing them needs inference mode too.
        with torch.inference_mode():
            while True:
                op = self._q.get()
                if op is None or self.dev.killed:
                    return
                try:
                    self._execute(op)
                except Exception as exc:  # noqa: BLE001 - surfaces on the host at its next sync, as on CUDA
                    with self.dev.cond:
                        self.dev.errors.append(f"{self.name} {op[0]}: {type(exc).__name__}: {exc}")
                        self.dev.cond.notify_all()

    def _execute(self, op: tuple) -> None:
        kind = op[0]
        if kind == "record":
            op[1]._complete(op[2])
        elif kind == "wait":
            ev, gen = op[1], op[2]
            with self.dev.cond:
                done = lambda: ev.completed >= gen or self.dev.stopped()  # noqa: E731
                if self.host:
                    self.dev._host_wait(done, "wait_event")
                else:
                    self.dev.cond.wait_for(done)
            if self.host:
                self.dev.raise_errors()
        else:
            _, dst, src, tag = op
            self.dev._copy(self, dst, src, tag)


class EmuDevice(DeviceMemory):
    """Device memory (emu_memory.DeviceMemory), copy engines and the copy timeline of one accelerator."""

    def __init__(self, options: EmuOptions | None = None) -> None:
        super().__init__(threading.Condition())
        self.options = options or EmuOptions()
        self._rng = random.Random(self.options.seed)
        self.killed = False
        self.bytes_by_stream: dict[str, int] = {}
        self.timeline: list[CopyRecord] = []
        self.violations: list[str] = []
        self.errors: list[str] = []  # failed copies: raised on the host at its next wait or query
        self._pending: list[tuple[int, int]] = []  # destination spans of queued / running copies
        self._in_use: dict[tuple[int, int], str] = {}  # spans compute is reading, and what they hold
        self._use_start: dict[tuple[int, int], float] = {}
        self.registered: dict[int, int] = {}  # host pointer -> bytes of each registration now
        self._pinned: dict[int, tuple[int, int]] = {}  # id -> span of each live pinned() buffer
        self.compute = EmuStream(self, "compute", host=True)
        self._t0 = time.perf_counter()

    # ---- memory ----------------------------------------------------------------------------------
    def empty(self, nbytes: int) -> torch.Tensor:
        """A device buffer of nbytes (uint8), counted until `free(nbytes)`."""
        with self.untracked():
            t = torch.empty(nbytes, dtype=torch.uint8)
        self.account(nbytes)
        return t

    def upload(self, host: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A blocking host -> device copy (resident weights, outer tensors), counted as device memory."""
        with self.untracked():
            dst = torch.empty(host.shape, dtype=host.dtype)
            self.account(dst.numel() * dst.element_size())
            self.copy(dst, host, self.compute, "upload")
            if dtype is not None and dtype != host.dtype:
                out = dst.to(dtype)
                self.account(out.numel() * out.element_size() - dst.numel() * dst.element_size())
                return out
        return dst

    def download(self, host: torch.Tensor, t: torch.Tensor) -> None:
        """A blocking device -> host copy (resident and outer write-back at flush)."""
        self.copy(host, t, self.compute, "download")

    def pinned(self, nbytes: int) -> torch.Tensor:
        """Host staging memory (not device memory: not counted)."""
        t = torch.empty(nbytes, dtype=torch.uint8)
        with self.cond:
            self._pinned[id(t)] = _span(t)
        weakref.finalize(t, self._unpin, id(t))
        return t

    def _unpin(self, key: int) -> None:
        with self.cond:
            self._pinned.pop(key, None)

    def register(self, spans: list[tuple[int, int]], read_only: bool) -> list[int]:
        """Host registration: all or nothing, as on CUDA, which also refuses a range overlapping one
        registered already; EmuOptions.host_register=False refuses it."""
        ranges = sorted((p, p + n) for p, n in spans) + sorted((p, p + n) for p, n in self.registered.items())
        if not self.options.host_register or any(
            _overlap(a, b) for k, a in enumerate(ranges) for b in ranges[k + 1 :]
        ):
            return []
        self.registered.update(spans)
        return [p for p, _ in spans]

    def unregister(self, ptrs: list[int]) -> None:
        for p in ptrs:
            self.registered.pop(p, None)

    def is_pinned(self, t: torch.Tensor) -> bool:
        """Whether t's bytes lie in registered or pinned() host memory."""
        span = _span(t)
        with self.cond:
            regs = [(p, p + n) for p, n in self.registered.items()]
            return _inside(span, regs) or _inside(span, self._pinned.values())

    # ---- streams, events, copies ------------------------------------------------------------------
    def stream(self, name: str) -> EmuStream:
        return EmuStream(self, name)

    def event(self, timing: bool = False) -> EmuEvent:  # every emulated event is timed
        return EmuEvent(self)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream: EmuStream, tag: str = "") -> None:
        """Enqueue dst.copy_(src) on stream (inline on the compute stream)."""
        stream._submit(("copy", dst, src, tag))

    def synchronize(self, *streams: EmuStream) -> None:
        for s in streams:
            s.synchronize()

    def _host_wait(self, done, what: str) -> None:  # noqa: ANN001 - a predicate; called holding cond
        """The host (compute) blocks until done(): a "host-wait" span in the timeline if it had to."""
        if done():
            return
        t0 = time.perf_counter()
        self.cond.wait_for(done)
        self.timeline.append(CopyRecord("host-wait", what, 0, t0 - self._t0, time.perf_counter() - self._t0))

    def kill(self) -> None:
        """The process dies: queued copies never run, waiting threads are released."""
        with self.cond:
            self.killed = True
            self.cond.notify_all()

    def stopped(self) -> bool:
        """Killed, or a copy failed: waits return (and then raise) instead of hanging."""
        return self.killed or bool(self.errors)

    def raise_errors(self) -> None:
        if self.killed:
            raise EmuCopyError("the emulated device was killed (the process is dead: nothing after runs)")
        if self.errors:
            raise EmuCopyError("; ".join(self.errors))

    # ---- ordering checks ---------------------------------------------------------------------------
    def begin_use(self, t: torch.Tensor, what: str) -> None:
        """Compute starts reading t: no copy into it may be queued or running."""
        span = _span(t)
        with self.cond:
            if any(_overlap(span, p) for p in self._pending):
                self.violations.append(f"{what} read before the copy into it completed")
            self._in_use[span] = what
            self._use_start[span] = time.perf_counter()

    def end_use(self, t: torch.Tensor) -> None:
        """Compute is done with t; its span goes into the timeline as stream "kernels" (to see overlap)."""
        span = _span(t)
        with self.cond:
            what = self._in_use.pop(span, None)
            t0 = self._use_start.pop(span, None)
            if what is not None and t0 is not None:
                n = span[1] - span[0]
                self.timeline.append(
                    CopyRecord("kernels", what, n, t0 - self._t0, time.perf_counter() - self._t0)
                )

    def writes_pending(self, t: torch.Tensor) -> bool:
        """Whether a copy into t's memory is queued or running (a counter must not move then)."""
        span = _span(t)
        with self.cond:
            return any(_overlap(span, p) for p in self._pending)

    def _queued(self, dst: torch.Tensor) -> None:
        with self.cond:
            self._pending.append(_span(dst))

    def _copy(self, stream: EmuStream, dst: torch.Tensor, src: torch.Tensor, tag: str) -> None:
        span = _span(dst)
        t0 = time.perf_counter()
        if self.options.max_delay_s and not stream.host:
            with self.cond:
                delay = self._rng.uniform(0, self.options.max_delay_s)
            time.sleep(delay)  # the transfer's duration on the link
        with self.cond:
            for used, what in self._in_use.items():
                if _overlap(span, used):
                    self.violations.append(f"{stream.name} copy {tag!r} overwrote {what} in use by compute")
        dst.copy_(src)
        t1 = time.perf_counter()
        n = dst.numel() * dst.element_size()
        pinned = self.is_pinned(src) or self.is_pinned(dst)
        with self.cond:
            if not stream.host:
                self._pending.remove(span)
            self.bytes_by_stream[stream.name] = self.bytes_by_stream.get(stream.name, 0) + n
            self.timeline.append(CopyRecord(stream.name, tag, n, t0 - self._t0, t1 - self._t0, pinned))


def overlapped(timeline: list[CopyRecord], a: str, b: str, tag_b: str = "") -> float:
    """Seconds during which a record on stream a and one on stream b (whose tag starts with tag_b) ran at
    the same time. Stream "kernels" holds the spans during which compute used a block (begin/end_use)."""
    xs = [r for r in timeline if r.stream == a]
    ys = [r for r in timeline if r.stream == b and r.tag.startswith(tag_b)]
    return sum(max(0.0, min(x.end, y.end) - max(x.start, y.start)) for x in xs for y in ys)


def overlapped_with_compute(timeline: list[CopyRecord], stream: str, tag: str = "") -> tuple[float, float]:
    """(seconds copies on stream with tags starting with tag ran, of them while the host computed): the
    host computes except in its "host-wait" spans (waiting on an event or a stream)."""
    busy = sum(r.end - r.start for r in timeline if r.stream == stream and r.tag.startswith(tag))
    return busy, busy - overlapped(timeline, "host-wait", stream, tag)


_STREAMS: weakref.WeakSet[EmuStream] = weakref.WeakSet()


@atexit.register
def _stop_copy_engines() -> None:
    """Worker threads still blocked inside torch at interpreter exit abort the process: stop them first."""
    streams = list(_STREAMS)
    for s in streams:
        s._q.put(None)
    for s in streams:
        s._thread.join(timeout=1.0)


_DEVICES: dict[int, EmuDevice] = {}
_LOCK = threading.Lock()


def shared_device(index: int = 0) -> EmuDevice:
    """The process's emulated device `index` (what `--device emu` opens): one per process, like a GPU."""
    with _LOCK:
        if index not in _DEVICES:
            _DEVICES[index] = EmuDevice()
        return _DEVICES[index]
