"""Fine-tuning job messages to engine types and back: CreateJobRequest to the job's spec (every default
filled in, refused early what would fail the job), JobRecord to Job, job events. Validation errors name
the field."""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from zostream import defaults as D
from zostream.engine.config import ZOConfig
from zostream.engine.errors import RequestError
from zostream.engine.jobs import JobRecord, check_name
from zostream.v1 import common_pb2, finetuning_pb2

from .convert import check_id, ts, wire_error

JOB_STATUS = {
    "queued": finetuning_pb2.JOB_STATUS_QUEUED,
    "running": finetuning_pb2.JOB_STATUS_RUNNING,
    "cancelling": finetuning_pb2.JOB_STATUS_CANCELLING,
    "succeeded": finetuning_pb2.JOB_STATUS_SUCCEEDED,
    "failed": finetuning_pb2.JOB_STATUS_FAILED,
    "cancelled": finetuning_pb2.JOB_STATUS_CANCELLED,
}
STATUS_NAME = {v: k for k, v in JOB_STATUS.items()}
METHOD = {common_pb2.TUNING_METHOD_FULL: "full", common_pb2.TUNING_METHOD_LORA: "lora"}
METHOD_PB = {v: k for k, v in METHOD.items()}
SCHEDULE = {
    finetuning_pb2.LR_SCHEDULE_UNSPECIFIED: "auto",  # resolved by the estimator (ZOConfig.schedule)
    finetuning_pb2.LR_SCHEDULE_CONSTANT: "constant",
    finetuning_pb2.LR_SCHEDULE_LINEAR: "linear",
    finetuning_pb2.LR_SCHEDULE_COSINE: "cosine",
}
SCHEDULE_PB = {
    "constant": finetuning_pb2.LR_SCHEDULE_CONSTANT,
    "linear": finetuning_pb2.LR_SCHEDULE_LINEAR,
    "cosine": finetuning_pb2.LR_SCHEDULE_COSINE,
}
NOISE = {
    finetuning_pb2.NOISE_KIND_UNSPECIFIED: "gaussian",
    finetuning_pb2.NOISE_KIND_GAUSSIAN: "gaussian",
    finetuning_pb2.NOISE_KIND_RADEMACHER: "rademacher",
}
NOISE_PB = {
    "gaussian": finetuning_pb2.NOISE_KIND_GAUSSIAN,
    "rademacher": finetuning_pb2.NOISE_KIND_RADEMACHER,
}

HP_FIELDS = {
    "lr": "learning_rate",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_targets": "lora.target_modules",
    "lora_init_scale": "lora.init_scale",
}


