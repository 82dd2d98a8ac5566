"""OpenAI /v1/fine_tuning/jobs: create, list, retrieve, cancel, events.

Jobs are LoRA ZO jobs built as a zostream.v1.CreateJobRequest and checked by the same conversion as
gRPC. OpenAI's hyperparameters map onto ZO ones: n_epochs -> steps = ceil(n_epochs * examples /
batch_size), batch_size -> batch_size, learning_rate_multiplier -> x the default learning rate of the job's
estimator (grzo's 1e-2 unless q or estimator say otherwise).
ZO-specific extras go in the same `hyperparameters` object (EXTRAS); `steps` there wins over
n_epochs. The finished job's id is its `fine_tuned_model`: usable as `model` in chat completions.
"""

from __future__ import annotations

import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from zostream.engine.config import ZOConfig
from zostream.engine.errors import RequestError
from zostream.v1 import common_pb2, finetuning_pb2

from . import convert_jobs as CJ
from .http_app import read_json
from .openai_files import Files, page
from .openai_params import base_model_id

STATUS = {
    "queued": "queued",
    "running": "running",
    "cancelling": "running",
    "succeeded": "succeeded",
    "failed": "failed",
    "cancelled": "cancelled",
}
# ZO hyperparameters accepted next to OpenAI's (name -> proto Hyperparameters field, or lora.*)
EXTRAS = {
    "steps": "steps",
    "learning_rate": "learning_rate",
    "eps": "eps",
    "q": "q",
    "warmup_steps": "warmup_steps",
    "min_lr_ratio": "min_lr_ratio",
    "weight_decay": "weight_decay",
    "average_decay": "average_decay",
    "max_len": "max_len",
    "eval_every": "eval_every",
    "checkpoint_every": "checkpoint_every",
    "lr_schedule": "lr_schedule",
    "noise": "noise",
    "estimator": "estimator",
    "loss": "loss",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_target_modules": "lora.target_modules",
    "lora_init_scale": "lora.init_scale",
}
OPENAI_HP = ("n_epochs", "batch_size", "learning_rate_multiplier")
_SCHEDULES = {
    "constant": finetuning_pb2.LR_SCHEDULE_CONSTANT,
    "linear": finetuning_pb2.LR_SCHEDULE_LINEAR,
    "cosine": finetuning_pb2.LR_SCHEDULE_COSINE,
}
_NOISE = {"gaussian": finetuning_pb2.NOISE_KIND_GAUSSIAN, "rademacher": finetuning_pb2.NOISE_KIND_RADEMACHER}
_FIELDS = {
    "training_dataset": "training_file",
    "validation_dataset": "validation_file",
    "display_name": "suffix",
    "hyperparameters.lora.r": "hyperparameters.lora_r",
    "hyperparameters.lora.alpha": "hyperparameters.lora_alpha",
    "hyperparameters.lora.target_modules": "hyperparameters.lora_target_modules",
    "hyperparameters.lora.init_scale": "hyperparameters.lora_init_scale",
}


def routes(app: Any) -> list[Route]:
    j = Jobs(app)
    return [
        Route("/v1/fine_tuning/jobs", j.create, methods=["POST"]),
        Route("/v1/fine_tuning/jobs", j.list_jobs, methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}", j.get_job, methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}/cancel", j.cancel, methods=["POST"]),
        Route("/v1/fine_tuning/jobs/{job_id}/events", j.events, methods=["GET"]),
    ]


