"""How the live backends talk HTTP: two senders, and how a failed attempt is classified.

A sender makes **one** HTTP attempt for an orjson-encoded body and returns a ``ChatResult`` or
a ``Failure`` (why, whether asking again can help, how long to wait); the retry loop, pacing,
semaphore and redaction (``http_common.HttpBackend``) are shared by both. What differs between
providers is an ``Api``: the path under the SDK's base URL, the parser of a 2xx body and the
classifier of any other status (``CHAT`` for OpenAI's chat completions; the ``anthropic``
backend passes its Messages API):

* ``AiohttpSender`` (``options.transport: aiohttp``, the default): POSTs through one
  ``aiohttp.ClientSession`` owned by the backend, with the URL parsed once and the headers built
  once: those the SDK would send (``openai_common.wire_target`` builds OpenAI's without
  importing the SDK; ``sdk_target`` reads them off an SDK client, as the ``anthropic`` backend
  does). TLS trust comes from the SDK's HTTP library (``SSL_CERT_FILE`` / ``SSL_CERT_DIR``
  honoured, as there) and proxies from the environment, both resolved once. It skips the SDK's
  per-request pipeline (request options, URL merging, header merging, httpx request building,
  the httpx-to-aiohttp adapter): about four times less client CPU per request than
  ``client.post`` on the SDK's aiohttp transport.
* ``SdkSender`` (``options.transport: sdk``): ``client.post`` with the prebuilt body, the raw
  response parsed by orjson; the SDK's aiohttp transport when installed, httpx otherwise.

Both read a body only up to ``options.max_response_bytes``: a runaway server once sent a
200 MB answer that went into ``pairs.jsonl``; now that request fails (``response_too_large``)
and nothing past the bound is held in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import importlib
import math
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import orjson

from prefsynth.backends.openai_common import result_from_completion
from prefsynth.errors import MissingExtraError
from prefsynth.records import ChatResult

if TYPE_CHECKING:
    from prefsynth.config import ModelSpec

try:
    import aiohttp
    from aiohttp.helpers import get_env_proxy_for_url
    from yarl import URL
except ImportError:  # pragma: no cover - exercised only without the extra
    aiohttp = None  # type: ignore[assignment]
    get_env_proxy_for_url = None  # type: ignore[assignment]
    URL = None  # type: ignore[assignment,misc]

#: statuses worth asking again: request timeout, lock conflict, rate limit, every 5xx
RETRY_STATUS = frozenset({408, 409, 429})
_REASONS_4XX = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    413: "bad_request",
    422: "bad_request",
}


#: a pydantic/FastAPI validation error: the request is invalid, whatever the status says
#: (llama-cpp-python's server answers HTTP 500 with one); asking again cannot help
_VALIDATION_RE = re.compile(r"\bvalidation errors?\b", re.I)


class Failure(NamedTuple):
    """One failed HTTP attempt: why, whether asking again can help, and how long to wait.
    ``format_rejected``: the server does not take OpenAI's ``json_schema`` response format
    (llama-cpp-python's server wants ``json_object`` with a ``schema``)."""

    reason: str
    detail: str
    retryable: bool
    retry_after: float | None = None
    format_rejected: bool = False


class TooLarge(Exception):
    """A response body over ``max_response_bytes``."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit


def too_large(limit: int) -> Failure:
    return Failure("response_too_large",
                   f"response body larger than {limit} bytes (options.max_response_bytes)", False)


async def read_bounded(chunks: AsyncIterator[bytes], length: int | None, limit: int) -> bytes:
    """A body of at most ``limit`` bytes, read chunk by chunk; ``TooLarge`` as soon as a
    ``Content-Length`` or the bytes read so far pass it (the rest is never read)."""
    if length is not None and length > limit:
        raise TooLarge(limit)
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise TooLarge(limit)
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def rejects_json_schema(message: str) -> bool:
    """Whether an error says the server takes ``json_object`` where ``json_schema`` was sent
    (llama-cpp-python: ``'loc': ('body', 'response_format', 'type')``, ``Input should be
    'text' or 'json_object'``, ``'input': 'json_schema'``)."""
    return all(word in message for word in ("response_format", "json_object", "json_schema"))


Outcome = ChatResult | Failure


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """The pause a response asks for: ``retry-after-ms``, else ``Retry-After`` in seconds or as
    an HTTP date. ``None`` when absent or unreadable."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        value = float(ra)
        return max(0.0, value) if math.isfinite(value) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(ra)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def server_message(body: object) -> str:
    """The human part of an error body (``{"error": {"message": ...}}``, FastAPI's
    ``{"detail": ...}``, or plain text)."""
    if isinstance(body, dict):
        err = body.get("error", body.get("detail", body))
        msg = err.get("message") if isinstance(err, dict) else err
        if msg:
            return str(msg)
        return str(body)
    return "" if body is None else str(body)


def status_failure(
    status: int, headers: Mapping[str, str], body: object, spec: ModelSpec
) -> Failure:
    """A non-2xx answer: 408/409/429/5xx are retried (after ``Retry-After`` when given, and
    ``x-should-retry`` overrides), other statuses fail at once; a 401 names ``api_key_env``.
    A validation error is never retried, whatever its status (a 500 from llama.cpp's server)."""
    full = server_message(body)
    message = short(full)
    detail = f"HTTP {status}: {message}" if message else f"HTTP {status}"
    if status == 401:
        env = spec.api_key_env
        where = (
            f"the key in ${env} was rejected"
            if env
            else f"the server wants a key and {spec.where}.api_key_env is not set"
        )
        return Failure("unauthorized", f"HTTP 401: {where} ({message})", False)
    format_rejected = status in (400, 422, 500) and rejects_json_schema(full)
    if status >= 500 and _VALIDATION_RE.search(full):
        return Failure("bad_request", detail, False, format_rejected=format_rejected)
    retryable = status in RETRY_STATUS or status >= 500
    hint = headers.get("x-should-retry")
    if hint in ("true", "false"):
        retryable = hint == "true"
    if status == 429:
        reason = "rate_limited"
    elif status >= 500:
        reason = "server_error"
    else:
        reason = _REASONS_4XX.get(status, "client_error")
    if not retryable:
        return Failure(reason, detail, False, format_rejected=format_rejected)
    return Failure(reason, detail, True, retry_after_seconds(headers))


def timed_out(seconds: float) -> Failure:
    return Failure("timeout", f"no complete response within {seconds:g}s", True)


def body_parser(to_result: Callable[[str, Any], ChatResult]) -> Callable[[str, bytes], Outcome]:
    """The parser of a 2xx body for an API whose JSON answers ``to_result`` reads: the result,
    or a retryable ``malformed_response`` (bad JSON, a payload of the wrong shape)."""

    def parse(key: str, raw: bytes) -> Outcome:
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return Failure("malformed_response", f"response is not valid JSON ({e})", True)
        result = to_result(key, payload)
        if result.error is not None and result.error.startswith("malformed"):
            return Failure("malformed_response", result.error, True)
        return result

    return parse


#: a chat completion's 2xx body (no choices, bad JSON: ``malformed_response``)
parse_completion = body_parser(result_from_completion)


def _described(e: BaseException) -> str:
    return short(f"{type(e).__name__}: {e}")


class Api(NamedTuple):
    """What a sender needs to know of one provider's endpoint."""

    #: appended to the SDK client's ``base_url`` (OpenAI's includes ``/v1``, Anthropic's not)
    path: str
    #: a 2xx body -> the result, or a retryable ``malformed_response``
    parse: Callable[[str, bytes], Outcome]
    #: a non-2xx status, its headers and its (decoded) body -> the ``Failure``
    failure: Callable[[int, Mapping[str, str], object, ModelSpec], Failure]


#: OpenAI's ``POST /v1/chat/completions`` (and every server that speaks it)
CHAT = Api("/chat/completions", parse_completion, status_failure)


class AiohttpSender:
    """``POST url`` on a backend-owned ``aiohttp.ClientSession``.

    The session (``TCPConnector(limit=connections)``, ``ClientTimeout(total=timeout)``, the
    headers as session defaults) is created on first use, inside the running loop, and closed by
    ``aclose``. Everything per request is: post the bytes, read the answer, classify it.
    ``headers`` is called once, when the session opens (inside the loop, so that an SDK's
    ``X-Stainless-Async`` names it); ``httpx`` is the HTTP library whose TLS trust an ``https``
    URL gets (by default ``httpx2`` or ``httpx``, imported only then).
    """

    name = "aiohttp"

    def __init__(self, url: str, headers: Callable[[], dict[str, str]], spec: ModelSpec,
                 max_bytes: int, api: Api = CHAT, httpx: Any = None) -> None:
        if aiohttp is None:  # pragma: no cover - the backend checks first
            raise RuntimeError("aiohttp is not installed")
        self._headers = headers
        self._spec = spec
        self._connections = spec.max_concurrency
        self._httpx = httpx
        self.timeout = float(spec.timeout)
        self.max_bytes = max_bytes
        self.api = api
        self.url = URL(url)
        self._session: aiohttp.ClientSession | None = None

    def headers(self) -> dict[str, str]:
        """What every request carries, with a ``Content-Type`` when none is given."""
        headers = dict(self._headers())
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = "application/json"
        return headers

    def _ssl(self) -> Any:
        """TLS trust as the SDK's HTTP library builds it (``SSL_CERT_FILE``/``_DIR`` or the
        system store); aiohttp's own default when that library cannot make one."""
        if self.url.scheme != "https":
            return True
        httpx = self._httpx
        if httpx is None:  # the library the Stainless SDKs are built on, imported only now
            for name in ("httpx2", "httpx"):
                with contextlib.suppress(ImportError):
                    httpx = importlib.import_module(name)
                    break
        try:
            return httpx.create_ssl_context()
        except Exception:  # no such library, or one without the helper: aiohttp's default
            return True

    def _open(self) -> aiohttp.ClientSession:
        assert aiohttp is not None and get_env_proxy_for_url is not None
        proxy: Any = None
        proxy_auth: Any = None
        with contextlib.suppress(LookupError):  # HTTP(S)_PROXY / NO_PROXY, resolved once
            proxy, proxy_auth = get_env_proxy_for_url(self.url)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._connections, ssl=self._ssl()),
            headers=self.headers(),
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            proxy=proxy,
            proxy_auth=proxy_auth,
        )
        return self._session

    async def send(self, key: str, content: bytes) -> Outcome:
        session = self._session
        if session is None:
            session = self._open()
        try:
            async with session.post(self.url, data=content) as resp:
                raw = await read_bounded(resp.content.iter_any(), resp.content_length,
                                         self.max_bytes)
                status = resp.status
                if not 200 <= status < 300:
                    return self.api.failure(status, resp.headers, _error_body(raw), self._spec)
        except TooLarge as e:
            return too_large(e.limit)
        except TimeoutError:  # aiohttp's total timeout, and its ServerTimeoutError subclasses
            return timed_out(self.timeout)
        except aiohttp.ClientPayloadError as e:  # the body ended before Content-Length said
            return Failure("truncated_response", _described(e), True)
        except (aiohttp.ClientError, OSError) as e:  # reset, hang-up, refused, bad HTTP
            return Failure("connection_error", _described(e), True)
        except Exception as e:  # a bug or a library surprise: record it, do not kill the batch
            return Failure("unexpected_error", _described(e), False)
        return self.api.parse(key, raw)

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _error_body(raw: bytes) -> object:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace")


