"""An OpenAI-compatible chat server on loopback that counts what reaches it, for executor tests.

Every ``POST /v1/chat/completions`` is recorded (arrival time, a digest of its body) and
answered after ``delay`` seconds with a text derived from the body, so answers are distinct and
repeatable. ``reject`` makes the next N requests a 429 with ``Retry-After``. It runs in a
background thread of the test process (aiohttp), so Ray workers in other processes reach it.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections import Counter
from typing import Any

import orjson
from aiohttp import web


class CountingServer:
    """``start()`` returns ``http://127.0.0.1:PORT/v1``; ``arrivals`` and ``by_body`` count."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.reject = 0  # the next N requests get a 429
        self.retry_after = "1"
        self.arrivals: list[float] = []  # time.monotonic() of each POST, answered or not
        self.rejected: list[float] = []
        self.by_body: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def reset(self) -> None:
        with self._lock:
            self.arrivals.clear()
            self.rejected.clear()
            self.by_body.clear()
            self.reject = 0

    async def _chat(self, request: web.Request) -> web.Response:
        body = await request.read()
        digest = hashlib.sha256(body).hexdigest()[:16]
        with self._lock:
            now = time.monotonic()
            if self.reject > 0:
                self.reject -= 1
                self.rejected.append(now)
                return web.json_response({"error": {"message": "slow down"}}, status=429,
                                         headers={"Retry-After": self.retry_after})
            self.arrivals.append(now)
            self.by_body[digest] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        payload: dict[str, Any] = orjson.loads(body)
        text = f"answer {digest} to {len(payload['messages'])} message(s)"
        return web.json_response({
            "id": "chatcmpl-test", "object": "chat.completion", "model": payload["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16},
        })

    async def _open(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def start(self) -> str:
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="counting-server",
                         daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._open(), self._loop).result(timeout=10)
        return self.base_url

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop = None
