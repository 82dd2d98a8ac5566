"""GET /v1/fine_tuning/jobs/{job_id}/checkpoints: a job's checkpoints as OpenAI's fine_tuning.job.checkpoint.

A job's checkpoints are the steps it checkpointed (its "checkpoint" events: hyperparameters.checkpoint_every,
a cancel, a shutdown) and, once it succeeded, the step its result holds. Each one's
`fine_tuned_model_checkpoint` is `<job_id>:ckpt-step-<N>` (engine/checkpoints.py), served as a chat or
completions `model` (rebuilt from the job's log on first use). Full-parameter jobs list none: their steps are
whole models, not adapters this server can serve. Newest (highest step) first, paged by `limit` / `after`.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from zostream.engine.checkpoints import checkpoint_id

from .openai_files import page


def routes(app: Any) -> list[Route]:
    async def checkpoints(request: Request) -> Response:
        rec = app.jobs.get(request.path_params["job_id"])  # 404 naming job_id
        return JSONResponse(page(request, list_checkpoints(app.jobs, rec)))

    return [Route("/v1/fine_tuning/jobs/{job_id}/checkpoints", checkpoints, methods=["GET"])]


def list_checkpoints(jobs: Any, rec: Any) -> list[dict]:
    """The job's servable checkpoints, newest first. jobs: engine.jobs.JobStore; rec: its JobRecord."""
    if rec.spec.get("method") != "lora":
        return []
    events = jobs.events(rec.id)
    at: dict[int, float] = {}  # step -> when it was written
    for ev in events:
        if ev["type"] == "checkpoint":
            at.setdefault(int(ev["step"]), ev["time"])
    if rec.status == "succeeded":
        step = int(rec.metrics.get("result_step", rec.steps_done))
        at.setdefault(step, rec.finished_at or rec.created_at)
    train: dict[int, dict] = {}  # step -> that step's training metrics
    valid: dict[int, dict] = {}  # step -> the held-out evaluation after it
    for ev in events:
        if ev["type"] == "step":
            train[int(ev["step"])] = ev["metrics"]
        elif ev["type"] == "eval":
            valid[int(ev["step"])] = ev["metrics"]
    out = []
    for step in sorted((s for s in at if 1 <= s <= rec.steps_done), reverse=True):
        metrics: dict[str, float] = {"step": float(step)}
        if "loss" in train.get(step, {}):
            metrics["train_loss"] = train[step]["loss"]
        ev = valid.get(step, {})
        if "loss" in ev:
            metrics["valid_loss"] = metrics["full_valid_loss"] = ev["loss"]
        if "accuracy" in ev:  # a zostream extra: held-out accuracy over the candidates (choice data)
            metrics["valid_accuracy"] = ev["accuracy"]
        out.append(
            {
                "object": "fine_tuning.job.checkpoint",
                "id": f"ftckpt-{rec.id}-{step}",
                "created_at": int(at[step]),
                "fine_tuned_model_checkpoint": checkpoint_id(rec.id, step),
                "fine_tuning_job_id": rec.id,
                "metrics": metrics,
                "step_number": step,
            }
        )
    return out
