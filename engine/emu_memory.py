"""Device memory of the emulated device: what is placed on it explicitly and what compute allocates.

`account` counts the buffers the device hands out (slots, resident blocks, outer tensors, KV pools).
Inside `track_compute()` each tensor a torch operation creates on the compute thread is device memory
until its storage dies (activations, perturbed work copies, attention scores, logits): a dispatch mode
sees every operation's outputs, and storages that are not views of an input are counted. Not counted:
scratch an operator allocates and frees inside itself, and the slack of a caching allocator (a GPU's
reserved memory is at least `peak`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class DeviceMemory:
    """Bytes of device memory now and at peak, split into placed and compute-allocated (EmuDevice's base)."""

    def __init__(self, cond: threading.Condition) -> None:
        self.cond = cond
        self.allocated = 0  # bytes of device memory now: placed + compute_bytes
        self.peak = 0
        # Compute memory (track_compute): storage pointer -> (weak ref, bytes) of live tensors compute made.
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.compute_bytes = 0  # of `allocated`, the part compute's tensors hold now
        self.compute_peak = 0
        self.placed_peak = 0  # peak of what the streamer placed (weights, slots, KV): the plan's budget
        self._quiet = threading.local()  # device-internal allocations (counted explicitly) are not tracked

    def account(self, nbytes: int) -> None:
        with self.cond:
            self.allocated += nbytes
            self.peak = max(self.peak, self.allocated)
            self.placed_peak = max(self.placed_peak, self.allocated - self.compute_bytes)

    def free(self, nbytes: int) -> None:
        self.account(-nbytes)

    @contextlib.contextmanager
    def track_compute(self) -> Iterator[None]:
        """Count the tensors compute creates on this thread (see the module docstring) while inside.
        Reentrant: a pass opened inside a tracked region is tracked once."""
        if getattr(self._quiet, "tracking", False):
            yield
            return
        self._quiet.tracking = True
        try:
            with _ComputeMemory(self):
                yield
        finally:
            self._quiet.tracking = False
            self.sweep()

    @contextlib.contextmanager
    def untracked(self) -> Iterator[None]:
        """Allocations the caller counts itself (device buffers, the decoded block): not tracked."""
        depth = getattr(self._quiet, "depth", 0)
        self._quiet.depth = depth + 1
        try:
            yield
        finally:
            self._quiet.depth = depth

    def sweep(self) -> None:
        """Uncount compute tensors whose storage has died."""
        with self.cond:
            dead = [p for p, (ref, _) in self._live.items() if ref.expired()]
            for p in dead:
                n = self._live.pop(p)[1]
                self.allocated -= n
                self.compute_bytes -= n

    def _track(self, inputs: set[int], out: object) -> None:
        if getattr(self._quiet, "depth", 0):
            return
        self.sweep()  # frees are seen before the new outputs count, so the peak is of live tensors
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            st = t.untyped_storage()
            p, n = st.data_ptr(), st.nbytes()
            if n == 0 or p in inputs or p in self._live:
                continue  # a view of, or in-place on, memory counted elsewhere or already
            with self.cond:
                self._live[p] = (StorageWeakRef(st), n)
                self.compute_bytes += n
                self.compute_peak = max(self.compute_peak, self.compute_bytes)
            self.account(n)


class _ComputeMemory(TorchDispatchMode):
    """Sees every torch operation on the thread that entered it; new storages are device memory."""

    def __init__(self, dev: DeviceMemory) -> None:
        super().__init__()
        self.dev = dev

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type == "cpu"
        }
        self.dev._track(inputs, out)
        return out
