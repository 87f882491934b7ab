"""An HTTP proxy that injects the faults real OpenAI-compatible endpoints produce.

It sits on 127.0.0.1 in front of an upstream server and, for ``POST`` requests, answers with a
fault instead of the upstream's response at a configured rate:

=============  ==================================================================
``429``        rate limited, with ``Retry-After`` (and optionally ``retry-after-ms``)
``500``        internal server error, JSON error body
``503``        service unavailable, JSON error body
``stall``      reads the request, then says nothing until the client hangs up (its
               timeout) or ``stall_s`` passes, and drops the connection
``disconnect`` reads the request and resets the connection before any response
``truncate``   forwards upstream, sends the headers and half of the body
               (``Content-Length`` promises all of it), then closes
``malformed``  forwards upstream, sends a well-framed 200 whose JSON is cut in half
``no_choices`` a well-framed 200 whose JSON has no ``choices``
``400``        bad request whose message echoes the ``Authorization`` header (to
               prove the client never repeats a key a server echoes)
``401``        unauthorized, echoing the key the way OpenAI's message does
=============  ==================================================================

Which request gets which fault is deterministic for a seed and independent of arrival order:
it is a hash of (seed, request body, how many times this body was seen), so a retry of the
same request draws again. A ``script`` of faults, applied to the next requests in arrival order
before the random draw, gives tests exact sequences. Each fault kind (and ``ok``) is counted.

Raw asyncio rather than an ASGI app, because ASGI cannot reset a connection or send fewer
bytes than ``Content-Length`` promises. It runs in a background thread with its own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import threading
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp

FAULTS: tuple[str, ...] = ("429", "500", "503", "stall", "disconnect", "truncate", "malformed")
EXTRA_FAULTS: tuple[str, ...] = ("no_choices", "400", "401")
_REASON = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 429: "Too Many Requests",
           500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip
_HOP = {
    "host",
    "content-length",
    "connection",
    "transfer-encoding",
    "accept-encoding",
    "keep-alive",
}


@dataclass
class FaultPlan:
    """What to inject. ``rate`` is the chance that a POST gets a fault drawn from ``kinds``."""

    rate: float = 0.0
    kinds: tuple[str, ...] = FAULTS
    seed: int = 0
    script: list[str] = field(default_factory=list)
    retry_after: str | None = "1"
    retry_after_ms: str | None = None
    stall_s: float = 60.0


class FaultProxy:
    """The proxy. ``start()`` returns its base URL (``http://127.0.0.1:PORT/v1``)."""

    def __init__(self, upstream: str, plan: FaultPlan | None = None) -> None:
        parts = urlsplit(upstream)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.plan = plan or FaultPlan()
        self.port = 0
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._seen: Counter[bytes] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self._conns: set[asyncio.Task[Any]] = set()
        self._in_flight = 0
        #: the most requests the proxy was answering at once since the last ``configure``
        self.peak_in_flight = 0

    # ------------------------------------------------------------------------ control (sync)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def counts(self) -> dict[str, int]:
        """How often each fault kind (and ``ok``, a forwarded answer) was served."""
        with self._lock:
            return dict(self._counts)

    def faults(self) -> int:
        """Faults served since the last ``configure``."""
        with self._lock:
            return sum(n for k, n in self._counts.items() if k != "ok")

    def configure(self, **changes: Any) -> FaultPlan:
        """Replace the plan (fields of ``FaultPlan``; unnamed ones reset to their defaults) and
        forget counts and seen requests, so every test starts from the same state."""
        with self._lock:
            self.plan = FaultPlan(**changes)
            if "kinds" in changes:
                self.plan.kinds = tuple(changes["kinds"])
            self.plan.script = list(changes.get("script", []))
            self._counts.clear()
            self._seen.clear()
            self.peak_in_flight = self._in_flight
            return self.plan

    def start(self) -> str:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fault-proxy", daemon=True
        )
        self._thread.start()
        self._call(self._open()).result(timeout=10)
        return self.base_url

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(Exception):
            self._call(self._close()).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Any) -> Future[Any]:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # ----------------------------------------------------------------------- the proxy (async)

    async def _open(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300))
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def _decide(self, method: str, body: bytes) -> str:
        if method != "POST":
            return "ok"
        with self._lock:
            plan = self.plan
            if plan.script:
                return plan.script.pop(0)
            digest = hashlib.sha256(body).digest()
            nth = self._seen[digest]
            self._seen[digest] = nth + 1
        h = hashlib.sha256(f"{plan.seed}:{nth}:".encode() + digest).digest()
        if int.from_bytes(h[:8], "big") / 2**64 >= plan.rate or not plan.kinds:
            return "ok"
        return plan.kinds[int.from_bytes(h[8:16], "big") % len(plan.kinds)]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        try:
            while await self._one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:  # stop(): end quietly (asyncio logs a cancelled handler)
            pass
        finally:
            self._conns.discard(task)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; ``False`` when the connection is to be closed."""
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length") or 0))
        kind = self._decide(method, body)
        with self._lock:
            self._counts[kind] += 1
            self._in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            return await self._reply(kind, method, target, headers, body, reader, writer)
        finally:
            with self._lock:
                self._in_flight -= 1

    async def _reply(
        self,
        kind: str,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        plan = self.plan
        keep = headers.get("connection", "").lower() != "close"

        if kind == "disconnect":
            writer.transport.abort()  # RST: the client sees the connection reset
            return False
        if kind == "stall":  # silence until the client gives up (at most stall_s), then drop
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(reader.read(1), plan.stall_s)
            writer.transport.abort()
            return False
        if kind in ("429", "500", "503", "400", "401"):
            status = int(kind)
            extra: dict[str, str] = {}
            auth = headers.get("authorization", "")
            message = {
                429: "Rate limit reached for requests",
                500: "The server had an error while processing your request",
                503: "The engine is currently overloaded, please try again later",
                400: f"Invalid request: unsupported parameter (request headers: Authorization: {auth})",
                401: f"Incorrect API key provided: {auth.removeprefix('Bearer ')}",
            }[status]
            if status == 429:
                if plan.retry_after is not None:
                    extra["retry-after"] = plan.retry_after
                if plan.retry_after_ms is not None:
                    extra["retry-after-ms"] = plan.retry_after_ms
            payload = json.dumps({"error": {"message": message, "type": "fault_proxy"}}).encode()
            await self._send(writer, status, payload, extra, keep=keep)
            return keep
        if kind == "no_choices":
            await self._send(
                writer, 200, b'{"object": "chat.completion", "choices": []}', keep=keep
            )
            return keep

        status, ctype, data = await self._forward(method, target, headers, body)
        if kind == "truncate":
            await self._send(writer, status, data[: len(data) // 2], length=len(data), keep=False)
            writer.transport.abort()
            return False
        if kind == "malformed":
            data = data[: len(data) // 2]
        await self._send(writer, status, data, {"content-type": ctype}, keep=keep)
        return keep

    async def _forward(
        self, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, str, bytes]:
        assert self._session is not None
        fwd = {k: v for k, v in headers.items() if k not in _HOP}
        async with self._session.request(
            method, self.origin + target, data=body or None, headers=fwd
        ) as r:
            data = await r.read()
            return r.status, r.headers.get("content-type", "application/json"), data

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        headers: dict[str, str] | None = None,
        *,
        length: int | None = None,
        keep: bool = True,
    ) -> None:
        hdrs = {"content-type": "application/json", **(headers or {})}
        hdrs["content-length"] = str(len(body) if length is None else length)
        hdrs["connection"] = "keep-alive" if keep else "close"
        head = f"HTTP/1.1 {status} {_REASON.get(status, 'Status')}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in hdrs.items()) + "\r\n"
        writer.write(head.encode("latin-1") + body)
        await writer.drain()
