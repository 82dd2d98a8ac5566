"""`zostream serve`: the long-running gRPC engine server."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from zostream import defaults
from zostream.clients.cli import UsageError
from zostream.clients.common import add_kv_args, add_runtime_args, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the gRPC server (Generate, FineTune, Adapters) with Prometheus /metrics",
        description="Serve a model over gRPC: batched streaming generation and zeroth-order "
        "fine-tuning jobs. One engine thread owns the device; health is NOT_SERVING until the model is open.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="Hugging Face model directory (read-only)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 in containers)"
    )
    p.add_argument(
        "--http-port",
        type=int,
        metavar="PORT",
        help="also serve the OpenAI-compatible HTTP API (/v1/chat/completions, /v1/fine_tuning/jobs, ...) "
        "on this port, same engine, API key and TLS (0 picks a free one; default: off)",
    )
    p.add_argument(
        "--metrics-port", type=int, default=9400, help="Prometheus port (default 9400; -1 disables)"
    )
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address for /metrics (default 127.0.0.1)")
    p.add_argument(
        "--data-dir",
        default=os.environ.get("ZOSTREAM_DATA_DIR", "zostream-data"),
        metavar="DIR",
        help="jobs, datasets, adapters (default ./zostream-data or $ZOSTREAM_DATA_DIR)",
    )
    p.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="require 'authorization: Bearer <key>' on every RPC "
        "but health; the key is the file's first line",
    )
    p.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate (needs --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="private key for --tls-cert")
    add_kv_args(p)
    p.add_argument(
        "--max-new-tokens",
        type=positive_int,
        default=defaults.SERVER_MAX_NEW_TOKENS,
        help=f"most new tokens a request may ask for (default {defaults.SERVER_MAX_NEW_TOKENS}; a request "
        f"that sets none gets {defaults.MAX_NEW_TOKENS}, capped by this)",
    )
    p.add_argument(
        "--max-waiting", type=positive_int, default=256, help="queued requests before RESOURCE_EXHAUSTED"
    )
    p.add_argument(
        "--max-resident-adapters",
        type=positive_int,
        default=None,
        metavar="N",
        help="LoRA adapters kept on the device; the least recently used wait on the host (default: all)",
    )
    p.add_argument(
        "--master-dir",
        metavar="DIR",
        default=None,
        help="keep full-parameter jobs' masters here, e.g. /dev/shm (shared memory CUDA can register; "
        "lost at a restart, then rebuilt from the base and the update log) (default: the job directory)",
    )
    add_runtime_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from zostream.engine.config import CodecConfig, EngineConfig, LimitsConfig, StreamConfig
    from zostream.server.app import ServerConfig, run_forever

    if args.http_port is not None and not 0 <= args.http_port <= 65535:
        raise UsageError(f"--http-port {args.http_port}: use a port in 0..65535 (0 picks a free one)")
    if args.http_port and args.http_port == args.port:
        raise UsageError(
            f"--http-port {args.http_port}: the gRPC server listens there (--port); pick another"
        )
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    key = None
    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().splitlines()[0].strip()
        except (OSError, IndexError) as exc:
            raise UsageError(f"--api-key-file {args.api_key_file}: cannot read a key ({exc})") from None
        if len(key) < 16:
            raise UsageError("--api-key-file: use a key of at least 16 characters")
    if not Path(args.model).is_dir():
        raise UsageError(f"--model {args.model}: not a directory")
    engine = EngineConfig(
        args.model,
        device=args.device,
        compute_dtype=args.dtype,
        stream=StreamConfig(
            gpu_memory_bytes=args.gpu_memory,
            host_memory_bytes=getattr(args, "host_memory", None),
            master_dir=args.master_dir,
        ),
        codec=CodecConfig(args.codec),
        limits=LimitsConfig(
            max_batch=args.max_batch,
            max_seq_len=args.max_seq_len,
            max_new_tokens=args.max_new_tokens,
            max_waiting=args.max_waiting,
            max_resident_adapters=args.max_resident_adapters,
            kv_memory_bytes=args.kv_memory,
            kv_offload=args.kv_offload,
        ),
    )
    cfg = ServerConfig(
        engine,
        args.data_dir,
        args.port,
        args.host,
        None if args.metrics_port < 0 else args.metrics_port,
        args.metrics_addr,
        key,
        args.tls_cert,
        args.tls_key,
        http_port=args.http_port,
    )
    run_forever(cfg)
    return 0
