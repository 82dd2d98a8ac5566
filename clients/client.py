"""ZostreamClient: a typed, synchronous Python client for the zostream gRPC API.

Every call carries the API key as `authorization: Bearer KEY` metadata and a deadline (the call's
`timeout`, else the client's; Generate and StreamJobEvents only the call's, so a long generation is
never cut short). UNAVAILABLE (server down, restarting, overloaded listener) is retried with
exponential backoff: unary calls at any time, streams only before their first message, so a retry
never duplicates output. StreamJobEvents is the exception: it resumes after a drop from the last
event id it saw, which the API makes exact. Other failures raise a ZostreamError subclass per status
code (InvalidArgumentError, NotFoundError, ...) carrying the status details: reason, field
violations, retry advice (clients/errors.py).
Messages come back as dicts (proto field names, enums as names, 64-bit integers as ints),
generation output as frozen dataclasses (GenerateResult, GenerateChunk). The calls live per service in
client_generation.py, client_jobs.py and client_adapters.py, over client_base.py's retrying plumbing.
"""

from __future__ import annotations

from zostream.clients.client_adapters import AdapterCalls
from zostream.clients.client_base import CHUNK_BYTES, PathOrBytes, to_dict
from zostream.clients.client_generation import GenerateChunk, GenerateResult, GenerationCalls, TokenLogprob
from zostream.clients.client_jobs import JobCalls, hyperparameters
from zostream.clients.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    ZostreamError,
    error,
    from_rpc_error,
)

# Re-exported: what users import from here (the client, its output types and exceptions, helpers).
__all__ = [
    "CHUNK_BYTES",
    "AlreadyExistsError",
    "FailedPreconditionError",
    "FieldViolation",
    "GenerateChunk",
    "GenerateResult",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PathOrBytes",
    "ResourceExhaustedError",
    "TokenLogprob",
    "UnauthenticatedError",
    "UnavailableError",
    "ZostreamClient",
    "ZostreamError",
    "error",
    "from_rpc_error",
    "hyperparameters",
    "to_dict",
]


class ZostreamClient(GenerationCalls, JobCalls, AdapterCalls):
    """Synchronous client of one zostream server. Use as a context manager or call close()."""
