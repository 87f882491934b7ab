"""The ``anthropic`` backend: Claude models through the live Messages API (``POST /v1/messages``).

The same guarantees as the ``openai`` backend, with the same parts where they fit:

* **The SDK configures, our session sends.** ``anthropic.AsyncAnthropic`` resolves the base
  URL (``base_url``, else ``ANTHROPIC_BASE_URL``), the key and its headers (``anthropic-version``,
  ``ANTHROPIC_CUSTOM_HEADERS``...); by default (``options.transport: aiohttp``) the request is
  POSTed through the ``openai`` backend's ``AiohttpSender`` (one ``aiohttp.ClientSession``,
  headers built once from the SDK's client, orjson both ways), pointed at ``/v1/messages``.
  ``transport: sdk`` sends through the SDK's ``client.post`` instead.
* **Retries are ours** (the SDK runs with ``max_retries=0``): full-jitter exponential backoff on
  408/409/429/5xx and Anthropic's 529 ``overloaded_error``, timeouts, dropped connections and
  malformed bodies, honouring ``retry-after``; a 429 or 529 that names a pause pauses every send.
  Other 4xx fail at once. A request out of retries comes back with ``error="<reason>: ..."``.
* **Anthropic's limits are separate buckets**: ``requests_per_minute``, and
  ``options.input_tokens_per_minute`` / ``options.output_tokens_per_minute`` (ITPM / OTPM) as
  Anthropic counts them: input tokens estimated up front (characters / 4), output tokens
  reserved at ``max_tokens`` and the unused part given back when the answer says how many were
  used. ``tokens_per_minute`` is a combined bucket (input + ``max_tokens``), as for ``openai``.
* **The key never leaks**: it comes from ``api_key_env`` (default ``ANTHROPIC_API_KEY``), is
  never stored, and error texts are scrubbed of it.

Options: ``transport`` (``aiohttp`` | ``sdk``), ``input_tokens_per_minute``,
``output_tokens_per_minute``. Unknown options are a ``ConfigError``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from prefsynth.backends import openai_http
from prefsynth.backends.anthropic_common import (
    DEFAULT_KEY_ENV,
    api_key,
    check_spec,
    message_body,
    parse_message,
    parse_options,
    redact,
)
from prefsynth.backends.base import BaseBackend
from prefsynth.backends.openai_http import (
    AiohttpSender,
    Failure,
    Outcome,
    SdkSender,
    status_failure,
    timed_out,
)
from prefsynth.errors import MissingExtraError
from prefsynth.records import ChatRequest, ChatResult

if TYPE_CHECKING:
    from prefsynth.config import ModelSpec
    from prefsynth.core.store import Store

log = logging.getLogger(__name__)

#: a server asking for a longer pause than this is treated as a hard limit (a spend cap)
MAX_RETRY_AFTER = 120.0
PATH = "/v1/messages"


class LiveOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    transport: Literal["aiohttp", "sdk"] | None = None  # None: aiohttp when installed
    input_tokens_per_minute: float | None = Field(None, gt=0)
    output_tokens_per_minute: float | None = Field(None, gt=0)


class Bucket:
    """Spaces sends so at most ``per_minute`` units go out per minute, without bursts.

    The ``openai`` backend's ``Pacer`` (a virtual clock: each send reserves the time its cost
    buys, after the previous reservation) plus ``adjust``: a reservation made on an estimate is
    corrected once the real count is known, as Anthropic corrects its OTPM count from
    ``max_tokens`` to the tokens used. A refund never moves the clock before now, so unused
    capacity is never banked into a burst.
    """

    def __init__(self, per_minute: float) -> None:
        self.per_second = per_minute / 60.0
        self._next = 0.0

    def reserve(self, cost: float) -> float:
        """Reserve ``cost`` units; returns the seconds to wait before sending."""
        now = time.monotonic()
        start = self._next if self._next > now else now
        self._next = start + cost / self.per_second
        return start - now

    def adjust(self, delta: float) -> None:
        """Charge ``delta`` more units (a negative ``delta`` gives units back)."""
        now = time.monotonic()
        self._next = max(now, self._next + delta / self.per_second)


def input_estimate(req: ChatRequest) -> int:
    """Input tokens for ITPM before the answer says: characters / 4 plus a few per turn (no
    tokenizer on the hot path; Anthropic has none offline)."""
    chars = sum(len(m["content"]) for m in req.messages if isinstance(m.get("content"), str))
    return chars // 4 + 4 * len(req.messages)


def _sdk_httpx(sdk: Any) -> Any:
    """The HTTP library the SDK is built on (``httpx2`` or ``httpx``): its ``Response`` makes
    ``client.post`` hand back the raw response; its SSL context is the sender's trust store."""
    base = sdk._base_client
    for name in ("httpx2", "httpx"):
        module = getattr(base, name, None)
        if module is not None:
            return module
    raise MissingExtraError("the anthropic backend (an anthropic SDK built on httpx)", "anthropic")


