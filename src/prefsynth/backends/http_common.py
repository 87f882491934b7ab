"""What the live HTTP backends (``openai``, ``anthropic``) share: the retry loop, the pacing, the
scrubbing of credentials from error texts.

``HttpBackend`` holds the policy around each request; a subclass says how a request becomes
bytes (``encode``) and gives it a sender (``openai_http``) that makes one HTTP attempt:

* **One semaphore** of ``spec.max_concurrency`` bounds the requests in flight across every
  ``complete`` call; a request gives its slot back while it sleeps before a retry.
  ``batch_size`` (2 x ``max_concurrency``, 16..256) and ``max_concurrency`` (about 4x the
  slots, at least 4 batches) keep it fed: a batch held back by one straggler sleeping out a
  ``Retry-After`` never leaves slots idle. The price: that many requests in memory, re-asked
  after a crash.
* **Retries** with full-jitter exponential backoff on whatever the sender calls retryable,
  honouring ``Retry-After``; a pause longer than ``MAX_RETRY_AFTER`` is a hard limit (a daily
  quota, a spend cap) and ends the request. A 429 (or Anthropic's 529) that names a pause
  pauses every send, not just its own. A rejected key (401/403) raises ``BackendError``:
  every other request would get the same answer.
* **Pacing without bursts**: ``requests_per_minute`` and ``tokens_per_minute`` (prompt
  estimate + ``max_tokens``), and the separate input and output token buckets a subclass may
  add (Anthropic's ITPM/OTPM), are ``Pacer`` virtual clocks; with ``refund_unused`` the
  unused part of a token reservation is given back when the answer says what was used.
* **The key never leaks**: error texts are scrubbed of the key and of anything that looks
  like a credential (``redact``).

No SDK is imported here: the anthropic modules use this without the openai SDK.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import logging
import platform
import random
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from prefsynth.backends.base import BaseBackend, ResultSink, SendGate
from prefsynth.errors import BackendError, MissingExtraError
from prefsynth.records import ChatRequest, ChatResult

if TYPE_CHECKING:
    from prefsynth.backends.openai_http import Failure, Outcome
    from prefsynth.config import ModelSpec

log = logging.getLogger(__name__)

#: a server asking for a longer pause than this is treated as a hard limit (e.g. a daily quota)
MAX_RETRY_AFTER = 120.0
#: failures that no request of this backend can get past: raised, not recorded
FATAL_REASONS = frozenset({"unauthorized", "forbidden"})
#: failures whose ``Retry-After`` pauses every send of the backend
PAUSE_REASONS = frozenset({"rate_limited", "overloaded"})
#: credentials a server might echo back: ``Authorization: Bearer ...``, ``x-api-key: ...``
_SECRET_RE = re.compile(
    r"(?i)(authorization[\"']?\s*[:=]\s*[\"']?(?:bearer\s+|basic\s+)?|bearer\s+"
    r"|api[-_]?key[\"']?\s*[:=]\s*[\"']?)[^\s\"',}]+"
)


def redact(text: str, secret: str | None) -> str:
    """``text`` without ``secret`` (when it is a real key, four characters or more) or
    anything that looks like a credential."""
    if secret and len(secret) >= 4:
        text = text.replace(secret, "[redacted]")
    return _SECRET_RE.sub(r"\1[redacted]", text)


class Pacer:
    """Spaces sends so that at most ``per_minute`` units go out per minute, without bursts.

    A virtual clock (GCRA with zero burst tolerance): each send reserves the time its cost
    buys, starting where the previous reservation ended (or now, when that is past), and waits
    until its reserved start. After an idle spell the first send goes at once; a queue drains at
    exactly the configured rate. O(1) and lock-free (one event loop). ``adjust`` corrects a
    reservation made on an estimate once the real count is known.
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

    def adjust(self, delta: float) -> None:
        """Charge ``delta`` more units (a negative ``delta`` gives units back). A refund never
        moves the clock before now, so unused capacity is never banked into a burst."""
        self._next = max(time.monotonic(), self._next + delta / self.per_second)


