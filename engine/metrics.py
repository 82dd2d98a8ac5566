"""Prometheus metrics: StepStats and server events → samples.

The only module in the project that imports prometheus_client. Inputs are duck-typed
(StepStats, TokenEvent, the trainer's commit dict), so nothing here imports the engine.

The families, their labels and the labels' allowed values are engine/metric_catalog.py.
"""

from __future__ import annotations

import contextlib
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    start_http_server,
)

from .metric_catalog import (
    APIS,
    DOCS,
    JOB_STATUSES,
    KV_OPS,
    LATENCY_BUCKETS,
    LONG_BUCKETS,
    LONG_FAMILIES,
    REJECT_REASONS,
    SPECS,
    preset_series,
)

# No `*_created` timestamp series next to every counter and histogram: they double the series
# count and nothing here reads them. Process-wide, which is fine: nothing else imports the client.
disable_created_metrics()


class Metrics:
    """All zostream metrics in one registry of their own (tests may create several)."""

    METRIC_NAMES: tuple[str, ...] = tuple(DOCS)

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = CollectorRegistry()
            # host RSS / fds / CPU of this process: the base model is mmap'd, so RSS matters
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
        self.registry = registry
        self.port: int | None = None
        self._http: Any = None
        self._m: dict[str, Any] = {}
        self._disk_seen: dict[str, int] = {}  # process_io() values already counted
        self._specs = {s.name: s for s in SPECS}
        for s in SPECS:
            labels = ((s.label,) if s.label else ()) + (("api",) if s.per_api else ())
            if s.kind == "gauge":
                m: Any = Gauge(s.name, s.doc, labels, registry=registry)
            elif s.kind == "counter":
                m = Counter(s.name, s.doc, labels, registry=registry)
            else:
                buckets = LONG_BUCKETS if s.name in LONG_FAMILIES else LATENCY_BUCKETS
                m = Histogram(s.name, s.doc, labels, buckets=buckets, registry=registry)
            for key in preset_series(s):
                m.labels(*key)  # rate() and sum by () see every series from the first scrape
            self._m[s.name] = m
        # Which build serves which model: one series of value 1 (labels set by set_build_info).
        self._build = Gauge(
            "zostream_build_info",
            "1; labels: zostream version, model, family, codec, device",
            ("version", "model", "family", "codec", "device"),
            registry=registry,
        )

    def set_build_info(self, version: str, model: str, family: str, codec: str, device: str) -> None:
        self._build.clear()
        self._build.labels(version, model, family, codec, device).set(1)

    def observe_inter_token(self, seconds: float, api: str = "grpc") -> None:
        self._get("zostream_inter_token_latency_seconds", api=api).observe(seconds)

    def reject(self, reason: str) -> None:
        """A call refused before it did work (bad request, overload, draining, ...)."""
        self._get("zostream_requests_rejected_total", reason if reason in REJECT_REASONS else "OTHER").inc()

    def set_job_progress(
        self, ratio: float, eval_loss: float | None = None, eval_acc: float | None = None
    ) -> None:
        self._get("zostream_job_progress_ratio").set(ratio)
        if eval_loss is not None:
            self._get("zostream_finetune_eval_loss").set(eval_loss)
        if eval_acc is not None:
            self._get("zostream_finetune_eval_accuracy").set(eval_acc)

    def _get(self, name: str, label: str | None = None, api: str | None = None) -> Any:
        spec, m = self._specs[name], self._m[name]
        if spec.per_api and api not in APIS:
            raise ValueError(f"{name}: api must be one of {', '.join(APIS)}, got {api!r}")
        if spec.label is None:
            return m.labels(api) if spec.per_api else m
        if spec.values and label not in spec.values:
            raise ValueError(f"{name}: {spec.label} must be one of {', '.join(spec.values)}, got {label!r}")
        return m.labels(label, api) if spec.per_api else m.labels(label)

    # ---- engine loop ------------------------------------------------------------------------
    def observe_step(
        self, stats: Any, *, codec: str, running: int, waiting: int, method: str | None = None
    ) -> None:
        """One `Engine.step()`'s StepStats; `method` (full | lora) names the job a train pass served.

        Never raises for a well-formed call, so the engine loop can call it unguarded; a label
        value outside its fixed set (a programming error) raises ValueError before any change.

        Requests are counted by `observe_request_done` (it also sees cancels and admission
        errors, which never reach a pass), not from `stats.finished`.
        """
        # stats.train: the trainer's commit dict, an exception (the step failed: the pass still
        # ran for it, but nothing was logged) or None (no step in this pass)
        training = stats.train is not None
        train = stats.train if isinstance(stats.train, dict) else None
        steps = None
        method = method or (train or {}).get("method")
        if train is not None and method is not None:  # validate first: a bad call changes no sample
            steps = self._get("zostream_finetune_steps_total", method)
        self._get("zostream_requests_running").set(running)
        self._get("zostream_requests_waiting").set(waiting)
        self._get("zostream_prompt_tokens_total").inc(stats.prefill_tokens)
        # every sequence in a prefill samples its first token, every decode row one more
        generated = getattr(stats, "generated_tokens", None)
        if generated is None:
            generated = stats.decode_tokens + len(stats.first_token_latencies)
        self._get("zostream_generation_tokens_total").inc(generated)
        for t in stats.first_token_latencies:
            self._get("zostream_time_to_first_token_seconds").observe(t)
        for t in stats.queue_times:
            self._get("zostream_request_queue_seconds").observe(t)

        self._get("zostream_h2d_bytes_total", codec).inc(stats.h2d_bytes)
        # Paged KV cache (step_commit.StepStats): blocks after the pass, bytes the pass moved.
        if hasattr(stats, "kv_blocks_used"):
            self.set_kv_blocks(stats.kv_blocks_used, stats.kv_blocks_free)
        self._get("zostream_kv_preemptions_total").inc(getattr(stats, "kv_preemptions", 0))
        self._get("zostream_adapter_loads_total").inc(getattr(stats, "adapter_loads", 0))
        self._get("zostream_adapter_evictions_total").inc(getattr(stats, "adapter_evictions", 0))
        if hasattr(stats, "adapters_resident"):
            self._get("zostream_adapters_resident").set(stats.adapters_resident)
        for op in KV_OPS:
            self._get("zostream_kv_bytes_total", op).inc(getattr(stats, f"kv_bytes_{op}", 0))
        self._get("zostream_d2h_bytes_total").inc(stats.d2h_bytes)
        # Optional per-pass deltas of StreamStats; compute falls back to the unstalled pass time.
        stall = float(getattr(stats, "stall_seconds", 0.0) or 0.0)
        compute = getattr(stats, "compute_seconds", None)
        compute = max(stats.seconds - stall, 0.0) if compute is None else float(compute)
        self._get("zostream_transfer_stall_seconds_total").inc(stall)
        transfer = float(getattr(stats, "transfer_seconds", 0.0) or 0.0)
        self._get("zostream_layer_transfer_seconds_total").inc(transfer)

        generating = stats.prefill_tokens + stats.decode_tokens > 0
        if not (generating or training):
            return  # an idle step did no layer work
        self._get("zostream_layer_compute_seconds_total").inc(compute)
        kind = "mixed" if generating and training else "generate" if generating else "train"
        self._get("zostream_pass_seconds", kind).observe(stats.seconds)
        if train is not None:
            if steps is not None:  # None: the job's method is unknown (it ended during the pass)
                steps.inc()
            self._observe_train(train, stats.seconds)

    def _observe_train(self, train: dict[str, Any], seconds: float) -> None:
        if train.get("skipped"):
            self._get("zostream_finetune_skipped_steps_total").inc()
        if train.get("climb"):
            self._get("zostream_finetune_climb_trips_total").inc()
        self._get("zostream_finetune_step_seconds").observe(seconds)
        self._get("zostream_finetune_tokens_total").inc(int(train.get("tokens", 0)))
        # Set even on a skipped (non-finite) step: the dashboard should show the divergence.
        for key, name in (
            ("loss", "zostream_finetune_loss"),
            ("loss_plus", "zostream_finetune_loss_plus"),
            ("loss_minus", "zostream_finetune_loss_minus"),
            ("projected_grad", "zostream_finetune_projected_grad"),
            ("lr", "zostream_finetune_learning_rate"),
        ):
            if train.get(key) is not None:
                self._get(name).set(float(train[key]))

    # ---- server events ----------------------------------------------------------------------
    def observe_request_done(
        self,
        latency_s: float,
        completion_tokens: int,
        finish_reason: str,
        ttft_s: float | None = None,
        api: str = "grpc",
    ) -> None:
        """Once per generation request, at its final event (every outcome, cancels and errors too);
        `api` names the front end it came through (grpc | http)."""
        requests = self._get("zostream_requests_total", finish_reason, api)  # validates both labels first
        requests.inc()
        self._get("zostream_request_latency_seconds", api=api).observe(latency_s)
        if completion_tokens > 1:
            if ttft_s is not None:
                tpot = max(latency_s - ttft_s, 0.0) / (completion_tokens - 1)
            else:
                tpot = latency_s / completion_tokens
            self._get("zostream_time_per_output_token_seconds", api=api).observe(tpot)

    def set_jobs(self, counts: dict[str, int]) -> None:
        """Jobs per status; a status missing from `counts` is 0."""
        for status in counts:
            self._get("zostream_jobs", status)  # validates
        for status in JOB_STATUSES:
            self._get("zostream_jobs", status).set(counts.get(status, 0))

    def set_gpu_memory(self, allocated: int, reserved: int, budget: int | None) -> None:
        """Device bytes; budget None (use what is free) drops that series rather than faking a value."""
        self._get("zostream_gpu_memory_bytes", "allocated").set(allocated)
        self._get("zostream_gpu_memory_bytes", "reserved").set(reserved)
        if budget is None:
            with contextlib.suppress(KeyError):  # not set yet
                self._m["zostream_gpu_memory_bytes"].remove("budget")
        else:
            self._get("zostream_gpu_memory_bytes", "budget").set(budget)

    def set_residency(self, resident: int, streamed: int) -> None:
        self._get("zostream_resident_blocks").set(resident)
        self._get("zostream_streamed_blocks").set(streamed)

    def set_kv_blocks(self, used: int, free: int) -> None:
        self._get("zostream_kv_blocks", "used").set(used)
        self._get("zostream_kv_blocks", "free").set(free)

    def observe_disk(self, io: dict[str, int], resident: int | None = None) -> None:
        """Process-wide disk counters (engine.host_tier.process_io: cumulative read_bytes and
        major_faults) and the host tier's measured residency (None: no tier, series absent)."""
        for key, name in (("read_bytes", "zostream_disk_read_bytes_total"),
                          ("major_faults", "zostream_major_page_faults_total")):  # fmt: skip
            now = int(io.get(key, 0))
            self._get(name).inc(max(0, now - self._disk_seen.get(key, 0)))
            self._disk_seen[key] = now
        if resident is not None:
            self._get("zostream_host_resident_bytes").set(resident)

    def set_engine_up(self, up: bool) -> None:
        self._get("zostream_engine_up").set(1 if up else 0)

    def add_log_bytes(self, n: int) -> None:
        self._get("zostream_update_log_bytes_total").inc(n)

    # ---- exposition -------------------------------------------------------------------------
    def exposition(self) -> bytes:
        """The Prometheus text format of this registry (what /metrics serves)."""
        return generate_latest(self.registry)

    def start_http(self, port: int, addr: str = "127.0.0.1") -> Any:
        """Serve /metrics in a daemon thread; port 0 picks a free port (then read `self.port`)."""
        if self._http is not None:
            raise RuntimeError(f"metrics are already served on port {self.port}; call close() first")
        server, _thread = start_http_server(port, addr, registry=self.registry)
        self._http, self.port = server, server.server_port
        return server

    def close(self) -> None:
        """Stop the HTTP server, if one was started."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
