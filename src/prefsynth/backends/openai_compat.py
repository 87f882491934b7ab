"""The ``openai`` backend: any OpenAI-compatible chat-completions server.

OpenAI itself, vLLM ``serve``, SGLang, TGI, Together, llama.cpp's server... all speak
``POST /v1/chat/completions``. The official ``openai`` SDK is the source of truth for the client
configuration (base URL, ``OPENAI_BASE_URL``, key, default headers, organization/project); the
policy around each request is ours, because at millions of requests it matters:

* **Client CPU is kept small.** By default (``options.transport: aiohttp``) the request is
  POSTed through an ``aiohttp.ClientSession`` owned by the backend, with the URL and the
  headers taken from the SDK's client once (``openai_http.AiohttpSender``), the body encoded by
  orjson and the answer parsed by orjson: measured on a loopback server that answers at once,
  ~0.12 ms of client CPU per request against ~0.45 ms through the SDK's ``client.post`` and
  ~1.5 ms for ``client.chat.completions.create`` on httpx (``bench/overhead.py``).
  ``options.transport: sdk`` sends through ``client.post`` instead (the SDK's aiohttp
  transport when installed, httpx otherwise); it is also the default when aiohttp is missing.
  Nothing is logged per request above DEBUG.
* **Retries are ours** (the SDK runs with ``max_retries=0``): exponential backoff with full
  jitter on 408/409/429/5xx, timeouts, dropped connections and malformed or truncated bodies,
  honouring ``Retry-After`` / ``retry-after-ms``; other 4xx fail at once. A request that runs
  out of retries comes back as ``ChatResult(error="<reason>: <detail>")``, never as an
  exception, and ``attempts`` counts its HTTP attempts. A 401 or 403 is the exception: no
  request can succeed, so it raises ``BackendError`` and the run stops. One retry loop serves both transports.
* **Rate limits are smoothed, not burst**: ``requests_per_minute`` and ``tokens_per_minute``
  space sends evenly (a virtual-clock token bucket with no burst allowance).
* **The key never leaks**: error texts name the environment variable, never its value, and are
  scrubbed of the key and of any ``Authorization``/``Bearer`` text a server might echo.
* **A dead key stops the run**: HTTP 401/403 raise ``BackendError`` (every other request
  would get the same answer); other failures stay with their request.

Structured output: ``ChatRequest.response_format`` is sent as OpenAI's ``json_schema`` type.
llama.cpp's Python server (llama-cpp-python 0.3.x) rejects that type (HTTP 500, a validation
error) and wants ``{"type": "json_object", "schema": ...}`` instead. With the default
``options.response_format_style: auto`` the first such rejection switches the backend to
that form for good and the request is sent again at once; ``json_schema`` or
``json_object`` fix the form. A validation error is never retried.

Options (``OpenAIOptions``, none of them part of a request key): ``transport``,
``response_format_style``, ``max_response_bytes`` (1 MB: a longer body fails its request),
``tokenizer`` (for ``prefsynth estimate`` only).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import Field

from prefsynth.backends import openai_http
from prefsynth.backends.base import (
    BackendOptions,
    BaseBackend,
    ResultSink,
    SendGate,
    parse_options,
)
from prefsynth.backends.openai_common import api_key, chat_body
from prefsynth.backends.openai_http import (
    AiohttpSender,
    Failure,
    Outcome,
    SdkSender,
    retry_after_seconds,
)
from prefsynth.errors import BackendError, MissingExtraError
from prefsynth.records import ChatRequest, ChatResult

if TYPE_CHECKING:
    from prefsynth.config import ModelSpec
    from prefsynth.core.store import Store

try:
    import openai
    from openai import _base_client as _sdk_base
except ImportError:  # pragma: no cover - exercised only without the extra
    openai = None  # type: ignore[assignment]
    _sdk_base = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: a server asking for a longer pause than this is treated as a hard limit (e.g. a daily quota)
MAX_RETRY_AFTER = 120.0
#: failures that no request of this backend can get past: raised, not recorded
FATAL_REASONS = frozenset({"unauthorized", "forbidden"})
#: credentials a server might echo back: ``Authorization: Bearer ...``, ``api_key=...``
_SECRET_RE = re.compile(
    r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:bearer\s+|basic\s+)?|bearer\s+"
    r"|api[-_]?key[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"
)


class OpenAIOptions(BackendOptions):
    """``openai`` options: how requests travel, none of it changes an answer (so ``openai``
    and ``openai-batch`` keep sharing keys)."""

    #: ``aiohttp`` (default when installed) or ``sdk``: see the module docstring
    transport: Literal["aiohttp", "sdk"] | None = None
    #: how ``response_format`` is sent: ``auto`` starts with ``json_schema`` and switches to
    #: ``json_object`` + ``schema`` when the server rejects it (llama-cpp-python's server)
    response_format_style: Literal["auto", "json_schema", "json_object"] = "auto"
    #: a response body longer than this fails its request (``response_too_large``)
    max_response_bytes: int = Field(1_000_000, ge=1024)
    #: the tokenizer ``prefsynth estimate`` counts with (a Hub id or a folder), when the
    #: served model's name is not one
    tokenizer: str | None = None


class Pacer:
    """Spaces sends so that at most ``per_minute`` units go out per minute, without bursts.

    A virtual clock (GCRA with zero burst tolerance): each send reserves the time its cost
    buys, starting where the previous reservation ended (or now, when that is past), and waits
    until its reserved start. After an idle spell the first send goes at once; a queue drains at
    exactly the configured rate. O(1) and lock-free (one event loop).
    """

    def __init__(self, per_minute: float) -> None:
        self.per_second = per_minute / 60.0
        self._next = 0.0

    def reserve(self, cost: float = 1.0) -> float:
        """Reserve ``cost`` units; returns the seconds to wait before sending."""
        now = time.monotonic()
        start = self._next if self._next > now else now
        self._next = start + cost / self.per_second
        return start - now


def estimate_tokens(req: ChatRequest, default_max_tokens: int) -> int:
    """Tokens a request may use, for ``tokens_per_minute``: prompt characters / 4 (the usual
    rule of thumb for English with BPE tokenizers; no tokenizer call on the hot path) plus 4 per
    message for the chat template, plus the completion budget (``max_tokens``), which is what
    providers count against the limit up front."""
    chars = 0
    for m in req.messages:
        content = m.get("content")
        chars += len(content) if isinstance(content, str) else 0
    max_tokens = req.params.get("max_tokens") or default_max_tokens
    return chars // 4 + 4 * len(req.messages) + int(max_tokens)


def _sdk_httpx() -> Any:
    """The HTTP library the SDK is built on: ``httpx2`` (openai 3.x) or ``httpx`` (1.x/2.x).
    Its ``Response`` is the ``cast_to`` that makes the SDK hand back the raw response."""
    for name in ("httpx2", "httpx"):
        module = getattr(_sdk_base, name, None)
        if module is not None:
            return module
    raise MissingExtraError("the openai backend (an openai SDK built on httpx)", "openai")


def _unsent_http_client(httpx: Any) -> Any:
    """For ``transport: aiohttp``, where the SDK client only supplies the URL and headers: an
    HTTP client whose transport refuses to send, so it builds no connection pool, no proxy
    mounts and no TLS context (the SDK's default loads the certificate store once per client,
    20-120 ms each, for a context the aiohttp session never uses)."""

    class NoSend(httpx.AsyncBaseTransport):  # type: ignore[name-defined,misc]
        async def handle_async_request(self, request: Any) -> Any:
            raise RuntimeError("transport: aiohttp sends every request, never the SDK client")

    return httpx.AsyncClient(transport=NoSend(), trust_env=False)


class OpenAIBackend(BaseBackend):
    """An OpenAI-compatible HTTP endpoint, one ``AsyncOpenAI`` client per backend.

    Concurrency lives here, not in the executor: one ``asyncio.Semaphore`` of
    ``spec.max_concurrency`` bounds the HTTP requests in flight across *all* ``complete``
    calls, and the slot is released while a request sleeps before a retry. The executor-level
    knobs only keep that semaphore fed: ``batch_size`` is ``2 x max_concurrency`` (16..256), and
    ``max_concurrency`` admits about 4x ``spec.max_concurrency`` requests at once (at least 4
    batches), so that a batch held back by one straggler (a request sleeping out a
    ``Retry-After``) never leaves HTTP slots idle. The price is that up to that many requests
    are in memory; each answer is handed to the executor as it arrives (``on_result``), so a
    crash re-asks only the requests still in flight.

    One backend serves one event loop (the HTTP session binds to the loop that first uses it).
    """

    name = "openai"
    Options = OpenAIOptions
    endpoint_fields = frozenset({
        "base_url", "api_key_env", "max_concurrency", "requests_per_minute",
        "tokens_per_minute", "timeout", "max_retries",
    })
    shares_limits = True
    #: full-jitter backoff: attempt n sleeps uniform(0, min(max_delay, base_delay * 2**(n-1)))
    base_delay: float = 0.5
    max_delay: float = 30.0

    def __init__(self, spec: ModelSpec, store: Store | None = None) -> None:
        opts = parse_options(OpenAIOptions, spec)
        if openai is None:
            raise MissingExtraError("the openai backend", "openai")
        default = "aiohttp" if openai_http.aiohttp is not None else "sdk"
        transport = opts.transport or default
        if transport == "aiohttp" and openai_http.aiohttp is None:
            raise MissingExtraError(f"{spec.where}.options.transport: aiohttp", "openai")
        self.spec = spec
        #: the form ``response_format`` is sent in now; ``auto`` may switch it once
        self._auto = opts.response_format_style == "auto"
        self._style: str = "json_schema" if self._auto else opts.response_format_style
        self._key = api_key(spec)  # raises BackendError naming the variable when unset
        self._timeout = float(spec.timeout)
        self._max_retries = int(spec.max_retries)
        self._default_max_tokens = spec.params.max_tokens
        self.batch_size = min(256, max(16, 2 * spec.max_concurrency))
        self.max_concurrency = max(4, -(-4 * spec.max_concurrency // self.batch_size))
        self._sem = asyncio.Semaphore(spec.max_concurrency)
        self._rpm = Pacer(spec.requests_per_minute) if spec.requests_per_minute else None
        self._tpm = Pacer(spec.tokens_per_minute) if spec.tokens_per_minute else None
        self._paused_until = 0.0  # a 429's Retry-After pauses every send, not just its own
        self._refused: str | None = None  # set by a 401/403: why every later send fails
        #: the rate budget shared with this model's other copies (Ray workers), if any
        self._gate: SendGate | None = None
        httpx = _sdk_httpx()
        #: ``aiohttp`` (our own session) or ``sdk`` (``client.post``); see the module docstring
        self.transport: str = transport
        #: the SDK's HTTP client under ``transport: sdk`` (``aiohttp`` or ``httpx``), else None
        self.sdk_http: str | None = None
        self._client = openai.AsyncOpenAI(
            base_url=spec.base_url,
            api_key=self._key,
            max_retries=0,
            timeout=self._timeout,
            http_client=(self._sdk_http_client(httpx) if transport == "sdk"
                         else _unsent_http_client(httpx)),
        )
        self._sender: AiohttpSender | SdkSender
        if transport == "aiohttp":
            self._sender = AiohttpSender(self._client, spec, spec.max_concurrency, httpx,
                                         opts.max_response_bytes)
        else:
            self._sender = SdkSender(self._client, spec, openai, httpx, opts.max_response_bytes)
        self._send = self._sender.send

    def _sdk_http_client(self, httpx: Any) -> Any:
        """For ``transport: sdk``: the SDK's aiohttp transport when installed (half the client
        CPU of httpx), else its httpx client; the pool holds at least one connection per slot."""
        connections = self.spec.max_concurrency + 4
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        factory = getattr(openai, "DefaultAioHttpClient", None)
        if factory is not None:
            try:
                client = factory(limits=limits, timeout=self._timeout)
                self.sdk_http = "aiohttp"
                return client
            except RuntimeError:  # the SDK's stand-in when aiohttp is not installed
                pass
        self.sdk_http = "httpx"
        return openai.DefaultAsyncHttpxClient(limits=limits, timeout=self._timeout)

    # ----------------------------------------------------------------------------- public API

    async def complete(self, requests: Sequence[ChatRequest],
                       on_result: ResultSink | None = None) -> list[ChatResult]:
        """One result per request, in order, each also handed to ``on_result`` as it arrives
        (a chunk lasts as long as its slowest request). Never raises for a single request's
        failure; a 401/403 means no request can succeed and raises ``BackendError``, after
        cancelling the chunk's other requests."""
        if not requests:
            return []
        if len(requests) == 1:
            return [await self._deliver(requests[0], on_result)]
        tasks = [asyncio.ensure_future(self._deliver(r, on_result)) for r in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            raise

    def share_limits(self, gate: SendGate) -> None:
        """Pace sends through ``gate`` (one budget for every copy of this model) instead of
        this copy's own ``requests_per_minute`` / ``tokens_per_minute``; a 429 is reported to it."""
        self._gate = gate
        self._rpm = self._tpm = None

    async def aclose(self) -> None:
        try:
            await self._sender.aclose()
        finally:
            await self._client.close()

    # ------------------------------------------------------------------------------ internals

    def body(self, req: ChatRequest) -> dict[str, Any]:
        """The request body, with structured output in the style this server understands."""
        body = chat_body(req)
        if self._style == "json_object" and req.response_format is not None:
            body["response_format"] = {
                "type": "json_object",
                "schema": req.response_format["schema"],
            }
        return body

    async def _deliver(self, req: ChatRequest, on_result: ResultSink | None) -> ChatResult:
        res = await self._one(req)
        if on_result is not None:
            on_result(res)
        return res

    async def _one(self, req: ChatRequest) -> ChatResult:
        """The retry loop, for either transport: ``self._send`` makes one HTTP attempt.
        Raises ``BackendError`` only for a rejected key (401/403)."""
        style = self._style
        try:
            content = orjson.dumps(self.body(req))
        except (TypeError, KeyError) as e:  # orjson.JSONEncodeError is a TypeError
            return ChatResult(req.key, error=f"bad_request: cannot encode request: {e}", attempts=0)
        cost = estimate_tokens(req, self._default_max_tokens) if self.spec.tokens_per_minute else 0
        attempt = 0
        while True:
            attempt += 1
            async with self._sem:
                if self._gate is not None:
                    await self._gate.acquire(cost)
                elif self._paused_until or self._rpm is not None or self._tpm is not None:
                    await self._pace(cost)
                if self._refused is not None:  # a 401/403 came back: send nothing more
                    raise BackendError(self._refused)
                outcome: Outcome = await self._send(req.key, content)
            if isinstance(outcome, ChatResult):
                outcome.attempts = attempt
                return outcome
            if outcome.reason in FATAL_REASONS:  # no later request can succeed: send no more
                self._refused = self.redact(f"{self.spec.where}: {outcome.detail}")
                raise BackendError(self._refused)
            if (outcome.format_rejected and req.response_format is not None
                    and self._adapt_style(style)):
                style = self._style  # the server's form: send again at once
                content = orjson.dumps(self.body(req))
                continue
            delay = self._next_delay(outcome, attempt)
            if delay is None:
                return ChatResult(
                    req.key, error=self._error_text(outcome, attempt), attempts=attempt
                )
            if log.isEnabledFor(logging.DEBUG):
                log.debug(
                    "%s: %s; retry %d in %.2fs", self.spec.name, outcome.reason, attempt, delay
                )
            await asyncio.sleep(delay)

    def _adapt_style(self, sent: str) -> bool:
        """After the server rejected ``json_schema``: with ``auto``, switch this backend to
        ``json_object`` + ``schema`` (once; requests already in flight follow) and say whether
        the request should go again in the new form."""
        if not self._auto or sent != "json_schema":
            return False
        if self._style != "json_object":
            self._style = "json_object"
            log.warning("%s: the server rejects response_format json_schema; sending "
                        "json_object with the schema from now on", self.spec.name)
        return True

    async def _pace(self, cost: int) -> None:
        """Wait for the rate limits (reservations are made while holding a slot, so a backlog
        never turns into a burst when slots free up)."""
        wait = self._paused_until - time.monotonic()
        if self._rpm is not None:
            wait = max(wait, self._rpm.reserve(1.0))
        if self._tpm is not None:
            wait = max(wait, self._tpm.reserve(float(cost)))
        if wait > 0:
            await asyncio.sleep(wait)

    def _next_delay(self, failure: Failure, attempt: int) -> float | None:
        """Seconds to sleep before the next attempt, or ``None`` to give up."""
        if not failure.retryable or attempt > self._max_retries:
            return None
        ra = failure.retry_after
        if ra is None:
            delay = random.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
            if failure.reason == "rate_limited" and self._gate is not None:
                self._gate.cooldown(delay)
            return delay
        if ra > MAX_RETRY_AFTER:
            return None
        if failure.reason == "rate_limited":
            self._paused_until = max(self._paused_until, time.monotonic() + ra)
            if self._gate is not None:
                self._gate.cooldown(ra)
        # a little jitter on top (never below what the server asked) so retries do not align
        return ra + random.uniform(0.0, min(1.0, 0.1 * ra))

    def _error_text(self, failure: Failure, attempts: int) -> str:
        detail = failure.detail
        if failure.retryable:
            if failure.retry_after is not None and failure.retry_after > MAX_RETRY_AFTER:
                detail += (
                    f" (Retry-After {failure.retry_after:.0f}s exceeds {MAX_RETRY_AFTER:.0f}s)"
                )
            else:
                detail += f" (gave up after {attempts} attempt{'s' if attempts > 1 else ''})"
        return self.redact(f"{failure.reason}: {detail}")

    def redact(self, text: str) -> str:
        """``text`` without the API key or anything that looks like a credential."""
        if len(self._key) >= 4 and self._key != "EMPTY":
            text = text.replace(self._key, "[redacted]")
        return _SECRET_RE.sub(r"\1[redacted]", text)


__all__ = ["OpenAIBackend", "Pacer", "estimate_tokens", "retry_after_seconds"]
