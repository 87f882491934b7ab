"""``anthropic-batch``: Claude at scale through the Message Batches API (half price, 24 h).

The lifecycle of ``openai-batch`` (``batch_common.BatchBackend``: record on create, poll,
collect, resubmit what failed), on Anthropic's API: a batch carries its requests inline
(``POST /v1/messages/batches``, each ``{"custom_id": key, "params": <the live body>}``), so
there is no file to upload. The recorded ``status`` of one batch moves like this::

    create ─► record: in_progress ─► (canceling) ─► ended ─► collected

An ended batch's results (JSONL, matched by ``custom_id``, order ignored) are read and the batch
marked ``collected`` with the keys that got no answer (``info.failed_keys``): ``errored``,
``expired`` (not run within 24 h) and ``canceled`` requests, and any the results lack; those
are submitted alone in a new batch. Results stay downloadable for 29 days.

Create is not idempotent and returns no handle before it succeeds: when it fails in a way
that may hide a created batch (a timeout, a dropped connection, a 5xx), the newest batches
are listed and one created since the attempt, with this many requests and not yet recorded,
is taken as ours instead of creating another.

Options (``AnthropicBatchOptions``; none changes an answer): ``poll_interval`` (30 s),
``max_requests_per_batch`` (100,000, Anthropic's limit), ``max_bytes_per_batch`` (250 MB;
Anthropic: 256 MB), ``max_batches_in_flight`` (none),
``http_retries`` (2, the SDK's retries of retrieve/list/results), ``create_timeout`` (600 s),
``max_poll_errors`` (10 failed polls of one batch end a ``wait``), ``wait``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import orjson
from pydantic import Field

from prefsynth.backends.anthropic_common import (
    DEFAULT_KEY_ENV,
    AnthropicFamily,
    api_key,
    import_sdk,
    message_body,
    result_from_message,
)
from prefsynth.backends.base import parse_options
from prefsynth.backends.batch_common import Batch, BatchBackend, BatchOptions, pack
from prefsynth.config import ModelSpec
from prefsynth.core.store import Store
from prefsynth.records import ChatRequest, ChatResult

log = logging.getLogger(__name__)

ENDPOINT = "/v1/messages/batches"
MAX_REQUESTS = 100_000  # Anthropic: requests per batch
MAX_BYTES = 250_000_000  # Anthropic: 256 MB per batch
PROVIDER = "anthropic"  # info["provider"] of these batches in the shared table
ENDED = "ended"
#: how far back (seconds) a batch created by a failed-looking create may be found
CREATE_WINDOW = 600.0


class AnthropicBatchOptions(BatchOptions):
    """``anthropic-batch`` options: how batches are cut, sent and watched (see the module);
    none changes an answer, so keys stay shared with ``anthropic``."""

    max_requests_per_batch: int = Field(MAX_REQUESTS, ge=1, le=MAX_REQUESTS)
    max_bytes_per_batch: int = Field(MAX_BYTES, ge=1)
    create_timeout: float = Field(600.0, gt=0)


def batch_item(req: ChatRequest) -> bytes:
    """One request of a batch; ``params`` is the live backend's body, byte for byte."""
    return orjson.dumps({"custom_id": req.key, "params": message_body(req)})


def iter_batches(requests: Iterable[ChatRequest], max_requests: int, max_bytes: int,
                 rejected: dict[str, str]) -> Iterator[tuple[list[str], bytes]]:
    """Yield ``(keys, create body)`` within the limits, one at a time (``pack``)."""
    return pack(requests, batch_item, max_requests, max_bytes, rejected,
                limit_name="max_bytes_per_batch", head=b'{"requests":[', sep=b",", tail=b"]}")


