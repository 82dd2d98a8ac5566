"""The CUDA side of the streamer's device interface (the emulated device in emu.py has the same one).

Memory, streams, events and asynchronous copies; host-memory registration that cannot poison the
context (a failed cudaHostRegister leaves the runtime's last error set, and the next kernel launch
would report it as its own: registration goes through the driver API, which does not). Only the
streamer calls this module.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource

import torch

_CU_MEMHOSTREGISTER_READ_ONLY = 0x08


class CudaDevice:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    @property
    def compute(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=self.device)

    def upload(self, host: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return host.to(self.device, dtype or host.dtype, copy=True)

    def download(self, host: torch.Tensor, t: torch.Tensor) -> None:
        """Blocking device -> host copy (resident and outer write-back at flush)."""
        host.copy_(t)
        torch.cuda.current_stream(self.device).synchronize()

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def register(self, spans: list[tuple[int, int]], read_only: bool) -> list[int]:
        return host_register(spans, read_only)

    def unregister(self, ptrs: list[int]) -> None:
        host_unregister(ptrs)

    def account(self, nbytes: int) -> None:  # the caching allocator counts CUDA memory itself
        pass

    def free(self, nbytes: int) -> None:
        pass

    def track_compute(self) -> contextlib.AbstractContextManager[None]:  # the caching allocator sees compute
        return contextlib.nullcontext()

    def untracked(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def stream(self, name: str) -> torch.cuda.Stream:
        return torch.cuda.Stream(self.device)

    def event(self, timing: bool = False) -> torch.cuda.Event:
        return torch.cuda.Event(enable_timing=timing)  # timing off unless asked: cheaper to record

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stream, tag: str = "") -> None:
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)

    def synchronize(self, *streams) -> None:
        for s in streams:
            s.synchronize()

    def begin_use(self, t: torch.Tensor, what: str) -> None:  # ordering checks exist in emu only
        pass

    def end_use(self, t: torch.Tensor) -> None:
        pass

    def writes_pending(self, t: torch.Tensor) -> bool:
        return False


def memlock_limit() -> int | None:
    """Bytes this process may pin (None: unlimited, or root with CAP_IPC_LOCK)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == resource.RLIM_INFINITY or os.geteuid() == 0:
        return None
    return int(soft)


def _driver() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


def host_register(spans: list[tuple[int, int]], read_only: bool) -> list[int]:
    """Register each (ptr, nbytes) with the driver API; all or nothing. Returns the registered pointers,
    or [] (after unregistering what had succeeded) when any fails or the memlock limit forbids it.

    The driver API (cuMemHostRegister) reports its error by return value only; the runtime's
    cudaHostRegister would also leave it as the runtime's last error, to be raised by the next launch."""
    limit = memlock_limit()
    if limit is not None and sum(n for _, n in spans) > limit:
        return []
    lib = _driver()
    if lib is None:
        return []
    torch.cuda.init()  # the primary context is current on this thread before driver calls
    flags = _CU_MEMHOSTREGISTER_READ_ONLY if read_only else 0
    done: list[int] = []
    for ptr, n in spans:
        if lib.cuMemHostRegister_v2(ctypes.c_void_p(ptr), ctypes.c_size_t(n), ctypes.c_uint(flags)) != 0:
            host_unregister(done)
            return []
        done.append(ptr)
    return done


def host_unregister(ptrs: list[int]) -> None:
    """Before the mapping goes away (unregister before unmap)."""
    lib = _driver()
    if lib is None:
        return
    for ptr in ptrs:
        lib.cuMemHostUnregister(ctypes.c_void_p(ptr))