def input_estimate(req: ChatRequest) -> int:
    """Prompt tokens before the answer says: characters / 4 (the usual rule of thumb for
    English with BPE tokenizers; no tokenizer on the hot path) plus 4 per message for the
    chat template."""
    chars = 0
    for m in req.messages:
        content = m.get("content")
        chars += len(content) if isinstance(content, str) else 0
    return chars // 4 + 4 * len(req.messages)


def estimate_tokens(req: ChatRequest, default_max_tokens: int) -> int:
    """Tokens a request may use, for ``tokens_per_minute``: the prompt estimate plus the
    completion budget (``max_tokens``), which is what providers count up front."""
    return input_estimate(req) + int(req.params.get("max_tokens") or default_max_tokens)


def sdk_httpx(base_client: Any, backend: str, extra: str) -> Any:
    """The HTTP library an SDK is built on, from its ``_base_client`` module: ``httpx2``
    (newer Stainless SDKs) or ``httpx``. Its ``Response`` as ``cast_to`` makes ``client.post``
    hand back the raw response; its SSL context is the aiohttp sender's trust store."""
    for name in ("httpx2", "httpx"):
        module = getattr(base_client, name, None)
        if module is not None:
            return module
    raise MissingExtraError(f"the {backend} backend (an SDK built on httpx)", extra)


@functools.cache
def stainless_headers(dist: str, client: str) -> dict[str, str]:
    """The headers a Stainless-generated SDK (``openai``, ``anthropic``) sends from its async
    client ``client`` with every request, before auth and its own: ``Accept``,
    ``Content-Type``, ``User-Agent``, the ``X-Stainless-*`` platform headers, as the SDK's
    ``BaseClient.default_headers`` and ``platform_headers`` build them, without importing the
    SDK (0.3-0.5 s of start-up). The version is the installed distribution's; a test compares
    them on the wire with the SDK's own."""
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise MissingExtraError(f"the {dist} SDK", dist) from None
    return {
        "Accept": "application/json",
        "Content-Type": "application/json",
        "User-Agent": f"{client}/Python {version}",
        "X-Stainless-Lang": "python",
        "X-Stainless-Package-Version": version,
        "X-Stainless-OS": _stainless_os(),
        "X-Stainless-Arch": _stainless_arch(),
        "X-Stainless-Runtime": _or_unknown(platform.python_implementation),
        "X-Stainless-Runtime-Version": _or_unknown(platform.python_version),
        "X-Stainless-Async": "async:asyncio",
    }


def _or_unknown(read: Callable[[], str]) -> str:
    try:
        return read()
    except Exception:
        return "unknown"


def _stainless_os() -> str:
    """The SDK's ``get_platform``."""
    try:
        system = platform.system().lower()
        name = platform.platform().lower()
    except Exception:
        return "Unknown"
    if "iphone" in name or "ipad" in name:
        return "iOS"
    named = {"darwin": "MacOS", "windows": "Windows", "freebsd": "FreeBSD", "openbsd": "OpenBSD"}
    if system in named:
        return named[system]
    if "android" in name:
        return "Android"
    if system == "linux":
        try:
            distro = platform.freedesktop_os_release().get("ID", "").lower()
        except OSError:
            distro = ""
        return {"freebsd": "FreeBSD", "openbsd": "OpenBSD"}.get(distro, "Linux")
    return f"Other:{name}" if name else "Unknown"


def _stainless_arch() -> str:
    """The SDK's ``get_architecture``."""
    try:
        machine = platform.machine().lower()
    except Exception:
        return "unknown"
    if machine in ("arm64", "aarch64"):
        return "arm64"
    if machine in ("arm", "x86_64"):
        return "arm" if machine == "arm" else "x64"
    if sys.maxsize <= 2**32:
        return "x32"
    return f"other:{machine}" if machine else "unknown"