def _job(rec: Any, base: str) -> dict:
    spec, hp = rec.spec, rec.spec["hyperparameters"]
    err = None
    if rec.error:
        err = {
            "code": rec.error.get("code", ""),
            "message": rec.error.get("message", ""),
            "param": _FIELDS.get(rec.error.get("field", ""), rec.error.get("field")) or None,
        }
    hps = {
        "n_epochs": spec.get("openai", {}).get("n_epochs", "auto"),
        "batch_size": hp["batch_size"],
        "learning_rate_multiplier": _multiplier(hp),
        **{
            k: hp[k]
            for k in (
                "steps",
                "eps",
                "q",
                "lora_r",
                "lora_alpha",
                "lora_init_scale",
                "max_len",
                "average_decay",
            )
            if k in hp
        },
    }
    done = rec.status == "succeeded"
    return {
        "id": rec.id,
        "object": "fine_tuning.job",
        "model": spec.get("openai", {}).get("model", base),
        "created_at": int(rec.created_at),
        "finished_at": int(rec.finished_at) if rec.finished_at else None,
        "fine_tuned_model": rec.id if done and spec["method"] == "lora" else None,
        "organization_id": "zostream",
        "result_files": [],
        "status": STATUS[rec.status],
        "validation_file": spec.get("validation_dataset") or None,
        "training_file": spec["training_dataset"],
        "hyperparameters": hps,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hps}},
        "trained_tokens": rec.tokens if done else None,
        "error": err,
        "seed": hp["seed"],
        "estimated_finish": None,
        "integrations": [],
        "metadata": spec.get("openai", {}).get("metadata"),
        "user_provided_suffix": spec.get("display_name") or None,
    }


class Jobs:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.files = Files(app)

    async def create(self, request: Request) -> Response:
        engine = self.app.ready_engine()
        body = await read_json(request)
        base = base_model_id(engine)
        if body.get("model") != base:
            raise RequestError(f"fine-tuning starts from the served base model {base!r}", "model")
        hp = dict(body.get("hyperparameters") or {})
        method = body.get("method")
        if method is not None:
            if not isinstance(method, dict) or method.get("type") != "supervised":
                raise RequestError("only {'type': 'supervised'} fine-tuning is supported", "method.type")
            hp.update((method.get("supervised") or {}).get("hyperparameters") or {})
        for k in hp:
            if k not in OPENAI_HP and k not in EXTRAS:
                known = ", ".join((*OPENAI_HP, *EXTRAS))
                raise RequestError(f"unknown hyperparameter; use {known}", f"hyperparameters.{k}")
        train = self.files.info(_str(body.get("training_file"), "training_file"), "training_file")
        if body.get("validation_file") is not None:
            self.files.info(_str(body["validation_file"], "validation_file"), "validation_file")
        pb = finetuning_pb2.CreateJobRequest(
            method=common_pb2.TUNING_METHOD_LORA,
            training_dataset=train["name"],
            validation_dataset=body.get("validation_file") or "",
            display_name=_str(body["suffix"], "suffix") if body.get("suffix") is not None else "",
        )
        _hyperparameters(pb.hyperparameters, hp, body.get("seed"), train["num_records"])
        try:
            spec = CJ.job_spec(pb, engine.cfg.codec.name, engine.family.module_names(engine.spec))
        except RequestError as exc:
            f = _FIELDS.get(exc.field, exc.field)
            msg = str(exc.args[0]).removeprefix(f"{exc.field}: ")
            raise RequestError(msg, f, code=exc.code, reason=exc.reason) from None
        if self.app.draining:
            raise RequestError(
                "the server is shutting down; retry on another replica", "", code="UNAVAILABLE"
            )
        spec["openai"] = {
            "model": base,
            "n_epochs": hp.get("n_epochs", "auto"),
            "metadata": body.get("metadata"),
        }
        rec, _ = self.app.jobs.create(spec)
        engine.call_soon(lambda: None)  # wake the engine loop
        return JSONResponse(_job(rec, base))

    async def list_jobs(self, request: Request) -> Response:
        base = base_model_id(self.app.ready_engine())
        jobs = [_job(r, base) for r in self.app.jobs.list()[::-1]]  # newest first
        return JSONResponse(page(request, jobs))

    async def get_job(self, request: Request) -> Response:
        rec = self.app.jobs.get(request.path_params["job_id"])
        return JSONResponse(_job(rec, base_model_id(self.app.ready_engine())))

    async def cancel(self, request: Request) -> Response:
        rec = self.app.jobs.get(request.path_params["job_id"])
        if self.app.jobs.request_cancel(rec):
            self.app.ready_engine().call_soon(lambda: None)
        return JSONResponse(_job(rec, base_model_id(self.app.ready_engine())))

    async def events(self, request: Request) -> Response:
        rec = self.app.jobs.get(request.path_params["job_id"])
        out = []
        for ev in self.app.jobs.events(rec.id)[::-1]:  # newest first, as OpenAI lists them
            level = "error" if ev["type"] == "failed" else "info"
            out.append(
                {
                    "object": "fine_tuning.job.event",
                    "id": f"ftevent-{rec.id}-{ev['id']}",
                    "created_at": int(ev["time"]),
                    "level": level,
                    "message": ev["message"],
                    "type": "metrics" if ev["type"] == "step" else "message",
                    "data": {"step": ev["step"], "zostream_type": ev["type"], **ev["metrics"]},
                }
            )
        return JSONResponse(page(request, out))


