"""Frozen, validated configuration dataclasses. Errors say what to do."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from zostream import defaults as D

from .climb import ClimbRule

CODECS = ("none", "int8", "nf4")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(text: str | int | float | None, field_name: str = "gpu_memory") -> int | None:
    """'24GiB' / '24G' / '1.5e9' / 0 → bytes; None or 'auto' → None (use what the device has)."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "auto")):
        return None
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"{field_name} must be >= 0 bytes, got {text}")
        return int(text)
    m = _SIZE_RE.match(text)
    if not m:
        try:
            return parse_size(float(text), field_name)
        except ValueError:
            raise ValueError(
                f"{field_name}: cannot read size {text!r}; "
                "use a number of bytes or a unit, e.g. 24GiB, 512MB, 0"
            ) from None
    num, unit = float(m.group(1)), (m.group(2) or "").lower()
    base = 1024 if "i" in unit else 1000
    mult = 1 if unit in ("", "b") else base ** ("kmgt".index(unit[0]) + 1)
    return int(num * mult)


@dataclass(frozen=True)
class StreamConfig:
    """How blocks reach the compute device.

    gpu_memory_bytes: weight budget on the device (None: all free memory; 0: stream every block).
    prefetch_depth: blocks in flight ahead of compute (>= 2 hides the copy behind compute).
    host_memory_bytes: RAM budget for the read-only base (None: no limit, the page cache decides;
        0: every block is read from the file each pass, read ahead and dropped behind it).
    master_dir: where a full-parameter job keeps its master (None: the job directory). A tmpfs such as
        /dev/shm makes it shared memory, which CUDA can register; it lasts until a restart
        (engine/working_copy.py).
    """

    gpu_memory_bytes: int | None = None
    prefetch_depth: int = 2
    register_host_memory: bool = True
    host_memory_bytes: int | None = None
    master_dir: str | None = None

    def __post_init__(self) -> None:
        if self.gpu_memory_bytes is not None and self.gpu_memory_bytes < 0:
            raise ValueError("gpu_memory must be >= 0 (0 streams every block)")
        if self.host_memory_bytes is not None and self.host_memory_bytes < 0:
            raise ValueError("host_memory must be >= 0 bytes (0 reads every block from disk each pass)")
        if not 1 <= self.prefetch_depth <= 8:
            raise ValueError(f"prefetch_depth must be in 1..8, got {self.prefetch_depth}")


@dataclass(frozen=True)
class CodecConfig:
    """Transfer codec for the frozen base: none (model dtype), int8 (blockwise) or nf4."""

    name: str = "none"
    blocksize: int = 64
    cache_dir: str | None = None  # None: the user cache dir

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {self.name!r}")
        if self.blocksize not in (64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"codec blocksize must be a power of two in 64..4096, got {self.blocksize}")


@dataclass(frozen=True)
class LimitsConfig:
    """Admission limits: what a request may ask and what the KV cache holds."""

    max_batch: int = 8
    max_seq_len: int = D.SERVER_MAX_SEQ_LEN
    max_new_tokens: int = D.SERVER_MAX_NEW_TOKENS
    max_waiting: int = 256
    max_prefill_tokens: int = 4096
    # LoRA adapters kept on the device between passes (LRU; the rest wait on the host). None: all.
    max_resident_adapters: int | None = None
    # Paged KV cache: positions per block, and the pool's bytes (None: max_batch full sequences, at
    # most half a nonzero gpu_memory budget; kv_cache.plan_kv).
    kv_block_size: int = 16
    kv_memory_bytes: int | None = None
    # Streamed layers' KV in host memory, copied up with the layer's weights and back (kv_offload.py).
    kv_offload: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_seq_len", "max_new_tokens", "max_waiting", "max_prefill_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kv_block_size not in (1, 2, 4, 8, 16, 32, 64, 128, 256):
            raise ValueError(f"kv_block_size must be a power of two in 1..256, got {self.kv_block_size}")
        if self.kv_memory_bytes is not None and self.kv_memory_bytes < 1:
            raise ValueError(f"kv_memory must be > 0 bytes (or auto), got {self.kv_memory_bytes}")


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    device: str = "auto"  # auto | cpu | cuda | cuda:N | emu (CPU memory playing a GPU: engine/emu.py)
    compute_dtype: str = "auto"  # auto: the model's dtype; float32 on a CPU without its kernels
    stream: StreamConfig = field(default_factory=StreamConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)

    def __post_init__(self) -> None:
        if not self.model_dir:
            raise ValueError("model_dir is required: a Hugging Face model directory")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}"
            )
        if not re.fullmatch(r"auto|cpu|emu|cuda(:\d+)?", self.device):
            raise ValueError(f"device must be auto, cpu, emu, cuda or cuda:N, got {self.device!r}")


