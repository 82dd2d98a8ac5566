"""A full-parameter job's working copy: the base converted to the master dtype, in the
job directory, mapped shared (writes go to the file: durable, no RAM beyond page cache).

Per-group step counters make a crash mid-pass recoverable: `applied[g] = k` means steps
0..k-1 are in group g's tensors; while step k is being written the counter holds
-(k+1). On open, a group caught mid-write is rebuilt from the base (counter 0) and
then catches up from the log like every other group. On a copying device (cuda, emu) the
tensors written are the host copy, by the streamer's write-back: the counter takes the torn
mark before the copy starts and its new value once the copy has landed.

What is durable against what:
- process death (kill -9, OOM) at any point: the page cache outlives the process, so the
  working copy and its counters are trusted as they are (torn groups rebuilt, as above);
- power loss / machine restart: only the update log is durable (fsync'd per step). Pages of a
  shared mapping reach the disk in any order, counters possibly before the tensors they count,
  so after a restart (a new boot id) every group is rebuilt from the base and the trainer replays
  the whole log into it. Nothing is msync'd on the hot path: the log is the record, this is a cache.

Where the master lives (`StreamConfig.master_dir`): by default in the job directory, on its file
system. CUDA then has to register (pin) a writable shared mapping of a regular file, which recent
kernels refuse for long-term pins; the streamer falls back to a staging ring (an extra host copy each
way). With `master_dir` on a tmpfs (/dev/shm) the master is shared memory, which CUDA can register, and
the job directory's `working` is a symbolic link to `master_dir/zostream-master-<hash of the job
directory>`. Shared memory outlives the process (kill -9 resumes as above) but not a restart, where the
link dangles: the master is made again from the base and the whole log is replayed, as after a power
loss. The cost: the master's bytes in RAM (tmpfs pages are not written to disk, and cannot be dropped).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from .errors import ResourceExhaustedError
from .store import WeightStore, save_safetensors

_COPY_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class WorkingCopy:
    OUTER = 0  # group index of the outer tensors; block i is group i + 1

    def __init__(
        self,
        directory: str | os.PathLike,
        base: WeightStore,
        master_dtype: torch.dtype,
        master_dir: str | os.PathLike | None = None,
    ) -> None:
        """directory: the job's `working`; master_dir: keep the master there instead (a tmpfs such as
        /dev/shm, so CUDA can register it), with `directory` a symbolic link to it."""
        self.base = base
        self.master_dtype = master_dtype
        self.dir = Path(directory) if master_dir is None else _link_master(Path(directory), Path(master_dir))
        if not (self.dir / "model.safetensors").exists():
            self._check_room()
            self._create()
        self.store = WeightStore(self.dir, writable=True)
        self.groups = base.num_layers + 1
        counters = self.dir / "applied.bin"
        if not counters.exists():
            np.zeros(self.groups, dtype=np.int64).tofile(counters)
        self.applied = np.memmap(counters, dtype=np.int64, mode="r+", shape=(self.groups,))
        boot, mark = boot_id(), self.dir / "boot_id"
        restarted = boot is not None and mark.exists() and mark.read_text() != boot
        for g in range(self.groups):
            if restarted or self.applied[g] < 0:  # killed while writing a step into this group
                self._rebuild(g)
        if boot is not None and (restarted or not mark.exists()):
            mark.write_text(boot)  # after the rebuild: a kill during it rebuilds again on the next open

    def nbytes(self) -> int:
        """Bytes of the master (every tensor in the master dtype)."""
        names = self.base.family.expected_tensors(self.base.spec)
        return sum(self.base.tensor(n).numel() for n in names) * self.master_dtype.itemsize

    def _check_room(self) -> None:
        need, free = self.nbytes(), shutil.disk_usage(self.dir.parent).free
        if need > free:
            raise ResourceExhaustedError(
                f"the full-parameter master needs {need / 1e9:.2f} GB in {self.dir.parent}, which has "
                f"{free / 1e9:.2f} GB free: free space there (a tmpfs: mount it larger, e.g. docker "
                "--shm-size) or keep the master in the job directory (no master_dir)",
                "master_dir",
                reason="MASTER_NO_ROOM",
                retry_after_s=None,
            )

    def _create(self) -> None:
        tmp = self.dir.with_name(self.dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name in _COPY_FILES:
            if (self.base.dir / name).exists():
                shutil.copy2(self.base.dir / name, tmp / name)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["dtype"] = cfg["torch_dtype"] = _DTYPE_NAMES[self.master_dtype]
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        tensors = {
            n: self.base.tensor(n).to(self.master_dtype)
            for n in self.base.family.expected_tensors(self.base.spec)
        }
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        np.zeros(self.base.num_layers + 1, dtype=np.int64).tofile(tmp / "applied.bin")
        os.replace(tmp, self.dir)

    def _rebuild(self, g: int) -> None:
        for name, t in self.group_tensors(g).items():
            t.copy_(self.base.tensor(name).to(self.master_dtype))
        self.applied[g] = 0
        self.applied.flush()

    def group_tensors(self, g: int) -> dict[str, torch.Tensor]:
        """Full name -> writable tensor (a view of the shared mapping)."""
        if g == self.OUTER:
            return self.store.outer()
        prefix = self.store.family.layer_prefix(g - 1)
        return {prefix + k: v for k, v in self.store.block(g - 1).items()}

    def begin_write(self, g: int, step: int) -> None:
        self.applied[g] = -(step + 1)

    def end_write(self, g: int, step: int) -> None:
        self.applied[g] = step + 1

    def export(self, out_dir: str | os.PathLike) -> Path:
        """Copy the (flushed) working copy to a standalone model directory."""
        out = Path(out_dir)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for p in self.dir.iterdir():
            if p.name not in ("applied.bin", "boot_id"):
                shutil.copy2(p, tmp / p.name)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
        return out


def _link_master(link: Path, master_dir: Path) -> Path:
    """The master's directory under master_dir for the job whose `working` is link; link points to it.
    A real directory at link (the master was kept in the job directory before) gives way: the new
    master is made from the base and the log replayed, as after a restart."""
    if not master_dir.is_dir():
        raise ResourceExhaustedError(
            f"{master_dir} is not a directory: create it (a tmpfs such as /dev/shm) or drop master_dir",
            "master_dir",
            reason="MASTER_DIR_MISSING",
            retry_after_s=None,
        )
    key = hashlib.sha256(str(link.parent.resolve()).encode()).hexdigest()[:16]
    target = master_dir.resolve() / f"zostream-master-{key}"
    if link.is_symlink():
        if Path(os.readlink(link)) == target:
            return target
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)
    return target


def boot_id() -> str | None:
    """This boot of the machine (Linux); None where the system does not say."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def save_model_dir(store: WeightStore, tensors: dict[str, torch.Tensor], out_dir: str | os.PathLike) -> Path:
    """A standalone HF model directory: the base's config/tokenizer files + these tensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in _COPY_FILES:
        if (store.dir / name).exists():
            shutil.copy2(store.dir / name, out / name)
    save_safetensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