def job_spec(
    req: finetuning_pb2.CreateJobRequest,
    default_codec: str,
    modules: Collection[str] | None = None,
    base_dtype: str = "float32",
) -> dict[str, Any]:
    """The job's spec from the request, every documented default filled in (the seed is picked when the
    job is stored: JobStore.create); `modules` (the model's LoRA-able module names) checks targets."""
    method = METHOD.get(req.method)
    if method is None:
        raise RequestError("must be TUNING_METHOD_FULL or TUNING_METHOD_LORA", "method")
    check_name(req.training_dataset, "training_dataset")
    if req.validation_dataset:
        check_name(req.validation_dataset, "validation_dataset")
    hp = req.hyperparameters
    if hp.lr_schedule not in SCHEDULE:
        raise RequestError("unknown value", "hyperparameters.lr_schedule")
    if hp.noise not in NOISE:
        raise RequestError("unknown value", "hyperparameters.noise")
    if not hp.steps:
        raise RequestError("is required (number of ZO steps, >= 1)", "hyperparameters.steps")
    fields: dict[str, Any] = {
        "steps": int(hp.steps),
        "batch_size": int(hp.batch_size) or D.BATCH_SIZE,
        # Unset q: the estimator's default (ZOConfig), so auto can resolve by it; mezo's is D.Q.
        "q": int(hp.q) or (D.Q if hp.estimator == "mezo" else None),
        "seed": int(hp.seed) if hp.HasField("seed") else None,
        "lr_schedule": SCHEDULE[hp.lr_schedule],
        "warmup_steps": int(hp.warmup_steps),
        "min_lr_ratio": float(hp.min_lr_ratio),
        "weight_decay": float(hp.weight_decay),
        "noise": NOISE[hp.noise],
        # Resolved here so Job.hyperparameters reports the dtype the job trains in (never "auto").
        "master_dtype": hp.master_dtype or (D.LORA_MASTER_DTYPE if method == "lora" else base_dtype),
        "max_len": int(hp.max_len) or D.MAX_LEN,
        "eval_every": int(hp.eval_every),
        "checkpoint_every": int(hp.checkpoint_every),
        "lora_r": int(hp.lora.r) or D.LORA_R,
        "lora_alpha": float(hp.lora.alpha)
        if hp.lora.HasField("alpha")
        else D.lora_alpha(int(hp.lora.r) or D.LORA_R),
        "lora_targets": list(hp.lora.target_modules) or list(D.LORA_TARGETS),
        "lora_init_scale": float(hp.lora.init_scale) if hp.lora.HasField("init_scale") else D.LORA_INIT_SCALE,
        "loss": hp.loss or "auto",
        "estimator": hp.estimator or D.ESTIMATOR,  # resolved by ZOConfig below; the job reports which
    }
    if hp.HasField("learning_rate"):
        fields["lr"] = float(hp.learning_rate)
    if hp.HasField("eps"):
        fields["eps"] = float(hp.eps)
    if hp.HasField("average_decay"):
        fields["average_decay"] = float(hp.average_decay)
    for k in ("lr", "eps", "weight_decay", "min_lr_ratio", "average_decay", "lora_init_scale"):
        if k in fields and not math.isfinite(fields[k]):
            raise RequestError("must be a finite number", f"hyperparameters.{HP_FIELDS.get(k, k)}")
    if not 0.0 <= fields["min_lr_ratio"] <= 1.0:
        raise RequestError("must be in [0, 1]", "hyperparameters.min_lr_ratio")
    codec = hp.codec or default_codec
    if codec != default_codec:
        raise RequestError(
            f"this server streams the base through {default_codec!r}; omit codec or use it",
            "hyperparameters.codec",
        )
    try:
        resolved = ZOConfig(
            method=method,
            **{**fields, "seed": fields["seed"] or 0, "lora_targets": tuple(fields["lora_targets"])},
        )
    except ValueError as exc:
        name, _, msg = str(exc).partition(": ")
        raise RequestError(msg or str(exc), f"hyperparameters.{HP_FIELDS.get(name, name)}") from None
    # The job reports what it runs.
    fields["q"], fields["estimator"], fields["lr_schedule"], fields["average_decay"] = (
        resolved.q,
        resolved.estimator,
        resolved.schedule,
        resolved.average,
    )
    # The lifecycle's knobs (engine/session.py): they judge held-out evaluations, so they need some.
    fields["keep_best"], fields["early_stopping_patience"] = (
        bool(hp.keep_best),
        int(hp.early_stopping_patience),
    )
    for name in ("keep_best", "early_stopping_patience"):
        if fields[name] and not req.validation_dataset:
            raise RequestError(
                "judges held-out evaluations: set validation_dataset", f"hyperparameters.{name}"
            )
    if fields["early_stopping_patience"] and not fields["eval_every"]:
        raise RequestError(
            "counts evaluations during training: set eval_every", "hyperparameters.early_stopping_patience"
        )
    if method == "lora":  # refuse now what would fail the job when it starts
        from zostream.engine.peft import LoraSpec, resolve_targets

        try:
            LoraSpec(
                fields["lora_r"],
                fields["lora_alpha"],
                tuple(fields["lora_targets"]),
                init_scale=fields["lora_init_scale"],
            )
            if modules is not None:
                resolve_targets(fields["lora_targets"], modules)
        except RequestError as exc:
            raise wire_error(exc, HP_FIELDS, "hyperparameters.") from None
    if method == "full" and codec != "none":
        from zostream.engine.errors import PreconditionError

        raise PreconditionError(
            f"full-parameter jobs cannot read the base through the lossy {codec} codec; "
            "use method LORA or a server started with --codec none",
            "method",
        )
    return {
        "method": method,
        "hyperparameters": fields,
        "training_dataset": req.training_dataset,
        "validation_dataset": req.validation_dataset,
        "display_name": check_id(req.display_name, "display_name"),
        "idempotency_key": check_id(req.idempotency_key, "idempotency_key"),
        "codec": codec,
    }


def default_step(method: str, estimator: str, q: int, batch_size: int) -> tuple[float, float]:
    """The learning rate and eps a job gets when none is asked for: its estimator's defaults (0 or an
    empty string: the request's default). Raises ValueError, naming the field, for invalid settings."""
    cfg = ZOConfig(
        method=method, estimator=estimator or D.ESTIMATOR, q=q or None, batch_size=batch_size or D.BATCH_SIZE
    )
    return cfg.learning_rate, cfg.epsilon


