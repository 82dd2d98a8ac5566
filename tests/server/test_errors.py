"""Failed calls carry google.rpc.Status details, and the Python client raises typed exceptions with them.

The details are decoded here with googleapis' own message types (google.rpc.error_details_pb2), not
with the client's decoder, for the raw-stub checks."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tests.server.conftest import Stubs, ThreadServer
from zostream.clients import errors as E
from zostream.clients.client import ZostreamClient
from zostream.v1 import generation_pb2 as G


def _details(exc: grpc.RpcError) -> dict[str, Any]:
    raw = dict(exc.trailing_metadata())["grpc-status-details-bin"]
    st = status_pb2.Status.FromString(raw)
    assert (st.code, st.message) == (exc.code().value[0], exc.details())  # consistent with the call's status
    out: dict[str, Any] = {}
    for a in st.details:
        for cls in (error_details_pb2.ErrorInfo, error_details_pb2.BadRequest, error_details_pb2.RetryInfo):
            if a.Is(cls.DESCRIPTOR):
                m = cls()
                a.Unpack(m)
                out[cls.__name__] = m
    return out


def _fail(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as exc:
        call()
    return exc.value


def test_bad_field_has_a_field_violation(stubs: Stubs) -> None:
    req = G.GenerateRequest(text="5", sampling=G.SamplingParams(top_p=2.0))
    exc = _fail(lambda: list(stubs.gen.Generate(req, timeout=10)))
    d = _details(exc)
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in d["BadRequest"].field_violations] == ["sampling.top_p"]
    assert d["BadRequest"].field_violations[0].description  # says what is wrong
    assert (d["ErrorInfo"].reason, d["ErrorInfo"].domain) == ("INVALID_ARGUMENT", "zostream")
    assert d["ErrorInfo"].metadata["field"] == "sampling.top_p"
    assert "RetryInfo" not in d  # retrying the same request cannot help


def test_overload_and_drain_say_when_to_retry(server: ThreadServer, stubs: Stubs) -> None:
    req = G.GenerateRequest(text="5", stopping=G.StoppingCriteria(max_new_tokens=2))
    app = server.app
    limit, app.max_inflight = app.max_inflight, 0
    try:
        exc = _fail(lambda: list(stubs.gen.Generate(req, timeout=10)))
    finally:
        app.max_inflight = limit
    d = _details(exc)
    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert d["ErrorInfo"].reason == "TOO_MANY_IN_FLIGHT" and "BadRequest" not in d
    assert d["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0
    app.draining = True
    try:
        exc = _fail(lambda: list(stubs.gen.Generate(req, timeout=10)))
    finally:
        app.draining = False
    d = _details(exc)
    assert exc.code() == grpc.StatusCode.UNAVAILABLE
    assert d["ErrorInfo"].reason == "SERVER_DRAINING"
    assert d["RetryInfo"].retry_delay.ToTimedelta().total_seconds() > 0


def test_malformed_message_is_invalid_argument_with_a_reason(server: ThreadServer) -> None:
    ch = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    raw = ch.unary_unary("/zostream.v1.TextGeneration/Tokenize")  # bytes in, bytes out
    exc = _fail(lambda: raw(b"\xff\xff\xff", timeout=10))
    ch.close()
    assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _details(exc)["ErrorInfo"].reason == "MALFORMED_REQUEST"


def test_client_raises_typed_exceptions(server: ThreadServer) -> None:
    with ZostreamClient(f"127.0.0.1:{server.port}", retries=0) as c:
        with pytest.raises(E.InvalidArgumentError) as exc:
            c.generate("5", top_p=2.0, max_new_tokens=2)
        assert exc.value.field == "sampling.top_p" and exc.value.reason == "INVALID_ARGUMENT"
        assert exc.value.field_violations[0] == E.FieldViolation(
            "sampling.top_p", exc.value.field_violations[0].description
        )
        with pytest.raises(E.NotFoundError) as nf:
            c.get_job("job-nope")
        assert nf.value.field == "job_id" and isinstance(nf.value, E.ZostreamError)
        server.app.draining = True
        try:
            with pytest.raises(E.UnavailableError) as un:
                c.generate("5", max_new_tokens=2)
        finally:
            server.app.draining = False
        assert un.value.retry_after_s and un.value.reason == "SERVER_DRAINING"


def test_metrics_count_rejections_inter_token_latency_and_build(server: ThreadServer, stubs: Stubs) -> None:
    reg = server.app.metrics.registry
    before = reg.get_sample_value("zostream_requests_rejected_total", {"reason": "INVALID_ARGUMENT"}) or 0
    _fail(lambda: list(stubs.gen.Generate(G.GenerateRequest(text="5", sampling=G.SamplingParams(top_p=3)))))
    assert (
        reg.get_sample_value("zostream_requests_rejected_total", {"reason": "INVALID_ARGUMENT"}) == before + 1
    )
    n0 = reg.get_sample_value("zostream_inter_token_latency_seconds_count", {"api": "grpc"}) or 0
    req = G.GenerateRequest(
        text="5", stream=True, stopping=G.StoppingCriteria(max_new_tokens=5, ignore_eos=True)
    )
    list(stubs.gen.Generate(req, timeout=30))
    assert reg.get_sample_value("zostream_inter_token_latency_seconds_count", {"api": "grpc"}) == n0 + 4
    labels = {
        "version": __import__("zostream").__version__,
        "model": __import__("pathlib").Path(server.cfg.engine.model_dir).name,
        "family": "llama",
        "codec": "none",
        "device": "cpu",
    }
    assert reg.get_sample_value("zostream_build_info", labels) == 1
