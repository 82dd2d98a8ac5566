"""Container and deploy files: the compose stack, Prometheus, Grafana and the Dockerfile agree with
each other and with the metrics the engine actually exports."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
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
    """The panels' PromQL as Prometheus sees it once Grafana expanded its variables ($__rate_interval as
    1m, every instance selected, the link capacity textbox at its default)."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for e in (t["expr"] for p in dash["panels"] for t in p.get("targets", [])):
        e = e.replace("$__rate_interval", "1m").replace("$link_bytes_per_second", "25e9")
        e = e.replace('{instance=~"$instance"}', "").replace('instance=~"$instance", ', "")
        out.append(e)
    return out


@dataclass
class Stats:  # one pass that carried everything (stand-in for engine.step_commit.StepStats)
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
INTERP_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error})."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        val = env.get(name)
        unset = val is None or (val == "" and op is not None and op.startswith(":"))
        if op and op.endswith("?") and unset:
            raise KeyError(f"{name}: {arg}")
        return arg if unset and op else (val or "")

    return INTERP_RE.sub(sub, value)


def compose_with(env: dict[str, str]) -> dict[str, Any]:
    return interpolate(load_yaml(DEPLOY / "docker-compose.yml"), env)


def test_compose_follows_the_compose_specification() -> None:
    """The vendored JSON schema of the compose specification, before and after interpolation."""
    import jsonschema

    schema = json.loads((DEPLOY / "schema" / "compose-spec.json").read_text())
    validator = jsonschema.Draft7Validator(schema)
    for doc in (load_yaml(DEPLOY / "docker-compose.yml"), compose_with({"ZOSTREAM_MODEL_DIR": "/m"})):
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, errors
    # the check can fail: a misspelt key and a wrong type are refused
    bad = compose_with({"ZOSTREAM_MODEL_DIR": "/m"})
    bad["services"]["engine"]["healthchek"] = {}
    assert not validator.is_valid(bad)
    bad = compose_with({"ZOSTREAM_MODEL_DIR": "/m"})
    bad["services"]["engine"]["ports"] = "50051:50051"
    assert not validator.is_valid(bad)


def test_compose_interpolation_refuses_a_missing_model_dir() -> None:
    with pytest.raises(KeyError, match="ZOSTREAM_MODEL_DIR"):
        compose_with({})


