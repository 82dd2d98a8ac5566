"""The divergence guard's slow-climb rule through the FineTuning API: a trip is a job event of type "guard"
and counts in zostream_finetune_climb_trips_total; the job's log records the backed-off lr."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.engine.test_climb import CLIMB, TRIPS
from tests.server.conftest import server_config, thread_server
from zostream.engine import climb, trainer
from zostream.engine.config import ZOConfig
from zostream.engine.update_log import UpdateLog
from zostream.v1 import common_pb2 as Cm
from zostream.v1 import finetuning_pb2 as F


def test_a_trip_is_a_job_event_and_a_metric(model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    real = trainer.ZOStepWorkload.losses

    def losses(self: trainer.ZOStepWorkload) -> list[tuple[float, float]]:
        # Step t's mean loss is CLIMB[t] (tests/engine/test_climb.py: trips at steps 8 and 14, window 2).
        return [(CLIMB[self.step] + (lp - lm) / 2, CLIMB[self.step] - (lp - lm) / 2) for lp, lm in real(self)]

    monkeypatch.setattr(trainer.ZOStepWorkload, "losses", losses)
    monkeypatch.setattr(ZOConfig, "climb_rule", lambda self: climb.ClimbRule(window=2, rise=0.5))
    data = tmp_path / "data"
    with thread_server(server_config(model_dir, data)) as srv:
        s = srv.stubs()
        rows = "\n".join(
            json.dumps({"text": " ".join(str((i * 7 + j) % 90 + 1) for j in range(10))}) for i in range(8)
        )
        parts = [
            F.UploadDatasetRequest(metadata=F.DatasetMetadata(name="d")),
            F.UploadDatasetRequest(chunk=rows.encode()),
        ]
        s.ft.UploadDataset(iter(parts), timeout=30)
        hp = F.Hyperparameters(
            steps=len(CLIMB),
            learning_rate=0.01,
            lr_schedule=F.LR_SCHEDULE_CONSTANT,
            batch_size=2,
            seed=3,
            max_len=32,
            checkpoint_every=10_000,
            lora=Cm.LoraConfig(r=2, alpha=4.0, target_modules=["q_proj"]),
        )
        req = F.CreateJobRequest(method=Cm.TUNING_METHOD_LORA, training_dataset="d", hyperparameters=hp)
        job_id = s.ft.CreateJob(req, timeout=30).id
        deadline = time.monotonic() + 120
        while s.ft.GetJob(F.GetJobRequest(job_id=job_id), timeout=10).status != F.JOB_STATUS_SUCCEEDED:
            assert time.monotonic() < deadline, "the job did not finish in 120 s"
            time.sleep(0.2)
        events = s.ft.ListJobEvents(F.ListJobEventsRequest(job_id=job_id), timeout=10).events
        guard = [e for e in events if e.type == "guard"]
        assert [e.step for e in guard] == [t + 1 for t in TRIPS]  # steps done when it tripped
        assert "slow climb" in guard[0].message and guard[0].metrics["train_loss"] == CLIMB[TRIPS[0]]
        reg = srv.app.metrics.registry
        assert reg.get_sample_value("zostream_finetune_climb_trips_total") == 2
        with UpdateLog.open(data / "jobs" / job_id / "update.log", repair=False) as log:
            lrs = [st.lr for st in log.steps()]
        assert lrs[TRIPS[0] + 1] == lrs[0] / 2 and lrs[-1] == lrs[0] / 4
        s.channel.close()
