"""How the ``openai`` backend reads answers: odd 200s, huge bodies, rejected keys, validation
errors and the ``response_format`` dialect, on both transports.

A small HTTP/1.1 server on loopback answers each request by the content of its last message
(real sockets, real aiohttp and SDK clients; only the answers are canned, because no real
server sends them on purpose). The real llama.cpp server's dialect is tested in
``test_openai_compat.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

pytest.importorskip("openai")

from prefsynth.backends import create_backend
from prefsynth.backends.openai_compat import OpenAIBackend
from prefsynth.backends.openai_http import (
    TooLarge,
    read_bounded,
    rejects_json_schema,
    status_failure,
)
from prefsynth.config import ModelSpec
from prefsynth.errors import BackendError
from prefsynth.records import ChatRequest, ChatResult

#: llama-cpp-python 0.3's answer to ``response_format: {"type": "json_schema", ...}`` (HTTP 500)
LLAMA_REJECTS = (
    "1 validation error:\n  {'type': 'literal_error', 'loc': ('body', 'response_format', "
    "'type'), 'msg': \"Input should be 'text' or 'json_object'\", 'input': 'json_schema', "
    "'ctx': {'expected': \"'text' or 'json_object'\"}}\n\n  File \"app.py\", line 376"
)
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def completion(content: Any = "fine", usage: Any = None) -> bytes:
    """A chat completion body (``json``, which writes 10**30 as it is; orjson refuses)."""
    return json.dumps({
        "choices": [{"message": {"role": "assistant", "content": content},
                     "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2} if usage is None else usage,
    }).encode()


class Canned:
    """Answers ``POST /v1/chat/completions`` by the last message's content (see ``reply``);
    ``sent`` counts the body bytes written per content, ``seen`` the request bodies."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.seen: list[dict[str, Any]] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Canned:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    def reply(self, body: dict[str, Any]) -> tuple[int, bytes | None]:
        """``(status, body)``; body ``None``: stream 50 MB, chunked, with no length."""
        what = body["messages"][-1]["content"]
        fmt = (body.get("response_format") or {}).get("type")
        if what == "schema":
            if fmt == "json_schema":
                return 500, orjson.dumps({"error": {"message": LLAMA_REJECTS,
                                                    "type": "internal_server_error"}})
            return 200, completion('{"a": 1}')
        canned: dict[str, Callable[[], tuple[int, bytes | None]]] = {
            "object": lambda: (200, completion({"text": "hi"})),
            "integer": lambda: (200, completion(42)),
            "huge_usage": lambda: (200, completion(usage={"prompt_tokens": 10**30,
                                                          "completion_tokens": 1})),
            "usage_str": lambda: (200, completion(usage="abc")),
            "big": lambda: (200, completion("x" * 2_000_000)),
            "3kb": lambda: (200, completion("y" * 3000)),
            "chunked": lambda: (200, None),
            "forbidden": lambda: (403, b'{"error": {"message": "Project does not have access"}}'),
            "validation": lambda: (500, b'{"detail": "1 validation error for Request: seed"}'),
        }
        return canned.get(what, lambda: (200, completion(f"answer to {what}")))()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
            length = int(head.split("content-length: ", 1)[1].split("\r\n", 1)[0])
            body = orjson.loads(await reader.readexactly(length))
            self.seen.append(body)
            status, data = self.reply(body)
            what = body["messages"][-1]["content"]
            if data is None:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n")
                chunk = b"z" * 65536
                for _ in range(800):  # 50 MB, unless the client hangs up first
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
                    self.sent[what] = self.sent.get(what, 0) + len(chunk)
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                             % (status, len(data), data))
                self.sent[what] = len(data)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()


def ask(content: str, *, schema: bool = False) -> ChatRequest:
    return ChatRequest(key=content, model="m", messages=[{"role": "user", "content": content}],
                       params={"max_tokens": 8, "seed": 1},
                       response_format={"name": "p", "schema": SCHEMA} if schema else None)


def run(transport: str, go: Callable[[OpenAIBackend, Canned], Awaitable[Any]],
        **over: Any) -> Any:
    """Run ``go(backend, server)`` against a fresh canned server; the backend is closed."""
    options = {"transport": transport, **over.pop("options", {})}

    async def main() -> Any:
        async with Canned() as server:
            spec = ModelSpec(name="canned", backend="openai", model="m", base_url=server.url,
                             timeout=20.0, max_retries=over.pop("max_retries", 0),
                             options=options, **over)
            backend = create_backend(spec)
            assert isinstance(backend, OpenAIBackend)
            backend.base_delay, backend.max_delay = 0.01, 0.05
            try:
                return await go(backend, server)
            finally:
                await backend.aclose()

    return asyncio.run(main())


