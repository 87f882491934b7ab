"""A tiny OpenAI-compatible chat server on loopback whose answers a test scripts per request.

``ChatServer.rule(body) -> Reply`` decides, for each ``POST /v1/chat/completions``, the HTTP
status and how long to wait before answering: a test makes some requests hang, others fail
with 401 or 500, the rest answer at once. Answers are deterministic: a short text for a
generation request, and for a judge request (``<text N>`` lines, the UltraFeedback layout) a
``Rating:`` per text, so a run through it ends with real pairs.

Every request body is counted by its SHA-256 (``seen``) and every answer sent is logged in
order (``answered``); a rerun of a run sends byte-identical bodies for the same requests, so
``seen`` tells exactly which requests were asked again. It runs aiohttp in a background
thread with its own loop, so a test can drive a ``prefsynth`` subprocess against it.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

_TEXT = re.compile(r"<text (\d+)>")


@dataclass(frozen=True)
class Reply:
    status: int = 200
    delay: float = 0.0


def digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def last_user_text(body: dict[str, Any]) -> str:
    return str(body["messages"][-1].get("content") or "")


def completion(body: dict[str, Any]) -> dict[str, Any]:
    prompt = last_user_text(body)
    texts = sorted({int(n) for n in _TEXT.findall(prompt)})
    if texts:  # a judge request: rate each text by a hash of the prompt and its number
        text = "\n\n".join(
            f"#### Output for Text {n}\nRating: {1 + int(digest(f'{n}{prompt}'.encode())[:4], 16) % 5}"
            f"\nRationale: text {n} reviewed." for n in texts)
    else:
        text = f"An answer ({digest(prompt.encode())[:8]}) from {body.get('model')}."
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 1700000000,
            "model": body.get("model"),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(prompt) // 4, "completion_tokens": len(text) // 4}}


class ChatServer:
    """``start()`` returns the base URL (``http://127.0.0.1:PORT/v1``); ``stop()`` ends it."""

    def __init__(self, rule: Callable[[dict[str, Any]], Reply] | None = None) -> None:
        self.rule: Callable[[dict[str, Any]], Reply] = rule or (lambda body: Reply())
        self.seen: Counter[str] = Counter()  # body digest -> requests received
        self.answered: list[str] = []  # body digests of 200 answers, in the order sent
        self.statuses: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def count_answered(self) -> int:
        with self._lock:
            return len(self.answered)

    async def _chat(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = await request.json()
        key = digest(raw)
        with self._lock:
            self.seen[key] += 1
        reply = self.rule(body)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        with self._lock:
            self.statuses[reply.status] += 1
            if reply.status == 200:
                self.answered.append(key)
        if reply.status != 200:
            message = {401: "Incorrect API key provided", 403: "Project has no access"}.get(
                reply.status, "The server had an error")
            return web.json_response({"error": {"message": message}}, status=reply.status)
        return web.json_response(completion(body))

    async def _open(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    @staticmethod
    async def _cancel_rest() -> None:
        """End the handlers still sleeping out a ``delay`` (their client is gone)."""
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in rest:
            t.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def start(self) -> str:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chat-server",
                                        daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=10)
        return self.base_url

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        asyncio.run_coroutine_threadsafe(self._cancel_rest(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> ChatServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