METHODS = ("full", "lora")
LR_SCHEDULES = ("constant", "linear", "cosine")
NOISE = ("gaussian", "rademacher")
MASTER_DTYPES = ("auto", "float32", "bfloat16", "float16")
LOSSES = ("auto", "tokens", "candidates")
ESTIMATORS = ("auto", "mezo", "fzoo", "grzo")
# The estimators' defaults are the API's (zostream/defaults.py, stated in the proto comments).
FZOO_LR, FZOO_EPS, FZOO_Q = D.FZOO_LR, D.FZOO_EPS, D.FZOO_Q
GRZO_LR, GRZO_EPS, GRZO_Q = D.GRZO_LR, D.GRZO_EPS, D.GRZO_Q


def grzo_q(batch_size: int) -> int:
    """grzo's default q: GRZO_Q groups, or the largest divisor of the batch below it."""
    return max(d for d in range(1, min(batch_size, GRZO_Q) + 1) if batch_size % d == 0)


def _auto_estimator(method: str, q: int | None, batch_size: int) -> str:
    if q == 1:
        return "mezo"
    groups = grzo_q(batch_size) if q is None else q
    ok = isinstance(batch_size, int) and batch_size >= 1 and groups >= 2 and batch_size % groups == 0
    return "grzo" if ok else "fzoo"