class SdkSender:
    """``client.post`` on the SDK (retries off), the raw response parsed by orjson."""

    name = "sdk"

    def __init__(self, client: Any, spec: ModelSpec, sdk: Any, httpx: Any,
                 max_bytes: int, api: Api = CHAT) -> None:
        self._client = client
        self._spec = spec
        self._sdk = sdk
        self._response_cls = httpx.Response  # cast_to: the SDK hands back the raw response
        self._read_errors: tuple[type[BaseException], ...] = (httpx.HTTPError, httpx.StreamError)
        self.timeout = float(spec.timeout)
        self.max_bytes = max_bytes
        self.api = api

    async def send(self, key: str, content: bytes) -> Outcome:
        """``stream=True``: the SDK hands back the response unread, and the body is read here
        up to ``max_bytes`` (the SDK reads error bodies itself)."""
        sdk = self._sdk
        try:
            async with asyncio.timeout(self.timeout):
                resp = await self._client.post(
                    self.api.path, content=content, cast_to=self._response_cls,
                    stream=True,
                )
                try:
                    length = resp.headers.get("content-length")
                    known = int(length) if length and length.isdigit() else None
                    raw = await read_bounded(resp.aiter_bytes(), known, self.max_bytes)
                finally:
                    await resp.aclose()
        except TooLarge as e:
            return too_large(e.limit)
        except sdk.APIStatusError as e:
            return self.api.failure(e.status_code, e.response.headers, e.body, self._spec)
        except TimeoutError:
            return timed_out(self.timeout)
        except sdk.APIConnectionError as e:  # APITimeoutError included: see _transport_failure
            return self._transport_failure(e)
        except (OSError, sdk.APIError) as e:
            return Failure("connection_error", _described(e), True)
        except self._read_errors as e:  # the HTTP library's, while reading the body ourselves
            return self._transport_failure(e)
        except Exception as e:  # a bug or an SDK surprise: record it, do not kill the batch
            return Failure("unexpected_error", _described(e), False)
        return self.api.parse(key, raw)

    def _transport_failure(self, e: BaseException) -> Failure:
        """A timeout, a truncated body or a broken connection, told apart by the cause chain:
        the SDK's aiohttp transport maps every ``ClientConnectionError`` (a reset, a server that
        hung up) to a ``ConnectTimeout``, so the SDK's exception class alone would call a reset
        a timeout; a short body is a ``ClientPayloadError`` caused by a ``ContentLengthError``."""
        chain = [e]
        while chain[-1].__cause__ is not None:
            chain.append(chain[-1].__cause__)
        root = chain[-1]
        if isinstance(root, TimeoutError) or (
            root is e and isinstance(e, self._sdk.APITimeoutError)
        ):
            return timed_out(self.timeout)
        what = f"{type(root).__name__}: {root}" if root is not e else str(e)
        names = {c.__name__ for exc in chain for c in type(exc).__mro__}
        payload_error = not names.isdisjoint({"ClientPayloadError", "PayloadEncodingError"})
        reason = "truncated_response" if payload_error else "connection_error"
        return Failure(reason, short(what), True)

    async def aclose(self) -> None:
        """The SDK client is the backend's; it closes it."""


