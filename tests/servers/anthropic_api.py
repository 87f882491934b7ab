"""A loopback stand-in for Anthropic's Messages and Message Batches API, for the anthropic tests.

It implements the documented endpoints the SDK calls — ``POST /v1/messages``,
``POST /v1/messages/batches`` (create), ``GET /v1/messages/batches`` (list),
``GET /v1/messages/batches/{id}`` (retrieve), ``GET .../{id}/results`` (JSONL) and
``POST .../{id}/cancel`` — and validates requests as Anthropic does: a key (``x-api-key`` or a
bearer token) and ``anthropic-version`` on every call; bodies with ``model``, ``max_tokens``,
user/assistant ``messages``, an optional top-level ``system``, and no field the API lacks (a
``seed`` is refused); batch ``custom_id``s unique and ``^[a-zA-Z0-9_-]{1,64}$``, at most
100,000 requests. A batch is ``in_progress`` for ``steps`` retrieves, then ``ended``; its
results come back in shuffled order, so a client must match them by ``custom_id``. Each answer
is a deterministic echo of the request's messages (``expected_text``); a forced tool gets
``tool_responder(body)`` as its input.

Faults are switched on per test: ``faults`` (statuses the next live calls answer with, e.g.
``(429, {"retry-after": "0.05"})`` or ``(529, {})``), ``error_once`` / ``error_always``
(custom ids errored the first time they run / every time), ``expire`` (the fraction of the next batch's requests that expire),
``fail_retrieve`` (500 for the next N retrieves), ``fail_create_after`` (create the batch, then
answer 500), ``hold_retrieve`` (while true, retrieves hang: a client stuck polling),
``forbidden`` (every call answers 403). Counters: ``created`` (batches: what costs money), ``message_calls``,
``retrieves``, ``result_orders``. It reuses ``batch_api.serve`` (aiohttp in a thread).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import orjson
from aiohttp import web

from tests.servers import batch_api
from tests.servers.batch_api import expected_text

MAX_REQUESTS = 100_000
#: the variable the anthropic tests put their key in, and the key: it must never reach disk
KEY_ENV = "PREFSYNTH_TEST_ANTHROPIC_KEY"
SENTINEL = "sk-ant-sentinel-NEVER-STORE-4d1e"
FIELDS = {"model", "max_tokens", "messages", "system", "temperature", "top_p", "top_k",
          "stop_sequences", "tools", "tool_choice", "metadata", "stream"}
_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _now(offset: float = 0.0) -> str:
    t = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset)
    return t.isoformat().replace("+00:00", "Z")


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": kind, "message": message}},
                             status=status)


def check_params(body: Any) -> str | None:
    """Why Anthropic would refuse these Messages parameters, or None."""
    if not isinstance(body, dict):
        return "body: expected an object"
    extra = sorted(set(body) - FIELDS)
    if extra:
        return f"{extra[0]}: Extra inputs are not permitted"
    if not isinstance(body.get("model"), str) or not isinstance(body.get("max_tokens"), int):
        return "model and max_tokens are required"
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "messages: at least one message is required"
    for m in msgs:
        if m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
            return f"messages: unexpected role {m.get('role')!r}"
    if "system" in body and not isinstance(body["system"], str):
        return "system: expected a string"
    if not 0 <= body.get("temperature", 1.0) <= 1:
        return "temperature: must be in [0, 1]"
    if "tool_choice" in body:
        names = {t["name"] for t in body.get("tools", [])}
        if body["tool_choice"].get("name") not in names:
            return "tool_choice: no such tool"
    return None


class AnthropicAPI:
    """Server state. Tests read the counters and set the fault switches directly."""

    def __init__(self, api_key: str | None = None, seed: int = 0, steps: int = 2) -> None:
        self.api_key = api_key
        self.steps = steps
        self.batches: dict[str, dict[str, Any]] = {}
        self.faults: list[tuple[int, dict[str, str]]] = []
        self.error_once: set[str] = set()
        self.error_always: set[str] = set()
        self.expire: float = 0.0
        self.fail_retrieve = 0
        self.fail_create_after = 0
        self.hold_retrieve = False
        self.forbidden = False  # every request answers 403 (a key without access)
        self.created = 0
        self.message_calls = 0
        self.retrieves = 0
        self.bodies: list[dict[str, Any]] = []  # every live body, as received
        self.headers: list[dict[str, str]] = []
        self.result_orders: list[list[str]] = []
        self.rng = random.Random(seed)
        self._n = 0
        #: the text answered to a body (default: ``expected_text`` of its messages)
        self.responder: Callable[[dict[str, Any]], str] | None = None
        #: the tool input answered to a body with a forced tool
        self.tool_responder: Callable[[dict[str, Any]], Any] = (
            lambda body: {"echo": expected_text(body["messages"])})

    # ---- answers -----------------------------------------------------------------------
    def message(self, body: dict[str, Any], mid: str) -> dict[str, Any]:
        words = sum(len(m["content"].split()) for m in body["messages"])
        words += len(body.get("system", "").split())
        if "tool_choice" in body:
            content = [{"type": "tool_use", "id": f"toolu_{mid}", "name":
                        body["tool_choice"]["name"], "input": self.tool_responder(body)}]
            stop = "tool_use"
        else:
            text = self.responder(body) if self.responder else expected_text(body["messages"])
            stop = "end_turn"
            if body["max_tokens"] < 2:  # "echo <hash>" is two tokens here
                text, stop = text.split()[0], "max_tokens"
            content = [{"type": "text", "text": text}]
        return {"id": f"msg_{mid}", "type": "message", "role": "assistant",
                "model": body["model"], "content": content, "stop_reason": stop,
                "stop_sequence": None,
                "usage": {"input_tokens": words, "output_tokens": 2,
                          "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}}

    # ---- handlers ----------------------------------------------------------------------
    @web.middleware
    async def auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        got = request.headers.get("x-api-key") or request.headers.get(
            "Authorization", "").removeprefix("Bearer ")
        if self.forbidden:
            return _error(403, "permission_error", "this key may not use this resource")
        if self.api_key is not None and got != self.api_key:
            # the message quotes the key it was given: the client must redact it
            return _error(401, "authentication_error", f"invalid x-api-key: {got}")
        if not request.headers.get("anthropic-version"):
            return _error(400, "invalid_request_error", "anthropic-version header is required")
        return await handler(request)

    async def messages(self, request: web.Request) -> web.Response:
        self.message_calls += 1
        body = await request.json()
        self.bodies.append(body)
        self.headers.append(dict(request.headers))
        if self.faults:
            status, headers = self.faults.pop(0)
            kind = {429: "rate_limit_error", 529: "overloaded_error"}.get(status, "api_error")
            resp = _error(status, kind, f"injected {status}")
            resp.headers.update(headers)
            return resp
        problem = check_params(body)
        if problem:
            return _error(400, "invalid_request_error", problem)
        self._n += 1
        return web.json_response(self.message(body, f"{self._n:05d}"))

    async def create(self, request: web.Request) -> web.Response:
        body = await request.json()
        reqs = body.get("requests")
        if not isinstance(reqs, list) or not 0 < len(reqs) <= MAX_REQUESTS:
            return _error(400, "invalid_request_error", "requests: 1 to 100,000 items")
        ids = [r.get("custom_id") for r in reqs]
        if len(set(ids)) != len(ids) or not all(isinstance(i, str) and _CUSTOM_ID.match(i)
                                                for i in ids):
            return _error(400, "invalid_request_error", "custom_id: bad or duplicate")
        self._n += 1
        bid = f"msgbatch_{self._n:05d}"
        self.batches[bid] = {
            "id": bid, "type": "message_batch", "processing_status": "in_progress",
            "request_counts": {"processing": len(reqs), "succeeded": 0, "errored": 0,
                               "canceled": 0, "expired": 0},
            "ended_at": None, "created_at": _now(), "expires_at": _now(86400),
            "cancel_initiated_at": None, "archived_at": None, "results_url": None,
            "_requests": reqs, "_step": 0, "_expire": self.expire, "_results": None,
        }
        self.expire = 0.0
        self.created += 1
        if self.fail_create_after > 0:
            self.fail_create_after -= 1
            return _error(500, "api_error", "internal error after create")
        return web.json_response(_public(self.batches[bid]))

    async def list_batches(self, request: web.Request) -> web.Response:
        data = [_public(b) for b in reversed(self.batches.values())]
        data = data[: int(request.query.get("limit", 20))]
        return web.json_response({"data": data, "has_more": False,
                                  "first_id": data[0]["id"] if data else None,
                                  "last_id": data[-1]["id"] if data else None})

    async def retrieve(self, request: web.Request) -> web.Response:
        self.retrieves += 1
        while self.hold_retrieve:
            await asyncio.sleep(0.01)
        if self.fail_retrieve > 0:
            self.fail_retrieve -= 1
            who = request.headers.get("x-api-key") or request.headers.get("Authorization", "")
            return _error(500, "api_error", f"temporarily unavailable (caller {who})")
        b = self.batches.get(request.match_info["batch_id"])
        if b is None:
            return _error(404, "not_found_error", "no such batch")
        if b["processing_status"] != "ended":
            b["_step"] += 1
            if b["_step"] >= self.steps or b["processing_status"] == "canceling":
                self._finish(b, request)
        return web.json_response(_public(b))

    async def cancel(self, request: web.Request) -> web.Response:
        b = self.batches.get(request.match_info["batch_id"])
        if b is None:
            return _error(404, "not_found_error", "no such batch")
        if b["processing_status"] == "in_progress":
            b.update(processing_status="canceling", cancel_initiated_at=_now())
        return web.json_response(_public(b))

    async def results(self, request: web.Request) -> web.StreamResponse:
        b = self.batches.get(request.match_info["batch_id"])
        if b is None or b["_results"] is None:
            return _error(404, "not_found_error", "no results for this batch (yet)")
        data = b"".join(orjson.dumps(r) + b"\n" for r in b["_results"])
        return web.Response(body=data, content_type="application/binary")

    # ---- running a batch ---------------------------------------------------------------
    def _finish(self, b: dict[str, Any], request: web.Request) -> None:
        reqs = b["_requests"]
        canceled = b["processing_status"] == "canceling"
        keep = len(reqs) - int(len(reqs) * b["_expire"])
        out: list[dict[str, Any]] = []
        for n, r in enumerate(reqs):
            cid = r["custom_id"]
            problem = check_params(r.get("params"))
            if canceled:
                result: dict[str, Any] = {"type": "canceled"}
            elif n >= keep:
                result = {"type": "expired"}
            elif problem or cid in self.error_once or cid in self.error_always:
                self.error_once.discard(cid)
                err = {"type": "invalid_request_error", "message": problem or "injected failure"}
                result = {"type": "errored", "error": {"type": "error", "error": err}}
            else:
                result = {"type": "succeeded",
                          "message": self.message(r["params"], f"{b['id']}_{n}")}
            out.append({"custom_id": cid, "result": result})
        self.rng.shuffle(out)
        self.result_orders.append([x["custom_id"] for x in out])
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for x in out:
            counts[x["result"]["type"]] += 1
        base = f"{request.scheme}://{request.host}"
        b.update(processing_status="ended", ended_at=_now(), request_counts=counts,
                 results_url=f"{base}/v1/messages/batches/{b['id']}/results", _results=out)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.auth], client_max_size=300 * 2**20)
        app.add_routes([
            web.post("/v1/messages", self.messages),
            web.post("/v1/messages/batches", self.create),
            web.get("/v1/messages/batches", self.list_batches),
            web.get("/v1/messages/batches/{batch_id}", self.retrieve),
            web.get("/v1/messages/batches/{batch_id}/results", self.results),
            web.post("/v1/messages/batches/{batch_id}/cancel", self.cancel),
        ])
        return app


def _public(b: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in b.items() if not k.startswith("_")}


@contextmanager
def serve(api: AnthropicAPI) -> Iterator[str]:
    """Run the API on 127.0.0.1 in a thread; yield its root URL (the SDK adds ``/v1/...``)."""
    with batch_api.serve(api) as url:  # type: ignore[arg-type]
        yield url.removesuffix("/v1")