@dataclass(frozen=True)
class ZOConfig:
    """A zeroth-order fine-tuning job's hyperparameters (MeZO defaults for the method)."""

    method: str = "lora"
    steps: int = 100
    lr: float | None = None  # None: the estimator's default for the method (zostream/defaults.py)
    eps: float | None = None  # None: likewise (GRZO_EPS, FZOO_EPS, EPS for mezo)
    batch_size: int = D.BATCH_SIZE
    q: int | None = None  # directions per step; None: defaults.Q for mezo, 4 for fzoo, grzo_q(batch) for grzo
    seed: int = 0
    lr_schedule: str = "auto"  # auto: cosine for grzo, else constant (the `schedule` property)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    # What a LoRA job serves: the EMA of its factors with this decay (engine/averaging.py); 0: the last
    # iterate. None: defaults.AVERAGE_DECAY for the method (full-parameter jobs keep none).
    average_decay: float | None = None
    noise: str = "gaussian"
    master_dtype: str = "auto"  # auto: float32 for lora; the base dtype (stochastic rounding) for full
    lora_r: int = D.LORA_R
    lora_alpha: float = D.lora_alpha(D.LORA_R)
    lora_targets: tuple[str, ...] = D.LORA_TARGETS
    lora_init_scale: float = D.LORA_INIT_SCALE  # A's init bound over PEFT's 1/sqrt(in) (engine/peft.py)
    max_len: int = D.MAX_LEN
    eval_every: int = D.EVAL_EVERY
    checkpoint_every: int = D.CHECKPOINT_EVERY  # 0: only the export after the last step
    # The divergence guard: skip outlier steps (climb.divergence_check) and back the lr off on a slow climb of
    # the training loss (engine/climb.py; a new job's log header keeps the climb_* three, resume uses those).
    divergence_guard: bool = True
    climb_window: int = 20  # steps per window of the slow-climb rule
    climb_rise: float = 0.5  # trip when the recent window's mean loss is this share above the best earlier
    climb_backoff: float = 0.5  # lr multiplier per trip
    # Examples per forward: the batch runs as batch_size // micro_batch slices in one pass, and the loss is
    # their summed NLL over their summed token count (see workloads.reduce_partials). None: one slice. The
    # bytes of the log depend on it (padding changes the matmul shapes); a data-parallel run over W ranks
    # equals a single process with the same micro_batch (docs/SCALE_OUT.md).
    micro_batch: int | None = None
    # What a step minimises and how it estimates the gradient (engine/losses.py, engine/estimators.py).
    # loss auto: candidates for choice data, else tokens. estimator auto: mezo when q = 1; grzo when q (or
    # its default) makes >= 2 groups of the batch; else fzoo.
    loss: str = "auto"
    choice_score: str = "mean"  # candidates loss: length-normalised (mean) or summed log-likelihood
    estimator: str = D.ESTIMATOR

    def __post_init__(self) -> None:
        def bad(field_name: str, what: str) -> None:
            raise ValueError(f"{field_name}: {what}")

        if self.method not in METHODS:
            bad("method", f"must be full or lora, got {self.method!r}")
        if not isinstance(self.steps, int) or not 1 <= self.steps <= 10_000_000:
            bad("steps", f"must be an integer in 1..10000000, got {self.steps!r}")
        for name in ("lr", "eps"):
            v = getattr(self, name)
            if v is not None and not (v > 0 and v < 1e3):
                bad(name, f"must be a positive number, got {v!r}")
        if not isinstance(self.batch_size, int) or not 1 <= self.batch_size <= 4096:
            bad("batch_size", f"must be an integer in 1..4096, got {self.batch_size!r}")
        if self.estimator not in ESTIMATORS:
            bad("estimator", f"must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.estimator == "auto":
            object.__setattr__(self, "estimator", _auto_estimator(self.method, self.q, self.batch_size))
        if self.q is None:
            q = {"fzoo": FZOO_Q, "grzo": grzo_q(self.batch_size)}.get(self.estimator, D.Q)
            object.__setattr__(self, "q", q)
        if not isinstance(self.q, int) or not 1 <= self.q <= 64:
            bad("q", f"must be an integer in 1..64, got {self.q!r}")
        if self.estimator == "fzoo" and self.q < 2:
            bad("q", f"fzoo normalises by the spread of q one-sided losses and needs q >= 2, got {self.q}")
        if self.estimator == "grzo" and (self.q < 2 or self.batch_size % self.q):
            bad("q", f"grzo needs q >= 2 groups dividing batch_size ({self.batch_size}), got {self.q}")
        if self.loss not in LOSSES:
            bad("loss", f"must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.choice_score not in ("mean", "sum"):
            bad("choice_score", f"must be mean or sum, got {self.choice_score!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            bad("seed", f"must be an integer in [0, 2^63), got {self.seed!r}")
        if self.lr_schedule not in ("auto", *LR_SCHEDULES):
            bad("lr_schedule", f"must be auto or one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}")
        if not 0 <= self.warmup_steps <= self.steps:
            bad("warmup_steps", f"must be in 0..steps, got {self.warmup_steps!r}")
        if not 0 <= self.weight_decay < 1:
            bad("weight_decay", f"must be in [0, 1), got {self.weight_decay!r}")
        ad = self.average_decay
        if ad is not None and (isinstance(ad, bool) or not isinstance(ad, float | int) or not 0 <= ad < 1):
            bad("average_decay", f"must be in [0, 1) (0: serve the last iterate), got {ad!r}")
        if self.method == "full" and self.average:
            bad(
                "average_decay",
                "a full-parameter job keeps no average of its weights (it would be a second copy of the "
                "model); set 0, or use method lora",
            )
        if not D.lora_init_scale_ok(self.lora_init_scale):
            bad(
                "lora_init_scale",
                f"must be a number in (0, {D.LORA_INIT_SCALE_MAX:g}] (1: PEFT's init), "
                f"got {self.lora_init_scale!r}",
            )
        if self.noise not in NOISE:
            bad("noise", f"must be gaussian or rademacher, got {self.noise!r}")
        if self.master_dtype not in MASTER_DTYPES:
            bad("master_dtype", f"must be one of {', '.join(MASTER_DTYPES)}, got {self.master_dtype!r}")
        if not 16 <= self.max_len <= 1 << 20:
            bad("max_len", f"must be in 16..1048576, got {self.max_len!r}")
        if self.eval_every < 0 or self.checkpoint_every < 0:
            bad("eval_every", "eval_every and checkpoint_every must be >= 0")
        try:
            self.climb_rule()
        except ValueError as e:
            bad(str(e).split(" ", 1)[0], str(e).split(" ", 1)[1])
        mb = self.micro_batch
        if mb is not None and (
            not isinstance(mb, int) or not 1 <= mb <= self.batch_size or self.batch_size % mb
        ):
            bad("micro_batch", f"must divide batch_size ({self.batch_size}), got {mb!r}")

    def climb_rule(self) -> ClimbRule:
        """The slow-climb rule's thresholds (engine/climb.py)."""
        return ClimbRule(self.climb_window, self.climb_rise, self.climb_backoff)

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.estimator == "fzoo":  # unit-scale coefficients: the lr is the step per coordinate
            return FZOO_LR[self.method]
        if self.estimator == "grzo":
            return GRZO_LR[self.method]
        return D.LR[self.method]

    @property
    def average(self) -> float:
        """The decay of the average a LoRA job serves (engine/averaging.py); 0: none."""
        if self.average_decay is not None:
            return float(self.average_decay)
        return D.AVERAGE_DECAY[self.method]

    @property
    def schedule(self) -> str:
        """The lr schedule the job runs: lr_schedule, with auto resolved by the estimator."""
        if self.lr_schedule != "auto":
            return self.lr_schedule
        return "cosine" if self.estimator == "grzo" else "constant"

    @property
    def micro_batch_size(self) -> int:
        return self.micro_batch or self.batch_size

    @property
    def epsilon(self) -> float:
        if self.eps is not None:
            return self.eps
        if self.estimator == "grzo":
            return GRZO_EPS[self.method]
        return FZOO_EPS[self.method] if self.estimator == "fzoo" else D.EPS
