"""The catalogue of zostream's Prometheus metric families: names, meanings, labels and their allowed values.

Pure data (no prometheus_client import): engine/metrics.py builds the registry from it, the README and the
dashboard tests read DOCS. Every label has a small, fixed set of values (finish reason, job status, pass
kind, memory kind, fine-tuning method, codec): request and job ids are never labels, so the number of series
stays constant however many requests and jobs the engine serves.
"""

from __future__ import annotations

from dataclasses import dataclass

# 1 ms .. 120 s: a decode token on a resident model is ~ms, a streamed pass over a huge model is
# seconds, a queued long generation is minutes (anything slower lands in +Inf).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip

# Long generations (minutes) and training steps of a big streamed model (minutes each) need room past
# 120 s: end-to-end latency, pass and step histograms use these.
LONG_BUCKETS = (*LATENCY_BUCKETS, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
LONG_FAMILIES = (
    "zostream_request_latency_seconds",
    "zostream_pass_seconds",
    "zostream_finetune_step_seconds",
    "zostream_request_queue_seconds",
)

# ErrorInfo.reason values a refused call can carry (server/status.py); anything else counts as OTHER.
REJECT_REASONS = (
    "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED",
    "UNAVAILABLE", "UNAUTHENTICATED", "QUEUE_FULL", "TOO_MANY_IN_FLIGHT", "SERVER_DRAINING", "ENGINE_LOADING",
    "ENGINE_FAILED", "UPLOAD_TOO_LARGE", "MALFORMED_REQUEST", "API_KEY_INVALID", "OTHER",
)  # fmt: skip

# Mirrors engine.generation.FinishReason values (a test checks they agree).
FINISH_REASONS = ("max_tokens", "eos_token", "stop_sequence", "cancelled", "time_limit", "error")
JOB_STATUSES = ("queued", "running", "cancelling", "succeeded", "failed", "cancelled")
MEMORY_KINDS = ("allocated", "reserved", "budget")
PASS_KINDS = ("generate", "train", "mixed")
METHODS = ("full", "lora")
KV_BLOCK_STATES = ("used", "free")
# new K/V stored; K/V the attention gathered through block tables; offloaded K/V uploaded / written back
KV_OPS = ("written", "read", "h2d", "d2h")
# Which front end a request came through: every per-request family carries it as a second label.
APIS = ("grpc", "http")


@dataclass(frozen=True)
class Spec:
    kind: str  # gauge | counter | histogram
    name: str  # the sample name as PromQL sees it (counters end in _total)
    doc: str
    label: str | None = None
    values: tuple[str, ...] = ()  # the allowed label values; () = open (bounded by config, e.g. codec)
    preset: bool = True  # create every allowed series at 0 from the start (absent until set if False)
    per_api: bool = False  # also labelled `api` (APIS): observed once per request, by its front end


# One line per family; "what" is the one-line meaning the README renders (DOCS).
# fmt: off
SPECS: tuple[Spec, ...] = (
    # ---- gauges ----
    Spec("gauge", "zostream_engine_up", "1 while the engine is serving, 0 otherwise"),
    Spec("gauge", "zostream_requests_running", "generation requests holding a KV-cache slot"),
    Spec("gauge", "zostream_requests_waiting", "generation requests queued for a slot"),
    Spec("gauge", "zostream_gpu_memory_bytes", "device bytes: torch allocated / reserved, weight budget",
          "kind", MEMORY_KINDS, preset=False),  # a CPU engine has none; 0 would read "stream all"
    Spec("gauge", "zostream_jobs", "fine-tuning jobs by status", "status", JOB_STATUSES),
    Spec("gauge", "zostream_finetune_loss", "mean of L+ and L- of the latest fine-tuning step"),
    Spec("gauge", "zostream_finetune_loss_plus", "L+ = loss(theta + eps z) of the latest step"),
    Spec("gauge", "zostream_finetune_loss_minus", "L- = loss(theta - eps z) of the latest step"),
    Spec("gauge", "zostream_finetune_projected_grad", "g = (L+ - L-) / 2eps of the latest step"),
    Spec("gauge", "zostream_finetune_learning_rate", "learning rate of the latest step"),
    Spec("gauge", "zostream_resident_blocks", "transformer blocks kept on the device"),
    Spec("gauge", "zostream_streamed_blocks", "transformer blocks streamed from host memory every pass"),
    Spec("gauge", "zostream_kv_blocks", "paged KV cache blocks holding live tokens / free", "state",
          KV_BLOCK_STATES),
    Spec("gauge", "zostream_adapters_resident", "LoRA adapters on the device (--max-resident-adapters)"),
    Spec("gauge", "zostream_job_progress_ratio", "steps done / steps of the training job, 0..1"),
    Spec("gauge", "zostream_finetune_eval_loss", "held-out loss at the latest evaluation", preset=False),
    Spec("gauge", "zostream_finetune_eval_accuracy", "held-out accuracy at the latest evaluation ('choice')",
          preset=False),
    # ---- histograms (seconds) ----
    Spec("histogram", "zostream_time_to_first_token_seconds", "arrival to first generated token"),
    Spec("histogram", "zostream_inter_token_latency_seconds",
          "time between a request's consecutive tokens, one sample per token after the first", per_api=True),
    Spec("histogram", "zostream_time_per_output_token_seconds",
          "per request: (latency - TTFT) / (tokens - 1), or latency / tokens when TTFT is unknown",
          per_api=True),
    Spec("histogram", "zostream_request_latency_seconds", "end to end: arrival to the final event",
          per_api=True),
    Spec("histogram", "zostream_request_queue_seconds", "arrival to admission into a pass"),
    Spec("histogram", "zostream_pass_seconds", "one pass over the layers, by what it carried",
          "kind", PASS_KINDS),
    Spec("histogram", "zostream_finetune_step_seconds", "wall time of a pass that carried a ZO step"),
    # ---- counters ----
    Spec("counter", "zostream_prompt_tokens_total", "prompt tokens prefilled"),
    Spec("counter", "zostream_generation_tokens_total", "tokens generated"),
    Spec("counter", "zostream_requests_total", "finished generation requests by finish reason and API",
          "finish_reason", FINISH_REASONS, per_api=True),
    Spec("counter", "zostream_h2d_bytes_total", "bytes copied host to device, by transfer codec", "codec"),
    Spec("counter", "zostream_d2h_bytes_total", "bytes copied device to host (write-back)"),
    Spec("counter", "zostream_transfer_stall_seconds_total",
          "seconds compute waited on a layer transfer (its rate is the stalled fraction)"),
    Spec("counter", "zostream_layer_transfer_seconds_total", "seconds spent moving layers to the device"),
    Spec("counter", "zostream_layer_compute_seconds_total", "pass seconds not stalled on a transfer"),
    Spec("counter", "zostream_finetune_steps_total", "fine-tuning steps logged (skipped ones included)",
          "method", METHODS),
    Spec("counter", "zostream_finetune_skipped_steps_total", "steps the divergence guard skipped"),
    Spec("counter", "zostream_finetune_climb_trips_total",
          "slow climbs of the training loss the divergence guard answered with an lr backoff"),
    Spec("counter", "zostream_finetune_tokens_total", "tokens the fine-tuning steps trained on"),
    Spec("counter", "zostream_update_log_bytes_total", "bytes appended to update logs"),
    Spec("counter", "zostream_kv_bytes_total", "KV cache bytes moved (rate: bytes/s)", "op", KV_OPS),
    Spec("counter", "zostream_kv_preemptions_total", "sequences preempted for KV blocks (prefilled again)"),
    # ---- host tier and disk (a base larger than RAM); read from the process, see observe_disk ----
    Spec("counter", "zostream_disk_read_bytes_total",
          "bytes this process read from storage (rate: disk bytes/s)"),
    Spec("counter", "zostream_major_page_faults_total", "page faults that waited for the disk"),
    Spec("gauge", "zostream_host_resident_bytes", "bytes of the base's blocks in host RAM (mincore)",
          preset=False),  # only under a --host-memory budget
    Spec("counter", "zostream_adapter_loads_total", "LoRA adapters copied to the device on demand"),
    Spec("counter", "zostream_requests_rejected_total",
          "calls refused before any work, by reason (ErrorInfo.reason: QUEUE_FULL, INVALID_ARGUMENT, ...)",
          "reason", REJECT_REASONS),
    Spec("counter", "zostream_adapter_evictions_total", "LoRA adapters evicted from the device (LRU)"),
)
# fmt: on

DOCS: dict[str, str] = {s.name: s.doc for s in SPECS}


def preset_series(s: Spec) -> list[tuple[str, ...]]:
    """The label values created at 0 up front: every allowed value (x every API for per-API families)."""
    values = [(v,) for v in s.values] if s.label and s.preset else [] if s.label else [()]
    apis = [(a,) for a in APIS] if s.per_api else [()]
    return [v + a for v in values for a in apis if v + a]
