"""The ``anthropic`` backend: Claude models through the live Messages API (``POST /v1/messages``).

The same guarantees as the ``openai`` backend, with the same parts where they fit:

* **The SDK configures, our session sends.** ``anthropic.AsyncAnthropic`` resolves the base
  URL (``base_url``, else ``ANTHROPIC_BASE_URL``), the key and its headers (``anthropic-version``,
  ``ANTHROPIC_CUSTOM_HEADERS``...); by default (``options.transport: aiohttp``) the request is
  POSTed through the ``openai`` backend's ``AiohttpSender`` (one ``aiohttp.ClientSession``,
  headers built once from the SDK's client, orjson both ways, bodies read up to
  ``options.max_response_bytes``), given the Messages API (``anthropic_common.MESSAGES``:
  ``/v1/messages``, its answers, its errors). ``transport: sdk`` sends through the SDK's
  ``client.post`` instead.
* **Retries are ours**, in the loop the ``openai`` backend runs too (``http_common``; the SDK
  runs with ``max_retries=0``): full-jitter exponential backoff on 408/409/429/5xx and
  Anthropic's 529 ``overloaded_error``, timeouts, dropped connections and malformed bodies,
  honouring ``retry-after``; a 429 or 529 that names a pause pauses every send. Other 4xx fail
  at once; a rejected key (401/403) raises ``BackendError``. A request out of retries comes
  back with ``error="<reason>: ..."``.
* **Anthropic's limits are separate buckets**: ``requests_per_minute``, and
  ``options.input_tokens_per_minute`` / ``options.output_tokens_per_minute`` (ITPM / OTPM) as
  Anthropic counts them: input tokens estimated up front (characters / 4), output tokens
  reserved at ``max_tokens`` and the unused part given back when the answer says how many were
  used. ``tokens_per_minute`` is a combined bucket (input + ``max_tokens``), as for ``openai``.
* **The key never leaks**: it comes from ``api_key_env`` (default ``ANTHROPIC_API_KEY``), is
  never stored, and error texts are scrubbed of it.

Options (``LiveOptions``, none of them part of a request key): ``transport`` (``aiohttp`` |
``sdk``), ``input_tokens_per_minute``, ``output_tokens_per_minute``, ``max_response_bytes``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import orjson
from pydantic import Field

from prefsynth.backends.anthropic_common import (
    DEFAULT_MAX_TOKENS,
    MESSAGES,
    AnthropicFamily,
    api_key,
    import_sdk,
    message_body,
)
from prefsynth.backends.base import BackendOptions, parse_options
from prefsynth.backends.http_common import HttpBackend, sdk_httpx, unsent_http_client
from prefsynth.backends.openai_http import choose_transport, make_sender
from prefsynth.records import ChatRequest

if TYPE_CHECKING:
    from prefsynth.config import ModelSpec
    from prefsynth.core.store import Store


class LiveOptions(BackendOptions):
    """``anthropic`` options: how requests travel and are paced; none changes an answer (so
    ``anthropic`` and ``anthropic-batch`` keep sharing keys)."""

    transport: Literal["aiohttp", "sdk"] | None = None  # None: aiohttp when installed
    #: Anthropic's ITPM and OTPM limits, each a bucket of its own
    input_tokens_per_minute: float | None = Field(None, gt=0)
    output_tokens_per_minute: float | None = Field(None, gt=0)
    #: a response body longer than this fails its request (``response_too_large``)
    max_response_bytes: int = Field(1_000_000, ge=1024)


class AnthropicBackend(AnthropicFamily, HttpBackend):
    """Claude through the Messages API, one ``AsyncAnthropic`` client per backend.

    Concurrency, chunking, retries and pacing are ``HttpBackend``'s, as for ``OpenAIBackend``;
    the token buckets are refunded what an answer did not use (``refund_unused``).
    """

    name = "anthropic"
    refund_unused: ClassVar[bool] = True  # Anthropic counts OTPM by the tokens used
    Options = LiveOptions
    endpoint_fields = frozenset({
        "base_url", "api_key_env", "max_concurrency", "requests_per_minute",
        "tokens_per_minute", "timeout", "max_retries",
    })

    def __init__(self, spec: ModelSpec, store: Store | None = None) -> None:
        anthropic = import_sdk("anthropic")
        opts = parse_options(LiveOptions, spec)
        transport = choose_transport(opts.transport, spec, "anthropic")
        # the key raises BackendError naming the variable when unset
        super().__init__(spec, api_key(spec), default_max_tokens=DEFAULT_MAX_TOKENS,
                         input_tokens_per_minute=opts.input_tokens_per_minute,
                         output_tokens_per_minute=opts.output_tokens_per_minute)
        self.transport: str = transport
        httpx = sdk_httpx(anthropic._base_client, "anthropic", "anthropic")
        # under transport: aiohttp the SDK client only lends URL and headers: an HTTP client
        # that never sends spares it a TLS context (``unsent_http_client``)
        self._client = anthropic.AsyncAnthropic(
            api_key=self._key, base_url=spec.base_url, max_retries=0, timeout=self._timeout,
            http_client=unsent_http_client(httpx) if transport == "aiohttp" else None)
        self._sender = make_sender(transport, self._client, spec, anthropic, httpx,
                                   opts.max_response_bytes, MESSAGES)

    def encode(self, req: ChatRequest) -> bytes:
        """The Messages body; an unknown role is a ``ValueError`` (``bad_request``)."""
        return orjson.dumps(message_body(req))


__all__ = ["AnthropicBackend", "LiveOptions"]