def test_compose_services_ports_memlock_gpus_and_volumes() -> None:
    compose = compose_with({"ZOSTREAM_MODEL_DIR": "/m"})
    services = compose["services"]
    assert {"engine", "prometheus", "grafana"} <= set(services)
    eng = services["engine"]
    assert eng["build"]["context"] == ".." and (DEPLOY / eng["build"]["context"] / "Dockerfile").is_file()
    assert {"127.0.0.1:50051:50051", "127.0.0.1:8000:8000", "127.0.0.1:9400:9400"} <= set(eng["ports"])
    assert eng["ulimits"]["memlock"] == {"soft": -1, "hard": -1}
    devices = eng["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]  # a one-GPU engine
    mounts = {volume_target(v): v for v in eng["volumes"]}
    assert mounts["/models"] == "/m:/models:ro"
    assert "/data" in mounts
    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_compose_publishes_on_localhost_unless_told() -> None:
    for env, host in (({}, "127.0.0.1"), ({"ZOSTREAM_BIND": "0.0.0.0"}, "0.0.0.0")):
        compose = compose_with({"ZOSTREAM_MODEL_DIR": "/m", **env})
        for name, svc in compose["services"].items():
            for port in svc.get("ports", []):
                assert isinstance(port, str) and port.count(":") == 2, (name, port)
                assert port.split(":")[0] == host, (name, port)


def test_compose_engine_requires_the_api_key_secret() -> None:
    compose = compose_with({"ZOSTREAM_MODEL_DIR": "/m"})
    eng = compose["services"]["engine"]
    assert "zostream_api_key" in eng["secrets"]
    cmd = eng["command"]
    assert cmd[cmd.index("--api-key-file") + 1] == "/run/secrets/zostream_api_key"
    assert compose["secrets"]["zostream_api_key"]["file"] == "./secrets/zostream_api_key"
    # the secrets folder keeps keys out of git
    ignore = (DEPLOY / "secrets" / ".gitignore").read_text().split()
    assert "*" in ignore and "!.gitignore" in ignore
    moved = compose_with({"ZOSTREAM_MODEL_DIR": "/m", "ZOSTREAM_API_KEY_FILE": "/k"})
    assert moved["secrets"]["zostream_api_key"]["file"] == "/k"


def test_compose_healthcheck_is_the_image_probe() -> None:
    eng = compose_with({"ZOSTREAM_MODEL_DIR": "/m"})["services"]["engine"]
    assert eng["healthcheck"]["test"] == ["CMD", *healthcheck_command()]


def test_compose_mounts_exist() -> None:
    compose = load_yaml(DEPLOY / "docker-compose.yml")
    for name in ("prometheus", "grafana"):
        for vol in compose["services"][name]["volumes"]:
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists(), f"{name} mounts {src}, which is not in deploy/"


def test_grafana_no_anonymous_admin_password_secret_and_provisioning() -> None:
    compose = compose_with({"ZOSTREAM_MODEL_DIR": "/m"})
    graf = compose["services"]["grafana"]
    env = graf["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false" and env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    assert "GF_SECURITY_ADMIN_PASSWORD" not in env  # no default password in the file
    assert env["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/grafana_admin_password"
    assert "grafana_admin_password" in graf["secrets"] and "grafana_admin_password" in compose["secrets"]
    mounted = {volume_target(v): v.split(":")[0] for v in graf["volumes"]}
    assert mounted["/etc/grafana/provisioning"] == "./grafana/provisioning"
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/zostream.yml")["providers"][0]
    dash_dir = provider["options"]["path"]
    assert mounted[f"{dash_dir}/zostream.json"] == "./grafana/zostream.json"
    ds = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    # every panel and query points at the dashboard's datasource variable, which defaults to that one
    dash = json.loads(DASHBOARD.read_text())
    var = next(v for v in dash["templating"]["list"] if v["name"] == "datasource")
    assert var["type"] == "datasource" and var["current"]["value"] == ds["uid"]
    for p in dash["panels"]:
        for t in [p, *p.get("targets", [])]:
            if "datasource" in t:
                assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]


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
    assert "grpc.health.v1" in text and "127.0.0.1:50051" in text
    # multi-stage on a Debian base, torch from wheels (no CUDA base image), pinned dependencies
    froms = [ln.split()[1:] for ln in instr if ln.startswith("FROM ")]
    assert froms == [["${BASE_IMAGE}", "AS", "deps"], ["deps", "AS", "wheel"], ["${BASE_IMAGE}"]]
    assert "ARG BASE_IMAGE=debian:bookworm-slim" in instr and "nvidia/cuda" not in text
    assert "ARG TORCH_VARIANT=cuda" in instr and 'cpu) spec="torch==$TORCH_VERSION+cpu"' in text
    assert "PIP_CONSTRAINT=/tmp/constraints.txt" in text
    assert "COPY deploy/constraints.txt /tmp/constraints.txt" in instr
    assert "COPY --from=deps /opt/venv /opt/venv" in instr and "pip install -r /tmp/constraints.txt" in text
    assert "pip check" in text  # the pinned set covers every dependency of the project
    expose = {p for ln in instr if ln.startswith("EXPOSE ") for p in ln.split()[1:]}
    assert {"50051", "8000", "9400"} <= expose
    assert "VOLUME /data" in instr
    assert re.search(r"/models.*read-only|read-only.*/models", text, re.IGNORECASE)
    assert "memlock=-1" in text
    entry = json.loads(next(ln for ln in instr if ln.startswith("ENTRYPOINT "))[len("ENTRYPOINT ") :])
    assert entry[:2] == ["zostream", "serve"]
    flags = dict(zip(entry[2::2], entry[3::2], strict=True))
    assert flags == {"--model": "/models", "--data-dir": "/data", "--host": "0.0.0.0", "--port": "50051",
                     "--http-port": "8000", "--metrics-port": "9400",
                     "--metrics-addr": "0.0.0.0"}  # fmt: skip
    # every COPY source is in the repo and not excluded by .dockerignore (or excluded, then re-included)
    rules = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    ignored, included = set(rules), {r[1:] for r in rules if r.startswith("!")}
    for ln in instr:
        if ln.startswith("COPY ") and "--from" not in ln:
            for src in ln.split()[1:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
                parts = src.split("/")
                dropped = any("/".join(parts[: i + 1]) in ignored for i in range(len(parts)))
                assert not dropped or src in included, f"COPY {src}: excluded by .dockerignore"


def test_constraints_pin_every_runtime_dependency() -> None:
    """deploy/constraints.txt pins (==) each runtime dependency of pyproject but torch, within its range."""
    import tomllib

    from packaging.requirements import Requirement

    pins = {}
    for ln in (DEPLOY / "constraints.txt").read_text().splitlines():
        if ln.strip() and not ln.startswith("#"):
            name, sep, version = ln.partition("==")
            assert sep and version, f"constraints.txt: {ln!r} is not NAME==VERSION"
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["engine"]  # the image installs [engine]
    for dep in map(Requirement, deps):
        name = dep.name.lower().replace("_", "-")
        if name == "torch":
            assert name not in pins  # the Dockerfile's TORCH_VERSION pins torch
            continue
        assert name in pins, f"{dep.name} is not pinned in deploy/constraints.txt"
        assert dep.specifier.contains(pins[name]), f"{dep.name}=={pins[name]} is outside {dep.specifier}"


def healthcheck_command() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    m = re.search(r"^HEALTHCHECK [^\n]*\\\n\s*CMD (\[.*\])$", text, re.MULTILINE)
    assert m, "HEALTHCHECK ... \\ <newline> CMD [json] not found"
    return json.loads(m.group(1))


def run_probe(port: int, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The image's HEALTHCHECK command, its address pointed at `port`."""
    import os

    cmd = healthcheck_command()
    assert cmd[:3] == ["python", "-m", "zostream.server.healthcheck"] and cmd[3] == "127.0.0.1:50051"
    return subprocess.run(
        [sys.executable, *cmd[1:3], f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )  # fmt: skip


@contextlib.contextmanager
def health_server(port: int, tls: tuple[Path, Path] | None = None) -> Iterator[Any]:
    """A bare grpc server with only the health service (plaintext, or TLS with (cert, key))."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    if tls:
        cert, key = tls
        creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        server.add_secure_port(f"127.0.0.1:{port}", creds)
    else:
        server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield servicer
    finally:
        server.stop(None)


def test_healthcheck_command_reports_grpc_health(unused_tcp_port: int) -> None:
    """The image's HEALTHCHECK against a real grpc health server: nothing listening, NOT_SERVING, SERVING."""
    from grpc_health.v1 import health_pb2

    assert run_probe(unused_tcp_port).returncode == 1  # nothing listening
    with health_server(unused_tcp_port) as servicer:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        res = run_probe(unused_tcp_port)
        assert res.returncode == 1 and "NOT_SERVING" in res.stderr
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        assert run_probe(unused_tcp_port).returncode == 0


def test_healthcheck_command_works_with_tls(unused_tcp_port: int, tmp_path: Path) -> None:
    """The same command, unchanged, against a TLS server: self-signed (trusts what the server presents),
    with $ZOSTREAM_TLS_CA, and refused when that CA is not the one that signed the server's certificate."""
    from grpc_health.v1 import health_pb2

    from tests.server.test_server import self_signed

    cert, key = self_signed(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    other_cert, _ = self_signed(other)
    with health_server(unused_tcp_port, tls=(cert, key)) as servicer:
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        res = run_probe(unused_tcp_port)
        assert res.returncode == 0, res.stderr
        assert run_probe(unused_tcp_port, {"ZOSTREAM_TLS_CA": str(cert)}).returncode == 0
        assert run_probe(unused_tcp_port, {"ZOSTREAM_TLS_CA": str(other_cert)}).returncode == 1
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert run_probe(unused_tcp_port).returncode == 1


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


def test_compose_defaults_refuse_an_unauthenticated_call(model_dir: Path, tmp_path: Path) -> None:
    """Start the server as compose would (the image's ENTRYPOINT + the compose command, the secret
    file at its mount point mapped to a temp file) and call it without the key: UNAUTHENTICATED."""
    import grpc
    from grpc_health.v1 import health_pb2

    from tests.server.conftest import ProcServer, free_port, stop_process
    from zostream.v1 import generation_pb2 as G

    text = (ROOT / "Dockerfile").read_text()
    entry = json.loads(next(ln for ln in text.splitlines() if ln.startswith("ENTRYPOINT "))[11:])
    compose = compose_with({"ZOSTREAM_MODEL_DIR": str(model_dir)})
    eng = compose["services"]["engine"]
    key = "compose-default-key-0123456789"
    secret = tmp_path / "zostream_api_key"
    secret.write_text(key + "\n")
    mounts = {f"/run/secrets/{name}": str(secret) for name in eng["secrets"]}
    mounts |= {volume_target(v): v.split(":")[0] for v in eng["volumes"]}
    mounts["/data"] = str(tmp_path / "data")  # a named volume in compose
    port, http_port = free_port(), free_port()
    argv = [mounts.get(a, a) for a in entry[2:] + eng["command"]]
    # loopback and free ports here; the metrics server stays off (a third free port is not needed)
    argv += ["--host", "127.0.0.1", "--port", str(port), "--http-port", str(http_port)]
    argv += ["--metrics-port", "-1", "--device", "cpu"]
    assert "--api-key-file" in argv and str(secret) in argv
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zostream", "serve", *argv], stdout=out, stderr=subprocess.STDOUT
        )
    ps = ProcServer(proc, port, log, grpc.insecure_channel(f"127.0.0.1:{port}"))
    try:
        ps.wait_serving()  # health needs no key
        s = ps.stubs()
        with pytest.raises(grpc.RpcError) as exc:
            s.gen.GetModelInfo(G.GetModelInfoRequest(), timeout=10)
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as exc:
            list(s.gen.Generate(G.GenerateRequest(text="1 2 3"), timeout=10))
        assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
        info = s.gen.GetModelInfo(G.GetModelInfoRequest(), metadata=[("authorization", f"Bearer {key}")])
        assert info.family == "llama"
        assert run_probe(port).returncode == 0  # the compose healthcheck passes without the key
        # the OpenAI-compatible HTTP API the image serves takes the same key
        url = f"http://127.0.0.1:{http_port}/v1/models"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(url, timeout=10)
        assert err.value.code == 401
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.load(resp)["data"]
        serving = health_pb2.HealthCheckResponse.SERVING
        assert s.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == serving
    finally:
        stop_process(ps)


def test_image_script_parses_and_refuses_bad_arguments() -> None:
    """tools/image.sh (CI's image step): valid bash; a wrong command or variant is refused before any work."""
    script = ROOT / "tools" / "image.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    cases = ((["bogus"], "usage: tools/image.sh build|smoke"), (["build", "gpu"], "cpu or cuda"))
    for args, message in cases:
        res = subprocess.run(["bash", str(script), *args], capture_output=True, text=True, timeout=60)
        assert res.returncode == 1 and message in res.stderr, (args, res.stderr)
