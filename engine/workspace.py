"""Host buffers a training job reuses from step to step instead of allocating them afresh.

The largest tensors of a ZO step on the CPU are the head's logits ([N, V]: 1008 target positions x
49152 tokens in bf16 is 100 MB for SmolLM2-135M at batch 16 x 64) and the outer tensors' work copies
(θ ± εz of the 28M-element embedding: 57 MB each). glibc serves allocations that large with a fresh
mmap, so every forward (every pass) paid their zero-filled page faults before writing: ~40 ms of a
170 ms head GEMM, ~60 ms of a 90 ms embedding ± pair at one thread (bench/RESULTS.md). Buffers kept by
the trainer are faulted in once. Only on the direct CPU path: the CUDA caching allocator already reuses
memory, and the emulated device (which plays a GPU in CPU memory) allocates as a GPU would.
"""

from __future__ import annotations

import math

import torch


class Workspace:
    """A growable scratch buffer (`take`) and named buffers that keep their identity (`buffer`)."""

    def __init__(self, enabled: bool = True) -> None:
        """enabled False: every request answers None (the caller allocates), as off the CPU."""
        self.enabled = enabled
        self._buf: torch.Tensor | None = None
        self._named: dict[object, torch.Tensor] = {}

    def take(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """A [shape] view of the buffer (its old contents, not zeroed); None off the CPU."""
        if device.type != "cpu" or not self.enabled:
            return None
        n = math.prod(shape)
        if self._buf is None or self._buf.dtype != dtype or self._buf.numel() < n:
            self._buf = None  # free the old buffer before the new one exists
            self._buf = torch.empty(n, dtype=dtype)
        return self._buf[:n].view(shape)

    def buffer(self, key: object, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """The flat [n] buffer of `key` (its old contents); None off the CPU. The caller owns its use:
        the next request for the same key returns the same memory."""
        if device.type != "cpu" or not self.enabled:
            return None
        buf = self._named.get(key)
        if buf is None or buf.dtype != dtype or buf.numel() != n:
            self._named.pop(key, None)
            buf = self._named[key] = torch.empty(n, dtype=dtype)
        return buf