class MessagesAiohttpSender(AiohttpSender):
    """``AiohttpSender`` posting to ``{base_url}/v1/messages`` and reading Messages answers."""

    def __init__(self, client: Any, spec: ModelSpec, connections: int, httpx: Any) -> None:
        super().__init__(client, spec, connections, httpx)
        self.url = openai_http.URL(str(client.base_url).rstrip("/") + PATH)

    async def send(self, key: str, content: bytes) -> Outcome:
        session = self._session
        if session is None:
            session = self._open()
        aio = openai_http.aiohttp
        try:
            async with session.post(self.url, data=content) as resp:
                raw = await resp.read()
                status = resp.status
                if not 200 <= status < 300:
                    return _failure(status, resp.headers, raw, self._spec)
        except TimeoutError:
            return timed_out(self.timeout)
        except aio.ClientPayloadError as e:
            return Failure("truncated_response", _described(e), True)
        except (aio.ClientError, OSError) as e:
            return Failure("connection_error", _described(e), True)
        except Exception as e:  # a bug or a library surprise: record it, do not kill the batch
            return Failure("unexpected_error", _described(e), False)
        return parse_message(key, raw)


class MessagesSdkSender(SdkSender):
    """``client.post("/v1/messages")`` on the anthropic SDK, the raw answer parsed by orjson."""

    async def send(self, key: str, content: bytes) -> Outcome:
        sdk = self._sdk
        try:
            async with asyncio.timeout(self.timeout):
                resp = await self._client.post(PATH, content=content,
                                               cast_to=self._response_cls)
            raw = resp.content
        except sdk.APIStatusError as e:
            return _failure(e.status_code, e.response.headers, e.body, self._spec)
        except TimeoutError:
            return timed_out(self.timeout)
        except sdk.APIConnectionError as e:
            return self._transport_failure(e)
        except (OSError, sdk.APIError) as e:
            return Failure("connection_error", _described(e), True)
        except Exception as e:
            return Failure("unexpected_error", _described(e), False)
        return parse_message(key, raw)


def _described(e: BaseException) -> str:
    return openai_http.short(f"{type(e).__name__}: {e}")


def _failure(status: int, headers: Any, body: object, spec: ModelSpec) -> Failure:
    """``openai_http.status_failure`` (retry 408/409/429/5xx, ``retry-after``), with a 401
    naming the variable the key came from and Anthropic's 529 called what it is."""
    if isinstance(body, bytes):
        raw = body
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = raw.decode("utf-8", "replace")
    if status == 401:
        env = spec.api_key_env or DEFAULT_KEY_ENV
        why = openai_http.short(openai_http.server_message(body))
        return Failure("unauthorized", f"HTTP 401: the key in ${env} was rejected ({why})", False)
    failure = status_failure(status, headers, body, spec)
    return failure._replace(reason="overloaded") if status == 529 else failure


