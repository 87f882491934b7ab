"""A loopback stand-in for OpenAI's Files and Batches API, for the ``openai-batch`` tests.

It implements the documented endpoints the SDK calls — ``POST /v1/files`` (multipart,
``purpose=batch``), ``POST /v1/batches``, ``GET /v1/batches``, ``GET /v1/batches/{id}``,
``GET /v1/files/{id}/content`` — and validates input files as OpenAI does (JSONL lines with
``custom_id``/``method``/``url``/``body``, unique ids, at most 50,000 lines and 200 MB).
A batch moves one status per retrieve (validating → in_progress → finalizing → final), and
each answer is a deterministic echo of the request's messages (``expected_text``), so tests
can check every result against its own request even though output lines are shuffled.

Faults are switched on per test: ``plans`` (the next batches end ``expired`` or
``cancelled`` with part of the output — ``error_file`` puts the rest in the error file — or
``failed`` with validation errors), ``error_once`` (custom ids that
go to the error file the first time), ``fail_retrieve`` (answer 500 to the next N retrieves),
``fail_create_after`` (create the batch, then answer 500 — the timeout case). The server runs
aiohttp in a thread (aiohttp ships multipart parsing; Starlette would need python-multipart).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import orjson
from aiohttp import web

from prefsynth.backends import create_backend
from prefsynth.backends.batch_common import BatchBackend
from prefsynth.config import ModelSpec
from prefsynth.core.store import Store
from prefsynth.records import ChatRequest, ChatResult

MAX_LINES = 50_000
MAX_BYTES = 200 * 1024 * 1024


def run_batch(spec: ModelSpec, store: Store, reqs: Sequence[ChatRequest], *, wait: bool,
              calls: int = 1) -> list[ChatResult]:
    """``calls`` complete() calls on one fresh batch backend (one process); the last call's
    results."""
    async def go() -> list[ChatResult]:
        backend = create_backend(spec, store=store)
        assert isinstance(backend, BatchBackend)
        backend.wait = wait
        try:
            for _ in range(calls):
                out = await backend.complete(reqs)
            return out
        finally:
            await backend.aclose()
    return asyncio.run(go())


def expected_text(messages: list[dict[str, str]]) -> str:
    """The answer the server gives to a request with these messages."""
    digest = hashlib.sha256(orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return f"echo {digest[:16]}"


class BatchAPI:
    """Server state. Tests read the counters and set the fault switches directly."""

    def __init__(self, api_key: str | None = None, seed: int = 0) -> None:
        self.api_key = api_key
        self.steps = ["validating", "in_progress", "finalizing"]
        self.files: dict[str, dict[str, Any]] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.plans: list[dict[str, Any]] = []  # {"status": "expired", "keep": 0.5} ...
        self.error_once: set[str] = set()
        self.fail_retrieve = 0
        self.fail_create_after = 0
        self.forbidden = False  # every request answers 403 (a key without access)
        self.created = 0  # batches created (what costs money)
        self.uploads = 0
        self.retrieves = 0
        self.output_orders: list[list[str]] = []  # custom ids per output file, as written
        self.rng = random.Random(seed)
        self._n = 0
        #: answers a request body (default: ``expected_text`` of its messages)
        self.responder: Callable[[dict[str, Any]], str] | None = None

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}-{self._n:05d}"

    def _file(self, data: bytes, filename: str, purpose: str) -> dict[str, Any]:
        fid = self._id("file")
        obj = {
            "id": fid,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
        }
        self.files[fid] = {**obj, "data": data}
        return obj

    # ---- handlers ----------------------------------------------------------------------
    @web.middleware
    async def auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        got = request.headers.get("Authorization", "")
        if self.forbidden:
            return _error(403, "You are not allowed to use the Batch API", "forbidden")
        if self.api_key is not None and got != f"Bearer {self.api_key}":
            # like OpenAI, the message quotes the key it was given: the client must redact it
            return _error(
                401, f"Incorrect API key provided: {got.removeprefix('Bearer ')}", "invalid_api_key"
            )
        return await handler(request)

    async def upload(self, request: web.Request) -> web.Response:
        form = await request.post()
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, web.FileField) or purpose != "batch":
            return _error(400, "expected a file and purpose=batch", "invalid_request")
        self.uploads += 1
        return web.json_response(self._file(upload.file.read(), upload.filename, "batch"))

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        f = self.files.get(body.get("input_file_id", ""))
        if f is None:
            return _error(404, "no such file", "not_found")
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return _error(400, "bad endpoint or completion_window", "invalid_request")
        now = int(time.time())
        bid = self._id("batch")
        plan = self.plans.pop(0) if self.plans else {"status": "completed"}
        self.batches[bid] = {
            "id": bid,
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
            "input_file_id": f["id"],
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "expires_at": now + 86400,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
            "_step": 0,
            "_plan": plan,
        }
        self.created += 1
        if self.fail_create_after > 0:
            self.fail_create_after -= 1
            return _error(500, "internal error after create", "server_error")
        return web.json_response(_public(self.batches[bid]))

    async def list_batches(self, request: web.Request) -> web.Response:
        data = [_public(b) for b in reversed(self.batches.values())]
        limit = int(request.query.get("limit", 20))
        return web.json_response({"object": "list", "data": data[:limit], "has_more": False})

    async def retrieve(self, request: web.Request) -> web.Response:
        self.retrieves += 1
        if self.fail_retrieve > 0:
            self.fail_retrieve -= 1
            # a verbose proxy may echo the caller's credentials: the client must redact them
            who = request.headers.get("Authorization", "").removeprefix("Bearer ")
            return _error(500, f"temporarily unavailable (caller {who})", "server_error")
        b = self.batches.get(request.match_info["batch_id"])
        if b is None:
            return _error(404, "no such batch", "not_found")
        if b["status"] in ("validating", "in_progress", "finalizing"):
            b["_step"] += 1
            if b["_step"] < len(self.steps):
                b["status"] = self.steps[b["_step"]]
            else:
                self._finish(b)
        return web.json_response(_public(b))

    async def content(self, request: web.Request) -> web.Response:
        f = self.files.get(request.match_info["file_id"])
        if f is None:
            return _error(404, "no such file", "not_found")
        return web.Response(body=f["data"], content_type="application/octet-stream")

    # ---- running a batch ---------------------------------------------------------------
    def _finish(self, b: dict[str, Any]) -> None:
        plan = b["_plan"]
        lines, problems = _parse_input(self.files[b["input_file_id"]]["data"])
        if problems or plan["status"] == "failed":
            problems = problems or [
                {"code": "invalid_request", "message": "injected failure", "param": None, "line": 1}
            ]
            b.update(status="failed", errors={"object": "list", "data": problems})
            b["request_counts"]["total"] = len(lines)
            return
        keep = len(lines) if plan["status"] == "completed" else int(len(lines) * plan["keep"])
        out, err = [], []
        for n, line in enumerate(lines[:keep]):
            cid = line["custom_id"]
            rid = f"req-{b['id']}-{n}"
            if cid in self.error_once:
                self.error_once.discard(cid)
                body = {
                    "error": {
                        "message": "injected item failure",
                        "type": "invalid_request",
                        "code": "injected",
                    }
                }
                err.append(
                    {
                        "id": rid,
                        "custom_id": cid,
                        "error": None,
                        "response": {"status_code": 400, "request_id": rid, "body": body},
                    }
                )
            else:
                out.append(
                    {
                        "id": rid,
                        "custom_id": cid,
                        "error": None,
                        "response": {
                            "status_code": 200,
                            "request_id": rid,
                            "body": _completion(line["body"], rid, self.responder),
                        },
                    }
                )
        if plan.get("error_file"):  # OpenAI writes expired requests to the error file
            err += [
                {
                    "id": f"req-{b['id']}-x{n}",
                    "custom_id": line["custom_id"],
                    "response": None,
                    "error": {"code": "batch_expired", "message": "not run before the window"},
                }
                for n, line in enumerate(lines[keep:])
            ]
        self.rng.shuffle(out)
        self.output_orders.append([x["custom_id"] for x in out])
        for kind, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                data = b"".join(orjson.dumps(r) + b"\n" for r in rows)
                b[kind] = self._file(data, f"{b['id']}_{kind}.jsonl", "batch_output")["id"]
        b["status"] = plan["status"]
        b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}
        b[f"{plan['status']}_at"] = int(time.time())

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.auth], client_max_size=MAX_BYTES + 2**20)
        app.add_routes(
            [
                web.post("/v1/files", self.upload),
                web.get("/v1/files/{file_id}/content", self.content),
                web.post("/v1/batches", self.create),
                web.get("/v1/batches", self.list_batches),
                web.get("/v1/batches/{batch_id}", self.retrieve),
            ]
        )
        return app


def _parse_input(data: bytes) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Input lines, and the validation errors OpenAI would report for them."""
    lines: list[dict[str, Any]] = []
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    if len(data) > MAX_BYTES:
        problems.append({"code": "too_large", "message": "file over 200 MB", "line": None})
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = orjson.loads(raw)
            ok = (
                line["method"] == "POST"
                and line["url"] == "/v1/chat/completions"
                and isinstance(line["body"]["messages"], list)
                and line["body"]["model"]
            )
            cid = line["custom_id"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            ok, cid = False, None
        if not ok or cid in seen:
            problems.append(
                {
                    "code": "invalid_line",
                    "message": "bad or duplicate line",
                    "param": None,
                    "line": n,
                }
            )
            continue
        seen.add(cid)
        lines.append(line)
    if len(lines) > MAX_LINES:
        problems.append({"code": "too_many_requests", "message": "over 50,000", "line": None})
    return lines, problems


def _completion(body: dict[str, Any], rid: str,
                responder: Callable[[dict[str, Any]], str] | None = None) -> dict[str, Any]:
    words = sum(len(m["content"].split()) for m in body["messages"])
    content = responder(body) if responder else expected_text(body["messages"])
    return {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
        "usage": {"prompt_tokens": words, "completion_tokens": 2, "total_tokens": words + 2},
    }


def _public(b: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in b.items() if not k.startswith("_")}


def _error(status: int, message: str, code: str) -> web.Response:
    err = {"error": {"message": message, "type": code, "param": None, "code": code}}
    return web.json_response(err, status=status)


@contextmanager
def serve(api: BatchAPI) -> Iterator[str]:
    """Run the API on 127.0.0.1 (a free port) in a thread; yield its ``/v1`` base URL."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(api.app(), access_log=None)
    ready = threading.Event()
    port: list[int] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port.append(runner.addresses[0][1])
        ready.set()
        loop.run_forever()
        loop.run_until_complete(runner.cleanup())
        loop.close()

    thread = threading.Thread(target=run, name="batch-api", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("batch API server did not start")
    try:
        yield f"http://127.0.0.1:{port[0]}/v1"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