def unsent_http_client(httpx: Any) -> Any:
    """For ``transport: aiohttp``, where the SDK client only supplies the URL and headers: an
    HTTP client whose transport refuses to send, so it builds no connection pool, no proxy
    mounts and no TLS context (the SDK's default loads the certificate store once per client,
    20-120 ms each, for a context the aiohttp session never uses)."""

    class NoSend(httpx.AsyncBaseTransport):  # type: ignore[name-defined,misc]
        async def handle_async_request(self, request: Any) -> Any:
            raise RuntimeError("transport: aiohttp sends every request, never the SDK client")

    return httpx.AsyncClient(transport=NoSend(), trust_env=False)


class HttpBackend(BaseBackend):
    """The retry loop, semaphore and pacers of a live HTTP backend (see the module).

    A subclass calls ``__init__`` with the key, sets ``self._sender`` (a ``send(key, bytes)``
    coroutine's owner with an ``aclose``) and ``self._client`` (an SDK client closed by
    ``aclose``, or ``None``), and
    implements ``encode``. One backend serves one event loop.
    """

    #: full-jitter backoff: attempt n sleeps uniform(0, min(max_delay, base_delay * 2**(n-1)))
    base_delay: float = 0.5
    max_delay: float = 30.0
    #: give back the unused part of token reservations once an answer reports its usage
    refund_unused: ClassVar[bool] = False
    #: answers each request on its own as it comes: a run streams its shards (``core.stream``)
    streams: ClassVar[bool] = True
    #: under ``executor: ray`` every copy of the model paces through one shared ``SendGate``
    shares_limits = True

    _sender: Any
    _client: Any

    def __init__(self, spec: ModelSpec, key: str, *, default_max_tokens: int,
                 input_tokens_per_minute: float | None = None,
                 output_tokens_per_minute: float | None = None) -> None:
        self.spec = spec
        self._key = key
        self._timeout = float(spec.timeout)
        self._max_retries = int(spec.max_retries)
        self._default_max_tokens = default_max_tokens
        self.batch_size = min(256, max(16, 2 * spec.max_concurrency))
        self.max_concurrency = max(4, -(-4 * spec.max_concurrency // self.batch_size))
        self._sem = asyncio.Semaphore(spec.max_concurrency)
        rates = (spec.requests_per_minute, spec.tokens_per_minute, input_tokens_per_minute,
                 output_tokens_per_minute)
        self._rpm, self._tpm, self._itpm, self._otpm = (
            Pacer(r) if r else None for r in rates)
        self._paced = any(rates)
        self._paused_until = 0.0  # a 429's Retry-After pauses every send, not just its own
        self._refused: str | None = None  # set by a 401/403: why every later send fails
        #: the rate budget shared with this model's other copies (Ray workers), if any
        self._gate: SendGate | None = None

    # ------------------------------------------------------------------------- subclass hooks

    def encode(self, req: ChatRequest) -> bytes:
        """The request body as sent. ``TypeError``/``ValueError``/``KeyError`` fail the
        request as ``bad_request``."""
        raise NotImplementedError

    def resend(self, req: ChatRequest, failure: Failure, sent: bytes) -> bytes | None:
        """After ``failure``: a body to send again at once (not counted as a retry's wait),
        or ``None`` to go on as the failure says."""
        return None

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
            for task in tasks:
                task.cancel()
            raise

    def share_limits(self, gate: SendGate) -> None:
        """Pace sends through ``gate`` (one budget for every copy of this model) instead of
        this copy's own buckets; a 429 is reported to it."""
        self._gate = gate
        self._rpm = self._tpm = self._itpm = self._otpm = None

    async def aclose(self) -> None:
        try:
            await self._sender.aclose()
        finally:
            if self._client is not None:  # no SDK client under the openai aiohttp transport
                await self._client.close()

    def redact(self, text: str) -> str:
        """``text`` without the API key or anything that looks like a credential."""
        return redact(text, None if self._key == "EMPTY" else self._key)

    # ------------------------------------------------------------------------------ internals

    async def _deliver(self, req: ChatRequest, on_result: ResultSink | None) -> ChatResult:
        res = await self._one(req)
        if on_result is not None:
            on_result(res)
        return res

    async def _one(self, req: ChatRequest) -> ChatResult:
        """The retry loop: ``self._sender.send`` makes one HTTP attempt. Raises
        ``BackendError`` only for a rejected key (401/403)."""
        try:
            content = self.encode(req)
        except (TypeError, ValueError, KeyError) as e:  # orjson.JSONEncodeError: a TypeError
            return ChatResult(req.key, error=f"bad_request: cannot encode request: {e}",
                              attempts=0)
        cost = self._cost(req) if self._paced or self._gate is not None else (0, 0)
        send: Callable[[str, bytes], Awaitable[Outcome]] = self._sender.send
        attempt = 0
        while True:
            attempt += 1
            async with self._sem:
                if self._gate is not None:
                    await self._gate.acquire(sum(cost))
                elif self._paused_until or self._paced:
                    await self._pace(*cost)
                if self._refused is not None:  # a 401/403 came back: send nothing more
                    raise BackendError(self._refused)
                outcome = await send(req.key, content)
            if isinstance(outcome, ChatResult):
                outcome.attempts = attempt
                if self.refund_unused and self._paced:
                    self._settle(*cost, outcome)
                return outcome
            if outcome.reason in FATAL_REASONS:  # no later request can succeed: send no more
                self._refused = self.redact(f"{self.spec.where}: {outcome.detail}")
                raise BackendError(self._refused)
            again = self.resend(req, outcome, content)
            if again is not None:
                content = again
                continue
            delay = self._next_delay(outcome, attempt)
            if delay is None:
                return ChatResult(req.key, error=self._error_text(outcome, attempt),
                                  attempts=attempt)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s: %s; retry %d in %.2fs", self.spec.name, outcome.reason, attempt,
                          delay)
            await asyncio.sleep(delay)

    def _cost(self, req: ChatRequest) -> tuple[int, int]:
        """(prompt tokens estimated, completion budget) reserved against the token buckets."""
        return input_estimate(req), int(req.params.get("max_tokens") or self._default_max_tokens)

    async def _pace(self, tokens_in: int, max_out: int) -> None:
        """Wait for every bucket (reservations are made while holding a slot, so a backlog
        never turns into a burst when slots free up)."""
        wait = self._paused_until - time.monotonic()
        for bucket, cost in ((self._rpm, 1), (self._tpm, tokens_in + max_out),
                             (self._itpm, tokens_in), (self._otpm, max_out)):
            if bucket is not None:
                wait = max(wait, bucket.reserve(float(cost)))
        if wait > 0:
            await asyncio.sleep(wait)

    def _settle(self, tokens_in: int, max_out: int, result: ChatResult) -> None:
        """Correct the token reservations from the usage the answer reports (Anthropic
        counts OTPM by the tokens used). A failed attempt keeps its full charge: the
        provider may have counted it."""
        used_in, used_out = result.usage.prompt_tokens, result.usage.completion_tokens
        if not (used_in or used_out):
            return
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
            delay = random.uniform(0.0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
            if failure.reason in PAUSE_REASONS and self._gate is not None:
                self._gate.cooldown(delay)
            return delay
        if ra > MAX_RETRY_AFTER:
            return None
        if failure.reason in PAUSE_REASONS:
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


__all__ = ["MAX_RETRY_AFTER", "HttpBackend", "Pacer", "estimate_tokens", "input_estimate",
           "redact", "sdk_httpx", "stainless_headers", "unsent_http_client"]
