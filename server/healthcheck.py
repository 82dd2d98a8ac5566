"""Container health probe: exit 0 when the server at ADDR reports grpc.health.v1 SERVING, else 1.

    python -m zostream.server.healthcheck [ADDR]      (default 127.0.0.1:50051)

The same command works whether the server speaks plaintext or TLS (a HEALTHCHECK cannot know how
the server was started): a first TLS handshake tells which. With TLS the probe trusts
$ZOSTREAM_TLS_CA when set (the CA that signed the server's certificate), else the certificate the
server presents (right for a self-signed one), and checks the name that certificate carries, so a
certificate for "engine.example" still passes a probe of 127.0.0.1. This is a liveness probe of the
local process, not a client: it sends no API key (health is exempt from it).
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_ADDR = "127.0.0.1:50051"
TIMEOUT_S = 5.0


def split_addr(addr: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {addr!r}: expected HOST:PORT, e.g. {DEFAULT_ADDR}")
    return host.strip("[]"), int(port)


def server_tls(host: str, port: int) -> tuple[bytes, str] | None:
    """(trusted root PEM, name to verify) when the server speaks TLS, None when it speaks plaintext.

    Raises OSError when nothing answers.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=TIMEOUT_S) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                der = tls.getpeercert(binary_form=True)
        except (ssl.SSLError, ConnectionResetError, EOFError):
            return None  # a plaintext HTTP/2 server answers a ClientHello with garbage or a reset
    ca_file = os.environ.get("ZOSTREAM_TLS_CA")
    root = Path(ca_file).read_bytes() if ca_file else ssl.DER_cert_to_PEM_cert(der).encode()
    return root, cert_name(host, port, root)


def cert_name(host: str, port: int, root: bytes) -> str:
    """A name in the server's certificate (DNS SAN, else IP SAN, else CN), read over a verified handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # the name is what we are looking for
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a self-signed leaf is its own anchor
    ctx.load_verify_locations(cadata=root.decode())
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout=TIMEOUT_S) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        cert = tls.getpeercert() or {}
    sans = cert.get("subjectAltName", ())
    for kind in ("DNS", "IP Address"):
        for k, v in sans:
            if k == kind:
                return v
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return v
    return host


def check(addr: str) -> int:
    """0 if SERVING; 1 otherwise, with the reason on stderr."""
    try:
        host, port = split_addr(addr)
        tls = server_tls(host, port)
        if tls is None:
            channel = grpc.insecure_channel(addr)
        else:
            root, name = tls
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            channel = grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", name)])
        with channel:
            stub = health_pb2_grpc.HealthStub(channel)
            status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT_S).status
    except (OSError, ValueError, ssl.SSLError, grpc.RpcError) as exc:
        print(f"healthcheck {addr}: {exc}", file=sys.stderr)
        return 1
    if status != health_pb2.HealthCheckResponse.SERVING:
        name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
        print(f"healthcheck {addr}: {name}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return check(args[0] if args else os.environ.get("ZOSTREAM_HEALTH_ADDR", DEFAULT_ADDR))


if __name__ == "__main__":
    sys.exit(main())
