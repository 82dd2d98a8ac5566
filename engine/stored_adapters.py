"""The adapters a server keeps on disk and serves: succeeded LoRA jobs' and imported ones (a PEFT
directory, or an update log replayed onto this base). Runs on the engine thread, which owns the adapters,
except `replay_log`, which builds new factors on a worker thread."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import rng
from .engine import Engine
from .errors import PreconditionError, RequestError
from .jobs import JobStore
from .peft import LoraAdapter
from .replay import replay_lora
from .update_log import UpdateLog


class StoredAdapters:
    """Loads, imports and deletes the stored adapters of one data dir (JobStore) on one Engine (whose
    engine/adapters.py AdapterRegistry keeps them resident)."""

    def __init__(self, engine: Engine, store: JobStore) -> None:
        self.engine, self.store = engine, store

    @classmethod
    def load(cls, engine: Engine, store: JobStore) -> StoredAdapters:
        """The data dir's adapters, each served: succeeded LoRA jobs' and imported ones."""
        stored = cls(engine, store)
        stored._serve_saved()
        return stored

    def _serve_saved(self) -> None:
        for rec in self.store.list(("succeeded",)):
            adir = self.store.job_dir(rec.id) / "adapter"
            if rec.spec["method"] == "lora" and adir.exists():
                self.engine.put_adapter(rec.id, self._load(adir))
        for d in sorted((self.store.root / "adapters").iterdir()):
            if d.name.endswith(".importing"):  # an import cut short by a crash: never acknowledged
                shutil.rmtree(d, ignore_errors=True)
                continue
            if (d / "adapter" / "adapter_config.json").exists():
                self.engine.put_adapter(d.name, self._load(d / "adapter"))

    def _load(self, path: Path) -> LoraAdapter:
        e = self.engine
        return LoraAdapter.load_peft(path, e.family, e.spec, e.device)

    def replay_log(self, log_path: Path) -> LoraAdapter:
        """An imported LoRA log replayed onto this base and saved beside it as a PEFT adapter. Runs on a
        worker thread (a long log replays for minutes): it reads the base's header and builds new
        factors, touching nothing the engine thread uses; `serve` then makes it an adapter there."""
        e = self.engine
        with UpdateLog.open(log_path, repair=False) as log:
            if log.header.base_fingerprint != e.store.fingerprint:  # not replay.check_base: it names paths
                raise PreconditionError(
                    f"the log was made on base {log.header.base_fingerprint}, this server serves "
                    f"{e.store.fingerprint}; import it on a server of the base model it was trained from",
                    "base",
                )
            if log.header.scope.get("kind") != "lora":
                raise PreconditionError("only LoRA update logs can be served as adapters", "chunk")
            try:
                rng.check_replayable(log.header.generator_version, log.header.noise)
            except ValueError as err:  # its noise would replay differently
                raise PreconditionError(str(err), "chunk") from None
            adapter = replay_lora(e.store, log, device=e.device)
        if not all(bool(torch.isfinite(t).all()) for t in adapter.tensors.values()):
            raise RequestError(
                "the log replays to non-finite weights (inf or NaN); it cannot be served", "chunk"
            )
        adapter.save_peft(log_path.parent / "adapter", str(e.store.dir))
        return adapter

    def serve(self, adapter_id: str, adapter: LoraAdapter) -> None:
        """Engine thread: serve an adapter built elsewhere (`replay_log`) as adapter_id."""
        self.engine.put_adapter(adapter_id, adapter)

    def import_peft(self, adapter_id: str, adapter_dir: Path) -> None:
        """Serve a PEFT LoRA directory as `adapter_id`, validated against this base (targets, shapes)."""
        try:
            adapter = self._load(adapter_dir)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # sent bytes, not a PEFT config
            raise RequestError(f"adapter_config.json is not UTF-8 JSON ({exc})", "file") from None
        except RequestError as exc:  # its messages name the directory: the client sent files, not a path
            msg = str(exc.args[0]).replace(f"{adapter_dir}: ", "").replace(str(adapter_dir), "<upload>")
            raise RequestError(msg, "file", code=exc.code) from None
        if not all(bool(torch.isfinite(t).all()) for t in adapter.tensors.values()):
            raise RequestError("the adapter holds non-finite weights (inf or NaN)", "file")
        self.engine.put_adapter(adapter_id, adapter)

    def delete(self, adapter_id: str) -> None:
        """Stop serving an imported adapter and delete its files (refused while a request uses it)."""
        self.engine.drop_adapter(adapter_id)
        d = self.store.root / "adapters" / adapter_id
        if d.exists():
            shutil.rmtree(d)