def _default_lr(estimator: str, q: int, batch_size: int) -> float | None:
    """The LoRA learning rate a job gets when none is asked for (None: the settings are invalid, which
    the request's conversion reports with the field)."""
    try:
        return CJ.default_step("lora", estimator, q, batch_size)[0]
    except ValueError:
        return None


def _multiplier(hp: dict) -> float:
    """learning_rate_multiplier as OpenAI reports it: the job's lr over its estimator's default lr (jobs
    stored before the estimator field ran mezo)."""
    est, q = hp.get("estimator", "mezo"), hp.get("q")
    default = _default_lr(est, q or 0, hp["batch_size"])
    lr = hp.get("lr")
    return 1.0 if lr is None or not default else lr / default


def _str(v: Any, name: str) -> str:
    if not isinstance(v, str) or not v:
        raise RequestError("must be a non-empty string", name)
    return v


def _hyperparameters(h: Any, hp: dict, seed: Any, n_records: int) -> None:
    """OpenAI's and ZO's hyperparameters onto the proto message; "auto" means the ZO default."""

    def num(name: str, integer: bool = False, low: float = 0) -> float | None:
        """hp[name] as a number >= low; None when absent or "auto". 0 means "unset" in the proto
        for the counts that must be >= 1, so those are checked here, with the OpenAI name."""
        v = hp.get(name)
        if v is None or v == "auto":
            return None
        ok = isinstance(v, int) if integer else isinstance(v, int | float)
        if isinstance(v, bool) or not ok or not math.isfinite(v) or v < low:
            what = "an integer" if integer else "a number"
            raise RequestError(
                f"must be {what} >= {low:g} or 'auto', got {str(v)[:40]}", f"hyperparameters.{name}"
            )
        return v

    batch = num("batch_size", True, 1)
    if batch is not None:
        h.batch_size = int(batch)
    steps = num("steps", True, 1)
    epochs = num("n_epochs", False, 1e-9)
    if steps is None and epochs is not None:
        steps = max(1, math.ceil(epochs * n_records / (h.batch_size or ZOConfig().batch_size)))
    h.steps = int(steps or ZOConfig().steps)
    for name in ("eps", "min_lr_ratio", "weight_decay", "average_decay"):
        if (v := num(name)) is not None:
            setattr(h, name, v)
    for name, low in (
        ("q", 1),
        ("max_len", 2),
        ("warmup_steps", 0),
        ("eval_every", 0),
        ("checkpoint_every", 0),
    ):
        if (v := num(name, True, low)) is not None:
            setattr(h, name, int(v))
    for name in ("estimator", "loss"):
        if hp.get(name) is not None:
            setattr(h, name, _str(hp[name], f"hyperparameters.{name}"))
    mult = num("learning_rate_multiplier", False, 1e-12)
    lr = num("learning_rate")
    if lr is not None:
        h.learning_rate = lr
    elif mult is not None and (default := _default_lr(h.estimator, h.q, h.batch_size)) is not None:
        h.learning_rate = mult * default
    if (v := num("lora_r", True, 1)) is not None:
        h.lora.r = int(v)
    if (v := num("lora_alpha")) is not None:
        h.lora.alpha = v
    if (v := num("lora_init_scale")) is not None:
        h.lora.init_scale = v
    targets = hp.get("lora_target_modules")
    if targets is not None:
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise RequestError("must be an array of module names", "hyperparameters.lora_target_modules")
        h.lora.target_modules.extend(targets)
    for name, table in (("lr_schedule", _SCHEDULES), ("noise", _NOISE)):
        if hp.get(name) is not None:
            if hp[name] not in table:
                raise RequestError(f"must be one of {', '.join(table)}", f"hyperparameters.{name}")
            setattr(h, name, table[hp[name]])
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise RequestError("must be an integer in [0, 2**63)", "seed")
        h.seed = seed