def job_pb(rec: JobRecord) -> finetuning_pb2.Job:
    spec, hp = rec.spec, rec.spec["hyperparameters"]
    h = finetuning_pb2.Hyperparameters(
        steps=hp["steps"],
        batch_size=hp["batch_size"],
        q=hp["q"] or 0,
        loss=hp.get("loss", "tokens"),
        estimator=hp.get("estimator", "mezo"),  # jobs stored before the field ran mezo
        seed=hp["seed"],
        lr_schedule=SCHEDULE_PB[hp["lr_schedule"]],
        warmup_steps=hp["warmup_steps"],
        weight_decay=hp["weight_decay"],
        noise=NOISE_PB[hp["noise"]],
        master_dtype=hp["master_dtype"],
        codec=spec.get("codec", "none"),
        eval_every=hp["eval_every"],
        max_len=hp["max_len"],
        checkpoint_every=hp["checkpoint_every"],
        min_lr_ratio=hp["min_lr_ratio"],
        average_decay=hp.get("average_decay", 0.0),  # jobs stored before the field served their iterates
        keep_best=hp.get("keep_best", D.KEEP_BEST),
        early_stopping_patience=hp.get("early_stopping_patience", D.EARLY_STOPPING_PATIENCE),
        lora=common_pb2.LoraConfig(
            r=hp["lora_r"],
            alpha=hp["lora_alpha"],
            target_modules=hp["lora_targets"],
            init_scale=hp.get("lora_init_scale", 1.0),  # jobs stored before the field: PEFT's init
        ),
    )
    # As resolved (Job.hyperparameters): an unset learning rate / eps reports the default the job uses.
    est = hp.get("estimator", "mezo")  # jobs stored before the field ran mezo
    default_lr, default_eps = default_step(spec["method"], est, hp["q"], hp["batch_size"])
    h.learning_rate = hp["lr"] if hp.get("lr") is not None else default_lr
    h.eps = hp["eps"] if hp.get("eps") is not None else default_eps
    job = finetuning_pb2.Job(
        id=rec.id,
        display_name=spec.get("display_name", ""),
        status=JOB_STATUS[rec.status],
        method=METHOD_PB[spec["method"]],
        hyperparameters=h,
        training_dataset=spec["training_dataset"],
        validation_dataset=spec.get("validation_dataset", ""),
        created_at=ts(rec.created_at),
        progress=finetuning_pb2.JobProgress(
            steps_done=rec.steps_done, steps_total=hp["steps"], tokens_processed=rec.tokens
        ),
        adapter_id=rec.id if spec["method"] == "lora" else "",
        update_log="update.log",
        idempotency_key=spec.get("idempotency_key", ""),
    )
    if rec.started_at:
        job.started_at.CopyFrom(ts(rec.started_at))
    if rec.finished_at:
        job.finished_at.CopyFrom(ts(rec.finished_at))
    m = rec.metrics
    job.metrics.step = int(m.get("step", 0))
    job.metrics.eval_step = int(m.get("eval_step", 0))
    for k in ("best_step", "result_step"):
        if m.get(k) is not None:
            setattr(job.metrics, k, int(m[k]))
    for k in (
        "train_loss",
        "loss_plus",
        "loss_minus",
        "projected_grad",
        "learning_rate",
        "eval_loss",
        "eval_accuracy",
    ):
        if k in m and m[k] is not None and math.isfinite(m[k]):
            setattr(job.metrics, k, float(m[k]))
    if rec.error:
        job.error.code = rec.error.get("code", "")
        job.error.message = rec.error.get("message", "")
        job.error.field = rec.error.get("field", "")
    return job


# The job's files name a step's and an eval's numbers as the trainer returns them; the API names them as
# JobMetrics' fields (JobEvent.metrics, Checkpoint.metrics).
_EVENT_METRICS = {
    "step": {"loss": "train_loss", "lr": "learning_rate"},
    "eval": {"loss": "eval_loss", "accuracy": "eval_accuracy"},
}


def event_metrics(ev: dict) -> dict[str, float]:
    names = _EVENT_METRICS.get(ev["type"], {})
    return {names.get(k, k): v for k, v in ev["metrics"].items()}


def event_pb(ev: dict) -> finetuning_pb2.JobEvent:
    return finetuning_pb2.JobEvent(
        id=ev["id"],
        job_id=ev["job_id"],
        time=ts(ev["time"]),
        type=ev["type"],
        message=ev["message"],
        step=ev["step"],
        metrics=event_metrics(ev),
    )
