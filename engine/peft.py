"""LoRA adapters: deterministic init, application inside `block`, PEFT-format save/load.

Tensors are named exactly as PEFT names them ("base_model.model.model.layers.0.self_attn.
q_proj.lora_A.weight"): those names key the ZO noise, the update log's replay and the
exported adapter, so one name means one tensor everywhere.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zostream import defaults as D

from . import rng
from .errors import RequestError
from .models.attention import LoraWeights
from .store import open_safetensors, read_safetensors_header, save_safetensors

PEFT_PREFIX = "base_model.model."
INIT_STREAM = 2  # rng stream reserved for adapter init (0: noise z, 1: stochastic rounding)
INIT_SEED_KEY = "zostream_init_seed"
INIT_SCALE_KEY = "zostream_init_scale"  # written only when not 1 (PEFT's init)
# PEFT LoraConfig fields whose non-default values change the forward (scale, extra terms, layer subsets).
_PLAIN_LORA: dict[str, Any] = {
    "use_rslora": False,
    "use_dora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "bias": "none",
    "lora_bias": False,
    "fan_in_fan_out": False,
    "modules_to_save": None,
}

ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear module of the blocks (never the LM head)


def resolve_targets(targets: Sequence[str], modules: Iterable[str]) -> tuple[str, ...]:
    """The LoRA target names a job uses, sorted: `targets` checked against the model's module short names,
    or all of them for "all-linear" (given alone, as PEFT takes it). RequestError names lora_targets; an empty
    list is LoraSpec's to refuse."""
    modules = sorted(modules)
    if ALL_LINEAR in targets:
        if len(targets) > 1:
            raise RequestError(f"{ALL_LINEAR} names every module: give it alone", "lora_targets")
        return tuple(modules)
    unknown = [t for t in targets if t not in modules]
    if unknown:
        raise RequestError(
            f"unknown module(s) {', '.join(unknown)[:200]}; this model has {', '.join(modules)} "
            f"(or {ALL_LINEAR})",
            "lora_targets",
        )
    return tuple(sorted(targets))


def saved_targets(value: Any, family: Any, mspec: Any, where: Path) -> tuple[str, ...]:
    """The module short names of a saved adapter_config's target_modules, as PEFT reads it: "all-linear"; any
    other string as a regular expression fullmatched against each module's full name
    ("model.layers.3.self_attn.q_proj"); a list whose entries each match a full name equal to it or ending in
    "." + it ("q_proj", "self_attn.q_proj"; an entry matching no block module, as "c_attn" on a llama, is
    ignored as PEFT ignores it). The engine's adapters cover every block alike, so the modules picked must be
    the same in every block. RequestError names the adapter."""
    modules = family.module_names(mspec)  # short -> block-local name
    shown = repr(value)[:200]
    if isinstance(value, str) and value != ALL_LINEAR:
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise RequestError(
                f"{where}: target_modules {shown} is not a regular expression ({exc})", "adapter"
            ) from None
        return _same_in_every_layer(pattern.fullmatch, family, mspec, where, shown)
    if not isinstance(value, list | tuple | str) or not all(isinstance(t, str) for t in value):
        raise RequestError(f"{where}: target_modules must be a list of module names or a string", "adapter")
    if value == ALL_LINEAR or ALL_LINEAR in value:  # also in a list, as a hand-written config may say it
        try:
            return resolve_targets([value] if isinstance(value, str) else list(value), modules)
        except RequestError as exc:
            raise RequestError(f"{where}: target_modules: {exc.args[0]}", "adapter") from None
    keys = set(value)
    return _same_in_every_layer(
        lambda full: full in keys or any(full.endswith("." + k) for k in keys), family, mspec, where, shown
    )