@pytest.fixture(params=["aiohttp", "sdk"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def complete_all(*contents: str, **ask_kw: Any) -> Callable[[OpenAIBackend, Canned],
                                                              Awaitable[list[ChatResult]]]:
    async def go(backend: OpenAIBackend, server: Canned) -> list[ChatResult]:
        return await backend.complete([ask(c, **ask_kw) for c in contents])

    return go


# ------------------------------------------------------------------------ over the wire


def test_odd_200s_fail_alone_and_the_batch_survives(transport: str) -> None:
    """Content an object or an integer, a count of 10**30, ``usage: "abc"``: each is that
    request's ``malformed_response``; the good answers in the same batch are kept."""
    contents = ["ok-1", "object", "integer", "huge_usage", "usage_str", "ok-2"]
    results = run(transport, complete_all(*contents))
    assert [r.key for r in results] == contents
    assert results[0].ok and results[0].text == "answer to ok-1"
    assert results[-1].ok and results[-1].text == "answer to ok-2"
    for r in results[1:-1]:
        assert not r.ok and r.text is None, r
        assert r.error is not None and r.error.startswith(
            "malformed_response: malformed completion payload"), r.error


def test_a_huge_answer_fails_its_request_and_is_not_read(transport: str) -> None:
    """A 2 MB body (with a Content-Length) or 50 MB streamed without one: over the 1 MB
    default the request fails at once, and reading stops at the bound."""
    results, server = run(transport, lambda b, s: _with_server(b, s, "ok", "big", "chunked"))
    ok, big, chunked = results
    assert ok.ok
    for r in (big, chunked):
        assert r.error is not None and r.error.startswith("response_too_large: "), r.error
        assert "max_response_bytes" in r.error and r.attempts == 1
    assert server.sent["chunked"] < 20_000_000  # the client hung up long before 50 MB


async def _with_server(backend: OpenAIBackend, server: Canned,
                       *contents: str) -> tuple[list[ChatResult], Canned]:
    return await backend.complete([ask(c) for c in contents]), server


def test_max_response_bytes_option(transport: str) -> None:
    small, fine = run(transport, complete_all("3kb", "ok"),
                      options={"max_response_bytes": 2048})
    assert small.error is not None and small.error.startswith("response_too_large: ")
    assert "2048 bytes" in small.error
    assert fine.ok
    [r] = run(transport, complete_all("3kb"))  # under the default
    assert r.ok and r.text == "y" * 3000


def test_forbidden_raises_backend_error(transport: str) -> None:
    with pytest.raises(BackendError, match=r"models\.canned: HTTP 403: Project does not"):
        run(transport, complete_all("forbidden"))


def test_validation_error_is_not_retried(transport: str) -> None:
    [r] = run(transport, complete_all("validation"), max_retries=6)
    assert r.attempts == 1
    assert r.error is not None and r.error.startswith("bad_request: HTTP 500: 1 validation")


def test_auto_style_switches_to_json_object_once(transport: str) -> None:
    async def go(backend: OpenAIBackend, server: Canned) -> tuple[list[ChatResult], Canned]:
        first = await backend.complete([ask("schema", schema=True)])
        second = await backend.complete([ask("schema", schema=True)])
        return first + second, server

    (first, second), server = run(transport, go)
    assert first.ok and first.text == '{"a": 1}' and first.attempts == 2
    assert second.ok and second.attempts == 1
    formats = [b["response_format"] for b in server.seen]
    assert [f["type"] for f in formats] == ["json_schema", "json_object", "json_object"]
    assert formats[1]["schema"] == SCHEMA


def test_fixed_json_schema_style_does_not_switch(transport: str) -> None:
    [r] = run(transport, complete_all("schema", schema=True), max_retries=6,
              options={"response_format_style": "json_schema"})
    assert r.attempts == 1
    assert r.error is not None and r.error.startswith("bad_request: HTTP 500: 1 validation")


# ------------------------------------------------------------------------ pure parts


SPEC = ModelSpec(name="m", backend="openai", model="m")


def test_status_failure_classifies_validation_errors() -> None:
    body = {"error": {"message": LLAMA_REJECTS}}
    f = status_failure(500, {}, body, SPEC)
    assert (f.reason, f.retryable, f.format_rejected) == ("bad_request", False, True)
    pydantic_style = {"detail": "2 validation errors for ChatRequest\nseed: Input should be"}
    f = status_failure(500, {}, pydantic_style, SPEC)
    assert (f.reason, f.retryable, f.format_rejected) == ("bad_request", False, False)
    f = status_failure(500, {}, {"error": {"message": "CUDA out of memory"}}, SPEC)
    assert (f.reason, f.retryable) == ("server_error", True)
    # OpenAI on a bad schema: a 400 about response_format, but not about its type
    openai_400 = {"error": {"message": "Invalid schema for response_format 'p': In context=(), "
                                       "'additionalProperties' is required"}}
    f = status_failure(400, {}, openai_400, SPEC)
    assert (f.reason, f.retryable, f.format_rejected) == ("bad_request", False, False)
    assert status_failure(403, {}, "no", SPEC).reason == "forbidden"


def test_rejects_json_schema() -> None:
    assert rejects_json_schema(LLAMA_REJECTS)
    assert not rejects_json_schema("response_format json_object needs the word JSON")


def test_read_bounded() -> None:
    async def chunks(*parts: bytes) -> Any:
        for p in parts:
            yield p

    async def go() -> None:
        assert await read_bounded(chunks(b"ab", b"cd"), None, 4) == b"abcd"
        assert await read_bounded(chunks(b"abcd"), 4, 4) == b"abcd"
        assert await read_bounded(chunks(), 0, 4) == b""
        with pytest.raises(TooLarge):
            await read_bounded(chunks(b"abc", b"de"), None, 4)
        with pytest.raises(TooLarge):
            await read_bounded(chunks(), 5, 4)  # the header alone decides; nothing is read

    asyncio.run(go())