class AnthropicBatchBackend(AnthropicFamily, BatchBackend):
    """``anthropic-batch`` backend: hand it every open request of one model in one call."""

    Options = AnthropicBatchOptions
    endpoint_fields = frozenset({"base_url", "api_key_env", "timeout", "max_retries"})
    provider = PROVIDER
    api_name = "Message Batches API"
    final = frozenset({ENDED})
    status_fields = ("expires_at",)
    default_key_env = DEFAULT_KEY_ENV

    def __init__(self, spec: ModelSpec, store: Store | None = None) -> None:
        anthropic = import_sdk("anthropic-batch")
        opts = parse_options(AnthropicBatchOptions, spec)
        key = api_key(spec)  # fails here, before any work, when the variable is unset
        super().__init__(spec, store, opts, key)
        self.opts = opts
        self._sdk = anthropic
        self._batch_type = anthropic.types.messages.MessageBatch
        self.auth_error = (anthropic.AuthenticationError, anthropic.PermissionDeniedError)
        self.api_error = anthropic.APIError
        self.client = anthropic.AsyncAnthropic(api_key=key, base_url=spec.base_url,
                                               timeout=spec.timeout,
                                               max_retries=opts.http_retries)
        # create is not idempotent: retried by hand after checking it did not happen
        self._create_client = self.client.with_options(max_retries=0)

    # ---- polling and collecting --------------------------------------------------------
    async def _retrieve(self, b: Batch) -> tuple[str, dict[str, Any]]:
        obj = await self.client.messages.batches.retrieve(b.id)
        counts = obj.request_counts.model_dump() if obj.request_counts else {}
        return str(obj.processing_status), {"request_counts": counts,
                                            "ended_at": _iso(obj.ended_at),
                                            "expires_at": _iso(obj.expires_at)}

    async def _download(self, b: Batch) -> dict[str, ChatResult]:
        """Every key of an ended batch: its result, else why it has none. The JSONL is
        streamed line by line: a batch's results can be hundreds of megabytes."""
        wanted = set(b.keys)
        out: dict[str, ChatResult] = {}
        stream = self.client.messages.batches.with_streaming_response.results(b.id)
        async with stream as resp:
            async for raw in resp.iter_lines():
                try:
                    line = orjson.loads(raw)
                    cid = line["custom_id"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    continue  # blank or foreign line
                if cid in wanted:
                    out[cid] = self._line_result(cid, line.get("result") or {}, b.id)
        missing = f"batch ended without a result for this request (batch {b.id})"
        return {k: out.get(k) or ChatResult(k, error=missing) for k in b.keys}

    def _line_result(self, key: str, result: dict[str, Any], batch_id: str) -> ChatResult:
        kind = result.get("type")
        if kind == "succeeded":
            res = result_from_message(key, result.get("message"))
            if res.error is not None:
                res.error = self._redact(res.error)
            return res
        if kind == "errored":
            err = (result.get("error") or {}).get("error") or result.get("error") or {}
            what = f"{err.get('type')}: {err.get('message')}" if isinstance(err, dict) else err
            return ChatResult(key, error=self._redact(f"batch item errored: {what}"))
        if kind == "expired":
            return ChatResult(key, error=f"batch item expired: not run within the 24 h window "
                                         f"(batch {batch_id})")
        if kind == "canceled":
            return ChatResult(key, error=f"batch item canceled before it ran (batch {batch_id})")
        return ChatResult(key, error=f"batch item with unknown result type {kind!r}")

    # ---- submitting --------------------------------------------------------------------
    def _shards(self, requests: Sequence[ChatRequest],
                rejected: dict[str, str]) -> Iterator[tuple[list[str], bytes]]:
        return iter_batches(requests, self.opts.max_requests_per_batch,
                            self.opts.max_bytes_per_batch, rejected)

    async def _start(self, n: int, keys: list[str], data: bytes) -> Batch | str:
        try:
            obj = await self._create(data, len(keys))
        except self._sdk.APIError as e:
            return f"batch create failed: {self._redact(e)}"
        return Batch(obj.id, None, keys, obj.processing_status,
                     {"api_status": obj.processing_status, "created_at": _iso(obj.created_at),
                      "expires_at": _iso(obj.expires_at)})

    async def _create(self, data: bytes, n: int) -> Any:
        """``POST /v1/messages/batches`` with the prebuilt body, retried by hand: a timeout
        or a 5xx may hide a created batch, so look for one before creating another."""
        sdk = self._sdk
        retries = self.opts.http_retries
        for attempt in range(retries + 1):
            started = time.time()
            try:
                return await self._create_client.post(
                    ENDPOINT, content=data, cast_to=self._batch_type,
                    options={"timeout": self.opts.create_timeout,
                             "headers": {"Content-Type": "application/json"}})
            except self.auth_error as e:
                raise self._auth(e) from None
            except sdk.RateLimitError:  # refused, so certainly not created
                if attempt == retries:
                    raise
            except (sdk.APIConnectionError, sdk.InternalServerError):
                found = await self._find_created(started, n)
                if found is not None:
                    log.warning("anthropic-batch %s: create failed but batch %s was created; "
                                "using it", self.name, found.id)
                    return found
                if attempt == retries:
                    raise
            await asyncio.sleep(min(2.0**attempt, self.poll_interval))
        raise AssertionError("unreachable")

    async def _find_created(self, since: float, n: int) -> Any:
        """A batch created since ``since`` with ``n`` requests that no model has recorded."""
        try:
            page = await self.client.messages.batches.list(limit=20)
        except self._sdk.APIError:
            return None
        known = {row["batch_id"] for row in self.store.batches()}
        for x in page.data:
            total = sum(x.request_counts.model_dump().values())
            if (x.id not in known and total == n
                    and x.created_at.timestamp() >= since - CREATE_WINDOW):
                return x
        return None


def _iso(when: Any) -> str | None:
    return when.isoformat() if when is not None else None


__all__ = ["ENDPOINT", "AnthropicBatchBackend", "AnthropicBatchOptions", "batch_item",
           "iter_batches"]
