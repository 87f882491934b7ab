"""The ``openai`` backend: any OpenAI-compatible chat-completions server.

OpenAI itself, vLLM ``serve``, SGLang, TGI, Together, llama.cpp's server... all speak
``POST /v1/chat/completions``. What the official ``openai`` SDK would send is the reference for
the client configuration (base URL, ``OPENAI_BASE_URL``, key, default headers,
organization/project); the policy around each request is ours, because at millions of requests
it matters:

* **Client CPU is kept small.** By default (``options.transport: aiohttp``) the request is
  POSTed through an ``aiohttp.ClientSession`` owned by the backend, with the URL and the
  headers the SDK would send built once without importing it (``openai_common.wire_target``:
  the SDK's import is 0.3-0.5 s of start-up; a test checks the wire is the same), the body
  encoded by orjson and the answer parsed by orjson: measured on a loopback server that answers at once,
  ~0.12 ms of client CPU per request against ~0.45 ms through the SDK's ``client.post`` and
  ~1.5 ms for ``client.chat.completions.create`` on httpx (``bench/overhead.py``).
  ``options.transport: sdk`` sends through ``client.post`` instead (the SDK's aiohttp
  transport when installed, httpx otherwise); it is also the default when aiohttp is missing.
  Nothing is logged per request above DEBUG.
* **Retries are ours** (the SDK runs with ``max_retries=0``): exponential backoff with full
  jitter on 408/409/429/5xx, timeouts, dropped connections and malformed or truncated bodies,
  honouring ``Retry-After`` / ``retry-after-ms``; other 4xx fail at once. A request that runs
  out of retries comes back as ``ChatResult(error="<reason>: <detail>")``, never as an
  exception, and ``attempts`` counts its HTTP attempts. One retry loop serves both transports
  (and the ``anthropic`` backend): ``http_common.HttpBackend``.
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

import importlib.util
import logging
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import Field

from prefsynth.backends.base import BackendOptions, parse_options
from prefsynth.backends.http_common import HttpBackend, Pacer, estimate_tokens, sdk_httpx
from prefsynth.backends.openai_common import api_key, chat_body, wire_target
from prefsynth.backends.openai_http import (
    CHAT,
    AiohttpSender,
    Failure,
    SdkSender,
    choose_transport,
    retry_after_seconds,
)
from prefsynth.errors import MissingExtraError
from prefsynth.records import ChatRequest

if TYPE_CHECKING:
    from prefsynth.config import ModelSpec
    from prefsynth.core.store import Store

log = logging.getLogger(__name__)


def _sdk() -> Any:
    """The ``openai`` SDK, imported only for ``transport: sdk``; ``MissingExtraError`` naming
    the extra when it is not installed."""
    try:
        import openai
    except ImportError:
        raise MissingExtraError("the openai backend", "openai") from None
    return openai


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


class OpenAIBackend(HttpBackend):
    """An OpenAI-compatible HTTP endpoint: one aiohttp session per backend, or one
    ``AsyncOpenAI`` client under ``transport: sdk``.

    Concurrency, retries and pacing are ``HttpBackend``'s (one semaphore of
    ``spec.max_concurrency`` over every request in flight, released while a request sleeps
    before a retry); this class builds the client and the sender, and the body.
    """

    name = "openai"
    Options = OpenAIOptions
    endpoint_fields = frozenset({
        "base_url", "api_key_env", "max_concurrency", "requests_per_minute",
        "tokens_per_minute", "timeout", "max_retries",
    })

    def __init__(self, spec: ModelSpec, store: Store | None = None) -> None:
        opts = parse_options(OpenAIOptions, spec)
        if importlib.util.find_spec("openai") is None:  # installed, not imported
            raise MissingExtraError("the openai backend", "openai")
        transport = choose_transport(opts.transport, spec, "openai")
        # the key raises BackendError naming the variable when unset
        super().__init__(spec, api_key(spec), default_max_tokens=spec.params.max_tokens)
        #: the form ``response_format`` is sent in now; ``auto`` may switch it once
        self._auto = opts.response_format_style == "auto"
        self._style: str = "json_schema" if self._auto else opts.response_format_style
        #: ``aiohttp`` (our own session) or ``sdk`` (``client.post``); see the module docstring
        self.transport: str = transport
        #: the SDK's HTTP client under ``transport: sdk`` (``aiohttp`` or ``httpx``), else None
        self.sdk_http: str | None = None
        #: the SDK client, under ``transport: sdk`` only
        self._client = None
        if transport == "aiohttp":
            url, headers = wire_target(spec, self._key, CHAT.path)
            self._sender = AiohttpSender(
                url, lambda: headers, spec, opts.max_response_bytes)
            return
        openai = _sdk()
        httpx = sdk_httpx(openai._base_client, "openai", "openai")
        self._client = openai.AsyncOpenAI(
            base_url=spec.base_url, api_key=self._key, max_retries=0, timeout=self._timeout,
            http_client=self._sdk_http_client(openai, httpx),
        )
        self._sender = SdkSender(self._client, spec, openai, httpx, opts.max_response_bytes)

    def _sdk_http_client(self, openai: Any, httpx: Any) -> Any:
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

    def encode(self, req: ChatRequest) -> bytes:
        return orjson.dumps(self.body(req))

    def resend(self, req: ChatRequest, failure: Failure, sent: bytes) -> bytes | None:
        """After the server rejected ``json_schema``: with ``auto``, switch this backend to
        ``json_object`` + ``schema`` (once; requests already in flight follow) and send the
        request again at once in that form, unless that is the form it was just refused in."""
        if not (self._auto and failure.format_rejected and req.response_format is not None):
            return None
        if self._style != "json_object":
            self._style = "json_object"
            log.warning("%s: the server rejects response_format json_schema; sending "
                        "json_object with the schema from now on", self.spec.name)
        again = self.encode(req)
        return again if again != sent else None


__all__ = ["OpenAIBackend", "Pacer", "estimate_tokens", "retry_after_seconds"]