def _same_in_every_layer(
    match: Callable[[str], Any], family: Any, mspec: Any, where: Path, shown: str
) -> tuple[str, ...]:
    """The short names `match` picks by full module name, which must be the same non-empty set in every
    layer."""
    modules = family.module_names(mspec)
    picked = [
        frozenset(t for t, local in modules.items() if match(family.layer_prefix(i) + local))
        for i in range(mspec.num_layers)
    ]
    if len(set(picked)) > 1 or not picked[0]:
        raise RequestError(
            f"{where}: target_modules {shown} picks "
            + ("no module" if not any(picked) else "different modules in different layers")
            + f"; the engine serves LoRA on the same modules of every layer ({', '.join(sorted(modules))})",
            "adapter",
        )
    return tuple(sorted(picked[0]))


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    init_seed: int = 0
    # A's init bound as a multiple of PEFT's 1/sqrt(in). B starts at 0 whatever it is, so the adapter starts
    # as the base model; a larger A makes each step on B move B·A further from the first step on (while B = 0,
    # A's own perturbations reach no loss: its normalised steps random-walk it, RMS 0.024 -> 0.055 in 100
    # steps at scale 1 on a 576-wide model, so the init's share of A fades as training goes on).
    init_scale: float = 1.0

    @classmethod
    def from_scope(cls, sc: dict[str, Any]) -> LoraSpec:
        """The spec an update log's scope records (init_scale absent: PEFT's init, as logs before it)."""
        return cls(
            int(sc["r"]),
            float(sc["alpha"]),
            tuple(sc["targets"]),
            int(sc["init_seed"]),
            float(sc.get("init_scale", 1.0)),
        )

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or not 1 <= self.r <= 1024:
            raise RequestError(f"must be an integer in 1..1024, got {self.r!r}", "lora_r")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise RequestError(f"must be a positive number, got {self.alpha!r}", "lora_alpha")
        if not self.targets:
            raise RequestError("name at least one module, e.g. q_proj,v_proj", "lora_targets")
        if not D.lora_init_scale_ok(self.init_scale):
            raise RequestError(
                f"must be a number in (0, {D.LORA_INIT_SCALE_MAX:g}], got {self.init_scale!r}",
                "lora_init_scale",
            )

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_scope(self) -> dict[str, Any]:
        return {
            "kind": "lora",
            "r": self.r,
            "alpha": self.alpha,
            "targets": list(self.targets),
            "init_seed": self.init_seed,
            # only when not PEFT's: logs of jobs with PEFT's init keep the header they always had
            **({"init_scale": float(self.init_scale)} if self.init_scale != 1.0 else {}),
        }


