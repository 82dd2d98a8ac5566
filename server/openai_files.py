"""OpenAI /v1/files: JSONL training data for fine-tuning jobs.

Files are the job store's datasets (a dataset uploaded over gRPC is a file here, by its name).
OpenAI's chat fine-tuning records ({"messages": [...]} with optional `weight`, `name`, content
parts) are normalised to zostream's chat records before the usual validation.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from zostream.engine import data as D
from zostream.engine.errors import NotFoundError, RequestError
from zostream.engine.jobs import MAX_DATASET_BYTES


def routes(app: Any) -> list[Route]:
    f = Files(app)
    return [
        Route("/v1/files", f.upload, methods=["POST"]),
        Route("/v1/files", f.list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", f.get_file, methods=["GET"]),
        Route("/v1/files/{file_id}", f.delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", f.file_content, methods=["GET"]),
    ]


def normalise_line(line: str, lineno: int) -> str:
    """One JSONL record in OpenAI's chat fine-tuning format -> a zostream chat record (others as is)."""
    if not line.strip() or D.too_deep(line):
        return line  # the dataset loader refuses deep nesting, naming the line
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return line  # the dataset loader names the line and what is wrong
    if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
        return line
    msgs = []
    for i, m in enumerate(rec["messages"]):
        if not isinstance(m, dict):
            return line
        if m.get("tool_calls") or m.get("function_call"):
            raise RequestError(f"line {lineno}: messages[{i}]: tool calls are not supported", "file")
        role = "system" if m.get("role") == "developer" else m.get("role")
        content = m.get("content")
        if isinstance(content, list):  # text parts
            content = "".join(p.get("text", "") if isinstance(p, dict) else "" for p in content)
        msg = {"role": role, "content": "" if content is None else content}
        if "weight" in m:  # 0: an assistant turn not trained on (checked by the dataset loader)
            msg["weight"] = m["weight"]
        msgs.append(msg)
    return json.dumps({"messages": msgs})


def _file(info: dict) -> dict:
    return {
        "id": info["name"],
        "object": "file",
        "bytes": info["size_bytes"],
        "created_at": int(info["created_at"]),
        "filename": info.get("filename") or info["name"] + ".jsonl",
        "purpose": info.get("purpose", "fine-tune"),
        "status": "processed",
        "status_details": None,
    }


def page(request: Request, items: list[dict], key: str = "id") -> dict:
    try:
        limit = int(request.query_params.get("limit", 20))
    except ValueError:
        raise RequestError("must be an integer", "limit") from None
    if not 1 <= limit <= 100:
        raise RequestError("must be in 1..100", "limit")
    after = request.query_params.get("after")
    if after:
        ids = [i[key] for i in items]
        if after not in ids:
            raise RequestError(f"{after[:64]!r} is not an id from a previous page", "after")
        items = items[ids.index(after) + 1 :]
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


class Files:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def upload(self, request: Request) -> Response:
        engine = self.app.ready_engine()
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as exc:  # noqa: BLE001 - multipart parse errors: the client's body
            raise RequestError(
                f"expected multipart/form-data with 'file' and 'purpose' ({exc})", "file"
            ) from None
        purpose, up = form.get("purpose"), form.get("file")
        if purpose != "fine-tune":
            raise RequestError(f"only 'fine-tune' files are accepted, got {str(purpose)[:40]!r}", "purpose")
        if up is None or isinstance(up, str):
            raise RequestError("is required: a JSONL file", "file")
        data = await up.read(MAX_DATASET_BYTES + 1)
        if len(data) > MAX_DATASET_BYTES:
            raise RequestError(
                f"files are limited to {MAX_DATASET_BYTES} bytes", "file", code="RESOURCE_EXHAUSTED"
            )
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise RequestError(f"is not valid UTF-8 (byte {exc.start})", "file") from None
        lines = [normalise_line(line, i) for i, line in enumerate(lines, start=1)]
        name = "file-" + uuid.uuid4().hex[:24]
        fname = (up.filename or "")[:200] or name + ".jsonl"
        try:
            ds = await asyncio.to_thread(D.load_records, lines, fname, engine.tokenizer, 1 << 16)
        except (RecursionError, ValueError, TypeError, UnicodeError) as exc:
            if isinstance(exc, RequestError):
                raise RequestError(str(exc), "file") from None
            raise RequestError(
                f"a record cannot be read ({type(exc).__name__}: {str(exc)[:160]})", "file"
            ) from None
        n = len(ds.choices) if ds.kind == "choice" else len(ds.examples)
        body = ("\n".join(lines) + "\n").encode()
        meta = {"kind": ds.kind, "num_records": n, "filename": fname, "purpose": purpose}
        info = self.app.jobs.save_dataset(name, body, meta)
        return JSONResponse(_file(info))

    def info(self, file_id: str, param: str = "file_id") -> dict:
        try:
            return self.app.jobs.get_dataset(file_id, param)
        except NotFoundError:
            raise NotFoundError(f"no file {file_id[:64]!r}; upload it with POST /v1/files", param) from None

    async def list_files(self, request: Request) -> Response:
        files = sorted((_file(i) for i in self.app.jobs.list_datasets()), key=lambda f: -f["created_at"])
        return JSONResponse(page(request, files))

    async def get_file(self, request: Request) -> Response:
        return JSONResponse(_file(self.info(request.path_params["file_id"])))

    async def file_content(self, request: Request) -> Response:
        info = self.info(request.path_params["file_id"])
        return Response(self.app.jobs.dataset_path(info["name"]).read_bytes(), media_type="application/jsonl")

    async def delete_file(self, request: Request) -> Response:
        info = self.info(request.path_params["file_id"])
        try:
            self.app.jobs.delete_dataset(info["name"])  # refused while an unfinished job names it
        except RequestError as exc:
            raise RequestError(str(exc.args[0]), "file_id", code=exc.code, reason=exc.reason) from None
        return JSONResponse({"id": info["name"], "object": "file", "deleted": True})