class AnthropicBackend(BaseBackend):
    """Claude through the Messages API, one ``AsyncAnthropic`` client per backend.

    Concurrency, chunking and memory work as in ``OpenAIBackend``: one semaphore of
    ``spec.max_concurrency`` over every request in flight, released while a request sleeps
    before a retry; ``batch_size`` and ``max_concurrency`` keep it fed. One backend serves one
    event loop.
    """

    name = "anthropic"
    key_family: ClassVar[str | None] = "anthropic"
    reproducible: ClassVar[bool] = False  # no seed parameter: answers cannot be replayed
    #: full-jitter backoff: attempt n sleeps uniform(0, min(max_delay, base_delay * 2**(n-1)))
    base_delay: float = 0.5
    max_delay: float = 30.0

    def __init__(self, spec: ModelSpec, store: Store | None = None) -> None:
        try:
            import anthropic
        except ImportError:
            raise MissingExtraError("the anthropic backend", "anthropic") from None
        opts = parse_options(spec, LiveOptions)
        check_spec(spec)
        transport = opts.transport or ("aiohttp" if openai_http.aiohttp is not None else "sdk")
        if transport == "aiohttp" and openai_http.aiohttp is None:
            raise MissingExtraError(f"models.{spec.name}.options.transport: aiohttp", "anthropic")
        self.spec = spec
        self.transport: str = transport
        self._key = api_key(spec)  # BackendError naming the variable when unset
        self._timeout = float(spec.timeout)
        self._max_retries = int(spec.max_retries)
        self.batch_size = min(256, max(16, 2 * spec.max_concurrency))
        self.max_concurrency = max(4, -(-4 * spec.max_concurrency // self.batch_size))
        self._sem = asyncio.Semaphore(spec.max_concurrency)
        self._rpm = Bucket(spec.requests_per_minute) if spec.requests_per_minute else None
        self._tpm = Bucket(spec.tokens_per_minute) if spec.tokens_per_minute else None
        itpm, otpm = opts.input_tokens_per_minute, opts.output_tokens_per_minute
        self._itpm = Bucket(itpm) if itpm else None
        self._otpm = Bucket(otpm) if otpm else None
        self._paced = any(b is not None for b in (self._rpm, self._tpm, self._itpm, self._otpm))
        self._paused_until = 0.0  # a 429/529 retry-after pauses every send, not just its own
        httpx = _sdk_httpx(anthropic)
        self._client = anthropic.AsyncAnthropic(api_key=self._key, base_url=spec.base_url,
                                                max_retries=0, timeout=self._timeout)
        self._sender: MessagesAiohttpSender | MessagesSdkSender
        if transport == "aiohttp":
            self._sender = MessagesAiohttpSender(self._client, spec, spec.max_concurrency, httpx)
        else:
            self._sender = MessagesSdkSender(self._client, spec, anthropic, httpx)

    # ----------------------------------------------------------------------------- public API

    async def complete(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """One result per request, in order. Never raises for a single request's failure."""
        if not requests:
            return []
        if len(requests) == 1:
            return [await self._one(requests[0])]
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def aclose(self) -> None:
        try:
            await self._sender.aclose()
        finally:
            await self._client.close()

    # ------------------------------------------------------------------------------ internals

    async def _one(self, req: ChatRequest) -> ChatResult:
        try:
            body = message_body(req)
            content = orjson.dumps(body)
        except (TypeError, ValueError, KeyError) as e:  # orjson.JSONEncodeError: a TypeError
            return ChatResult(req.key, error=f"bad_request: cannot encode request: {e}",
                              attempts=0)
        cost = (input_estimate(req), float(body["max_tokens"])) if self._paced else (0, 0.0)
        send = self._sender.send
        attempt = 0
        while True:
            attempt += 1
            async with self._sem:
                if self._paused_until or self._paced:
                    await self._pace(*cost)
                outcome: Outcome = await send(req.key, content)
            if isinstance(outcome, ChatResult):
                outcome.attempts = attempt
                if self._paced:
                    self._settle(*cost, outcome)
                return outcome
            if self._paced:
                self._settle(*cost, None)
            delay = self._next_delay(outcome, attempt)
            if delay is None:
                return ChatResult(req.key, error=self._error_text(outcome, attempt),
                                  attempts=attempt)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: %s; retry %d in %.2fs", self.spec.name, outcome.reason, attempt,
                          delay)
            await asyncio.sleep(delay)

    async def _pace(self, tokens_in: int, max_out: float) -> None:
        """Wait for every bucket (reservations are made while holding a slot, so a backlog
        never turns into a burst when slots free up)."""
        wait = self._paused_until - time.monotonic()
        for bucket, cost in ((self._rpm, 1.0), (self._tpm, tokens_in + max_out),
                             (self._itpm, float(tokens_in)), (self._otpm, max_out)):
            if bucket is not None:
                wait = max(wait, bucket.reserve(cost))
        if wait > 0:
            await asyncio.sleep(wait)

    def _settle(self, tokens_in: int, max_out: float, result: ChatResult | None) -> None:
        """Correct the token reservations from the usage the answer reports. A failed attempt
        is charged in full: Anthropic may have counted it."""
        if result is None or not (result.usage.prompt_tokens or result.usage.completion_tokens):
            return
        used_in, used_out = result.usage.prompt_tokens, result.usage.completion_tokens
        if self._itpm is not None:
            self._itpm.adjust(used_in - tokens_in)
        if self._otpm is not None:
            self._otpm.adjust(used_out - max_out)
        if self._tpm is not None:
            self._tpm.adjust(used_in + used_out - tokens_in - max_out)

    def _next_delay(self, failure: Failure, attempt: int) -> float | None:
        """Seconds to sleep before the next attempt, or ``None`` to give up."""
        if not failure.retryable or attempt > self._max_retries:
            return None
        ra = failure.retry_after
        if ra is None:
            return random.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
        if ra > MAX_RETRY_AFTER:
            return None
        if failure.reason in ("rate_limited", "overloaded"):
            self._paused_until = max(self._paused_until, time.monotonic() + ra)
        return ra + random.uniform(0.0, min(1.0, 0.1 * ra))

    def _error_text(self, failure: Failure, attempts: int) -> str:
        detail = failure.detail
        if failure.retryable:
            if failure.retry_after is not None and failure.retry_after > MAX_RETRY_AFTER:
                detail += (f" (retry-after {failure.retry_after:.0f}s exceeds "
                           f"{MAX_RETRY_AFTER:.0f}s)")
            else:
                detail += f" (gave up after {attempts} attempt{'s' if attempts > 1 else ''})"
        return redact(f"{failure.reason}: {detail}", self._key)


__all__ = ["AnthropicBackend", "Bucket", "LiveOptions", "input_estimate"]
