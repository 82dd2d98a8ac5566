"""Container and deploy files: the compose stack, Prometheus, Grafana and the Dockerfile agree with
each other and with the metrics the engine actually exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from zostream.engine.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "zostream.json"
METRIC_RE = re.compile(r"zostream_[a-z0-9_]+")
# panels the issue asks for, each found by a fragment of its PromQL
REQUIRED_QUERIES = (
    "rate(zostream_generation_tokens_total[1m])",
    "sum by (finish_reason) (rate(zostream_requests_total[1m]))",
    "histogram_quantile(0.5, sum by (le) (rate(zostream_time_to_first_token_seconds_bucket[1m])))",
    "histogram_quantile(0.99, sum by (le) (rate(zostream_time_to_first_token_seconds_bucket[1m])))",
    "histogram_quantile(0.5, sum by (le) (rate(zostream_time_per_output_token_seconds_bucket[1m])))",
    "histogram_quantile(0.99, sum by (le) (rate(zostream_request_latency_seconds_bucket[1m])))",
    "rate(zostream_h2d_bytes_total[1m])) / 1e9",
    "rate(zostream_d2h_bytes_total[1m])) / 1e9",
    "rate(zostream_transfer_stall_seconds_total[1m])",
    "zostream_gpu_memory_bytes",
    "zostream_finetune_loss",
    "zostream_finetune_loss_plus",
    "zostream_finetune_loss_minus",
    "abs(zostream_finetune_projected_grad)",
    "zostream_finetune_learning_rate",
    "sum by (status) (zostream_jobs)",
    "rate(zostream_finetune_steps_total[1m])",
    "zostream_update_log_bytes_total",
)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def volume_target(vol: str) -> str:
    """'SRC:DST[:ro]' -> DST; SRC may be an interpolation with colons (${VAR:?message})."""
    return vol.removesuffix(":ro").removesuffix(":rw").rsplit(":", 1)[1]


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


@dataclass
class Stats:  # one pass that carried everything (stand-in for engine.engine.StepStats)
    seconds: float = 0.3
    prefill_tokens: int = 8
    decode_tokens: int = 2
    finished: list[Any] = field(default_factory=list)
    first_token_latencies: list[float] = field(default_factory=lambda: [0.05])
    queue_times: list[float] = field(default_factory=lambda: [0.01])
    train: dict[str, Any] | None = field(
        default_factory=lambda: {"step": 0, "loss": 1.0, "loss_plus": 1.1, "loss_minus": 0.9,
                                 "projected_grad": 100.0, "lr": 1e-6, "skipped": None, "tokens": 16}
    )  # fmt: skip
    h2d_bytes: int = 4096
    d2h_bytes: int = 0


def live_exposition() -> str:
    m = Metrics()
    m.observe_step(Stats(), codec="nf4", running=1, waiting=0, method="lora")
    m.observe_request_done(0.5, 4, "eos_token")
    m.set_jobs({"running": 1})
    m.set_gpu_memory(1, 2, 3)
    m.set_residency(2, 6)
    m.set_engine_up(True)
    m.add_log_bytes(16)
    return m.exposition().decode()


# ---- docker compose ----------------------------------------------------------------------------
def test_compose_services_ports_memlock_gpus_and_volumes() -> None:
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    services = compose["services"]
    assert {"engine", "prometheus", "grafana"} <= set(services)
    eng = services["engine"]
    assert eng["build"]["context"] == ".." and (DEPLOY / eng["build"]["context"] / "Dockerfile").is_file()
    assert {"50051:50051", "9400:9400"} <= set(eng["ports"])
    assert eng["ulimits"]["memlock"] == {"soft": -1, "hard": -1}
    devices = eng["deploy"]["resources"]["reservations"]["devices"]
    assert (
        devices[0]["driver"] == "nvidia"
        and devices[0]["count"] == "all"
        and "gpu" in devices[0]["capabilities"]
    )
    mounts = {volume_target(v): v for v in eng["volumes"]}
    assert mounts["/models"].endswith(":/models:ro")
    assert "/data" in mounts
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_compose_mounts_exist() -> None:
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    for name in ("prometheus", "grafana"):
        for vol in compose["services"][name]["volumes"]:
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name} mounts {src}, which is not in deploy/"


def test_grafana_anonymous_viewer_and_provisioning() -> None:
    graf = load_yaml(DEPLOY / "docker-compose.yml")["services"]["grafana"]
    env = graf["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    mounted = {volume_target(v): v.split(":")[0] for v in graf["volumes"]}
    assert mounted["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/zostream.yml")["providers"][0]
    dash_dir = provider["options"]["path"]
    assert mounted[f"{dash_dir}/zostream.json"] == "./grafana/zostream.json"
    ds = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    # every panel and query points at that datasource
    dash = json.loads(DASHBOARD.read_text())
    for p in dash["panels"]:
        for t in [p, *p.get("targets", [])]:
            if "datasource" in t:
                assert t["datasource"] == {"type": "prometheus", "uid": ds["uid"]}, p["title"]


# ---- prometheus --------------------------------------------------------------------------------
def test_prometheus_scrapes_the_engine() -> None:
    cfg = load_yaml(DEPLOY / "prometheus.yml")
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    job = jobs["zostream"]
    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert [t for sc in job["static_configs"] for t in sc["targets"]] == ["engine:9400"]


# ---- dashboard ---------------------------------------------------------------------------------
def test_dashboard_metrics_are_real() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    live = live_exposition()
    exported = {line.split()[2] for line in live.splitlines() if line.startswith("# TYPE ")}
    sampled = {line.split("{")[0].split(" ")[0] for line in live.splitlines() if line and line[0] != "#"}
    for expr in exprs:
        for raw in METRIC_RE.findall(expr):
            name = re.sub(r"_(bucket|sum|count)$", "", raw)
            assert name in Metrics.METRIC_NAMES, f"{raw} in {expr!r} is not a zostream metric"
            assert name in exported or name.removesuffix("_total") in exported, raw
            assert raw in sampled or f"{raw}_count" in sampled, f"{raw} has no sample after one step"


def test_dashboard_has_the_required_panels() -> None:
    joined = "\n".join(dashboard_exprs())
    for fragment in REQUIRED_QUERIES:
        assert fragment in joined, fragment
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and dash["uid"] == "zostream"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) is not installed")
def test_dashboard_promql_parses_and_config_is_valid(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"zostream:panel:{i}", "expr": e} for i, e in enumerate(dashboard_exprs())]}]}  # fmt: skip
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    for args in (
        ["check", "rules", str(tmp_path / "rules.yml")],
        ["check", "config", str(DEPLOY / "prometheus.yml")],
    ):
        res = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr


# ---- Dockerfile --------------------------------------------------------------------------------
def test_dockerfile() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.splitlines()]
    instr = [ln for ln in lines if ln and not ln.startswith("#")]
    user = [ln.split()[1] for ln in instr if ln.startswith("USER ")]
    assert user and user[-1] not in ("root", "0"), "the image must run as a non-root user"
    assert any(ln.startswith("HEALTHCHECK ") for ln in instr)
    assert "grpc_health.v1" in text and "127.0.0.1:50051" in text
    expose = {p for ln in instr if ln.startswith("EXPOSE ") for p in ln.split()[1:]}
    assert {"50051", "9400"} <= expose
    assert "VOLUME /data" in instr
    assert re.search(r"/models.*read-only|read-only.*/models", text, re.IGNORECASE)
    assert "memlock=-1" in text
    entry = json.loads(next(ln for ln in instr if ln.startswith("ENTRYPOINT "))[len("ENTRYPOINT ") :])
    assert entry[:2] == ["zostream", "serve"]
    flags = dict(zip(entry[2::2], entry[3::2], strict=True))
    assert flags == {"--model": "/models", "--data-dir": "/data", "--host": "0.0.0.0", "--port": "50051",
                     "--metrics-port": "9400", "--metrics-addr": "0.0.0.0"}  # fmt: skip
    # every COPY source is in the repo and not excluded by .dockerignore
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    for ln in instr:
        if ln.startswith("COPY ") and "--from" not in ln:
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                assert src not in ignored, f"COPY {src}: excluded by .dockerignore"


def healthcheck_command() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"^HEALTHCHECK [^\n]*\\\n\s*CMD (\[.*\])$", text, re.MULTILINE)
    assert m, "HEALTHCHECK ... \\ <newline> CMD [json] not found"
    return json.loads(m.group(1))


def test_healthcheck_command_reports_grpc_health(unused_tcp_port: int) -> None:
    """Run the image's HEALTHCHECK one-liner (port swapped) against a real grpc health server."""
    import sys
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    cmd = healthcheck_command()
    assert cmd[0] == "python" and "127.0.0.1:50051" in cmd[-1]
    code = cmd[-1].replace("127.0.0.1:50051", f"127.0.0.1:{unused_tcp_port}")

    def check() -> int:
        return subprocess.run([sys.executable, *cmd[1:-1], code], capture_output=True, timeout=60).returncode

    assert check() != 0  # nothing listening
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{unused_tcp_port}")
    server.start()
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert check() == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert check() == 0
    finally:
        server.stop(None)


@pytest.fixture
def unused_tcp_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_accepts_the_entrypoint_flags() -> None:
    from zostream.clients.cli import build_parser

    text = (ROOT / "Dockerfile").read_text()
    entry = json.loads(
        next(ln for ln in text.splitlines() if ln.startswith("ENTRYPOINT "))[len("ENTRYPOINT ") :]
    )
    args = build_parser().parse_args(entry[1:])
    assert args.metrics_addr == "0.0.0.0" and args.port == 50051 and args.metrics_port == 9400