class LoraAdapter:
    """fp32 LoRA factors on the device; `layer(i)` hands them to the family's `block`."""

    def __init__(self, spec: LoraSpec, family: Any, mspec: Any, tensors: dict[str, torch.Tensor]) -> None:
        self.spec, self.family, self.mspec = spec, family, mspec
        self.tensors = tensors
        modules = family.module_names(mspec)
        unknown = [t for t in spec.targets if t not in modules]
        if unknown:
            raise RequestError(
                f"unknown module(s) {', '.join(unknown)}; this model has {', '.join(sorted(modules))}",
                "lora_targets",
            )
        self.modules = {t: modules[t] for t in spec.targets}  # short -> block-local module name

    # ---- names & shapes -----------------------------------------------------------------------
    @staticmethod
    def expected(spec: LoraSpec, family: Any, mspec: Any) -> dict[str, tuple[int, int]]:
        shapes = family.block_tensors(mspec)
        modules = family.module_names(mspec)
        out: dict[str, tuple[int, int]] = {}
        for i in range(mspec.num_layers):
            for t in spec.targets:
                if t not in modules:
                    continue
                out_f, in_f = shapes[modules[t] + ".weight"]
                base = PEFT_PREFIX + family.layer_prefix(i) + modules[t]
                out[base + ".lora_A.weight"] = (spec.r, in_f)
                out[base + ".lora_B.weight"] = (out_f, spec.r)
        return out

    def layer_names(self, i: int) -> list[str]:
        prefix = PEFT_PREFIX + self.family.layer_prefix(i)
        return [n for n in self.tensors if n.startswith(prefix)]

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def init(cls, spec: LoraSpec, family: Any, mspec: Any, device: torch.device) -> LoraAdapter:
        """PEFT's default init scaled by spec.init_scale: A ~ U(±init_scale/√in) (PEFT: kaiming_uniform(a=√5)
        = U(±1/√in)), B = 0; A from our generator."""
        tensors: dict[str, torch.Tensor] = {}
        for name, shape in cls.expected(spec, family, mspec).items():
            if ".lora_A." in name:
                bound = spec.init_scale / math.sqrt(shape[1])
                u = rng.uniform(spec.init_seed, name, 0, shape[0] * shape[1], device, stream=INIT_STREAM)
                tensors[name] = ((u * 2.0 - 1.0) * bound).view(shape)
            else:
                tensors[name] = torch.zeros(shape, dtype=torch.float32, device=device)
        return cls(spec, family, mspec, tensors)

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device if self.tensors else torch.device("cpu")

    def to(self, device: torch.device) -> LoraAdapter:
        """A copy with every factor on `device`."""
        return LoraAdapter(
            self.spec, self.family, self.mspec, {k: v.to(device, copy=True) for k, v in self.tensors.items()}
        )

    def clone(self) -> LoraAdapter:
        return LoraAdapter(
            self.spec, self.family, self.mspec, {k: v.clone() for k, v in self.tensors.items()}
        )

    def layer(
        self, i: int, rows: torch.Tensor | None = None, tensors: dict[str, torch.Tensor] | None = None
    ) -> dict[str, LoraWeights]:
        """Block-local module name -> LoraWeights for block i (`tensors` overrides, e.g. perturbed)."""
        src = tensors if tensors is not None else self.tensors
        prefix = PEFT_PREFIX + self.family.layer_prefix(i)
        return {
            local: LoraWeights(
                src[f"{prefix}{local}.lora_A.weight"],
                src[f"{prefix}{local}.lora_B.weight"],
                self.spec.scale,
                rows,
            )
            for local in self.modules.values()
        }

    # ---- PEFT format --------------------------------------------------------------------------
    def save_peft(self, out_dir: str | os.PathLike, base_model: str = "") -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        cfg = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.spec.r,
            "lora_alpha": self.spec.alpha,
            "target_modules": list(self.spec.targets),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "base_model_name_or_path": base_model,
            "modules_to_save": None,
        }
        # PEFT stores names without the adapter name ("default"); so do we. The init seed goes in the
        # tensor file's metadata: PEFT warns about unknown adapter_config.json keys ("upgrade PEFT").
        save_safetensors(
            {k: v.detach().cpu() for k, v in self.tensors.items()},
            out / "adapter_model.safetensors",
            metadata={
                "format": "pt",
                INIT_SEED_KEY: str(self.spec.init_seed),
                **(
                    {INIT_SCALE_KEY: repr(float(self.spec.init_scale))} if self.spec.init_scale != 1.0 else {}
                ),
            },
        )
        tmp = out / "adapter_config.json.tmp"
        tmp.write_text(json.dumps(cfg, indent=2))
        os.replace(tmp, out / "adapter_config.json")
        return out

    @classmethod
    def load_peft(
        cls, adapter_dir: str | os.PathLike, family: Any, mspec: Any, device: torch.device
    ) -> LoraAdapter:
        d = Path(adapter_dir)
        try:
            cfg = json.loads((d / "adapter_config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise RequestError(f"{d}: not a PEFT adapter directory ({exc})", "adapter") from None
        if cfg.get("peft_type") != "LORA":
            raise RequestError(
                f"{d}: only LoRA adapters are supported, got {cfg.get('peft_type')}", "adapter"
            )
        # Options that change the math: refused, rather than served with silently different logits.
        unsupported = [k for k, plain in _PLAIN_LORA.items() if cfg.get(k, plain) not in (plain, None)]
        if unsupported:
            raise RequestError(
                f"{d}: LoRA option(s) {', '.join(unsupported)} are not supported; use a plain "
                "LoRA adapter (scale lora_alpha / r on every targeted module)",
                "adapter",
            )
        targets = saved_targets(cfg.get("target_modules"), family, mspec, d)
        _, meta = read_safetensors_header(d / "adapter_model.safetensors")
        seed = int(cfg.get(INIT_SEED_KEY, meta.get(INIT_SEED_KEY, 0)))  # in the config: older exports
        try:
            init_scale = float(meta.get(INIT_SCALE_KEY, 1.0))
        except ValueError:
            raise RequestError(f"{d}: metadata {INIT_SCALE_KEY} is not a number", "adapter") from None
        spec = LoraSpec(int(cfg["r"]), float(cfg["lora_alpha"]), targets, seed, init_scale)
        raw = open_safetensors(d / "adapter_model.safetensors")
        want = cls.expected(spec, family, mspec)
        extra = sorted(n for n in raw if n not in want)  # e.g. a pattern that also picked lm_head
        if extra:
            raise RequestError(
                f"{d}: adapter tensor(s) {', '.join(extra[:3])[:300]} are not on the same modules of every "
                "layer; the engine would not apply them",
                "adapter",
            )
        tensors = {}
        for name, shape in want.items():
            if name not in raw or tuple(raw[name].shape) != shape:
                raise RequestError(f"{d}: adapter tensor {name} missing or of the wrong shape", "adapter")
            tensors[name] = raw[name].to(device=device, dtype=torch.float32, copy=True)
        return cls(spec, family, mspec, tensors)