def choose_transport(wanted: str | None, spec: ModelSpec, extra: str) -> str:
    """``options.transport``, by default ``aiohttp`` when installed, else ``sdk``; asking for
    ``aiohttp`` without it names the extra that installs it."""
    transport = wanted or ("aiohttp" if aiohttp is not None else "sdk")
    if transport == "aiohttp" and aiohttp is None:
        raise MissingExtraError(f"{spec.where}.options.transport: aiohttp", extra)
    return transport


def sdk_target(client: Any, path: str) -> tuple[str, Callable[[], dict[str, str]]]:
    """The URL of ``path`` under an SDK client's resolved ``base_url``, and its headers: what
    the SDK sends with every request, minus the per-attempt ``X-Stainless-Retry-Count`` /
    ``-Read-Timeout`` hints: auth first, then the default headers over it (the SDK's merge
    order), headers the SDK omits (``Omit``) left out."""

    def headers() -> dict[str, str]:
        merged: dict[str, Any] = {**client.auth_headers, **client.default_headers}
        return {k: v for k, v in merged.items() if isinstance(v, str)}

    return str(client.base_url).rstrip("/") + path, headers


def make_sender(transport: str, client: Any, spec: ModelSpec, sdk: Any, httpx: Any,
                max_bytes: int, api: Api = CHAT) -> AiohttpSender | SdkSender:
    """The sender of ``transport`` for an SDK ``client`` (its module ``sdk``, its HTTP
    library ``httpx``), speaking ``api``; the aiohttp one takes URL and headers from it."""
    if transport == "aiohttp":
        url, headers = sdk_target(client, api.path)
        return AiohttpSender(url, headers, spec, max_bytes, api, httpx)
    return SdkSender(client, spec, sdk, httpx, max_bytes, api)


__all__ = [
    "CHAT",
    "AiohttpSender",
    "Api",
    "Failure",
    "SdkSender",
    "body_parser",
    "choose_transport",
    "make_sender",
    "parse_completion",
    "read_bounded",
    "rejects_json_schema",
    "retry_after_seconds",
    "sdk_target",
    "status_failure",
]
