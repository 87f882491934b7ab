"""``anthropic-batch``: Claude at scale through the Message Batches API (half price, 24 h).

The lifecycle of ``openai-batch``, on Anthropic's API: a batch carries its requests inline
(``POST /v1/messages/batches``, each ``{"custom_id": key, "params": <the live body>}``), so
there is no file to upload. Its id is recorded in the ``Store`` with the keys it carries the
moment create returns, before anything else: a crash after that point is resumed by polling,
never by paying twice. The recorded ``status`` of one batch moves like this::

    create ─► record: in_progress ─► (canceling) ─► ended ─► collected

An ended batch's results (JSONL, matched by ``custom_id``, order ignored) are read and the batch
marked ``collected`` with the keys that got no answer (``info.failed_keys``): ``errored``,
``expired`` (not run within 24 h) and ``canceled`` requests, and any the results lack. The
newest batch holding a key decides its fate: not yet collected → ``pending: batch <id>
<status>`` (the executor does not store it and asks again); collected and failed → submitted
alone in a new batch; collected and answered → read again (only after a crash between
collection and the executor's commit, so answers that were paid for are never lost; results
stay downloadable for 29 days).

Create is not idempotent and returns no handle before it succeeds: when it fails in a way
that may hide a created batch (a timeout, a dropped connection, a 5xx), the newest batches
are listed and one created since the attempt, with this many requests and not yet recorded,
is taken as ours instead of creating another.

``run`` returns after submitting; with ``wait`` (``prefsynth run --wait``) ``complete`` polls
until every batch has ended and resubmits failed items up to ``spec.max_retries`` rounds.

Options: ``poll_interval`` (30 s), ``max_requests_per_batch`` (100,000, Anthropic's limit),
``max_bytes_per_batch`` (250 MB; Anthropic: 256 MB), ``max_batches_in_flight`` (none),
``http_retries`` (2, the SDK's retries of retrieve/list/results), ``create_timeout`` (600 s),
``max_poll_errors`` (10 failed polls of one batch end a ``wait``), ``wait``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from pydantic import BaseModel, ConfigDict, Field

from prefsynth.backends.anthropic_common import (
    api_key,
    check_spec,
    message_body,
    parse_options,
    redact,
    result_from_message,
)
from prefsynth.backends.base import BaseBackend
from prefsynth.config import ModelSpec
from prefsynth.core.store import Store
from prefsynth.errors import BackendError, MissingExtraError
from prefsynth.records import ChatRequest, ChatResult

log = logging.getLogger(__name__)

ENDPOINT = "/v1/messages/batches"
MAX_REQUESTS = 100_000  # Anthropic: requests per batch
MAX_BYTES = 250_000_000  # Anthropic: 256 MB per batch
PROVIDER = "anthropic"  # info["provider"]: which backend's rows these are in the shared table
ENDED = "ended"
COLLECTED = "collected"
PENDING = "pending:"
#: how far back (seconds) a batch created by a failed-looking create may be found
CREATE_WINDOW = 600.0


class BatchOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    wait: bool = False
    poll_interval: float = Field(30.0, gt=0)
    max_requests_per_batch: int = Field(MAX_REQUESTS, ge=1, le=MAX_REQUESTS)
    max_bytes_per_batch: int = Field(MAX_BYTES, ge=1)
    max_batches_in_flight: int | None = Field(None, ge=1)
    http_retries: int = Field(2, ge=0)
    create_timeout: float = Field(600.0, gt=0)
    max_poll_errors: int = Field(10, ge=1)


def batch_item(req: ChatRequest) -> bytes:
    """One request of a batch; ``params`` is the live backend's body, byte for byte."""
    return orjson.dumps({"custom_id": req.key, "params": message_body(req)})


def iter_batches(requests: Iterable[ChatRequest], max_requests: int, max_bytes: int,
                 rejected: dict[str, str]) -> Iterator[tuple[list[str], bytes]]:
    """Yield ``(keys, create body)`` within the limits, one at a time (a judge run of millions
    of requests never holds more than one batch's bytes). A request that cannot go in a batch
    (larger than ``max_bytes`` alone, or not expressible) is left out, its key and the reason
    put in ``rejected``."""
    head, tail = b'{"requests":[', b"]}"
    keys: list[str] = []
    items: list[bytes] = []
    size = len(head) + len(tail)
    for req in requests:
        try:
            item = batch_item(req)
        except (TypeError, ValueError, KeyError) as e:  # orjson.JSONEncodeError: a TypeError
            rejected[req.key] = f"bad_request: cannot encode request: {e}"
            continue
        if len(item) + len(head) + len(tail) > max_bytes:
            rejected[req.key] = (f"request larger than max_bytes_per_batch ({max_bytes} bytes) "
                                 "cannot go in a batch")
            continue
        if keys and (len(keys) >= max_requests or size + len(item) + 1 > max_bytes):
            yield keys, head + b",".join(items) + tail
            keys, items, size = [], [], len(head) + len(tail)
        keys.append(req.key)
        items.append(item)
        size += len(item) + 1
    if keys:
        yield keys, head + b",".join(items) + tail


@dataclass(slots=True)
class _Batch:
    id: str
    keys: list[str]
    status: str
    info: dict[str, Any] = field(default_factory=dict)


def batch_status(store: Store, model_name: str | None = None) -> list[dict[str, Any]]:
    """Per recorded Anthropic batch, what ``prefsynth status`` prints, as last seen."""
    rows = []
    for b in store.batches(model=model_name):
        info = b["info"]
        if info.get("provider") != PROVIDER:
            continue
        rows.append({
            "batch_id": b["batch_id"], "model": b["model"], "status": b["status"],
            "api_status": info.get("api_status", b["status"]), "requests": len(b["keys"]),
            "request_counts": info.get("request_counts") or {},
            "failed": len(info.get("failed_keys") or []), "created": b["created"],
            "updated": b["updated"], "expires_at": info.get("expires_at"), "errors": [],
        })
    return rows


class AnthropicBatchBackend(BaseBackend):
    """``anthropic-batch`` backend: hand it every open request of one model in one call."""

    batch_size = 10**9  # the executor passes everything at once
    max_concurrency = 1
    batch_pricing: ClassVar[bool] = True
    key_family: ClassVar[str | None] = "anthropic"  # the live body: switching reuses answers
    reproducible: ClassVar[bool] = False

    @classmethod
    def store_status(cls, store: Store) -> list[dict[str, Any]]:
        return batch_status(store)

    def __init__(self, spec: ModelSpec, store: Store | None = None) -> None:
        try:
            import anthropic
        except ImportError:
            raise MissingExtraError("the anthropic-batch backend", "anthropic") from None
        opts = parse_options(spec, BatchOptions)
        check_spec(spec)
        self.name = spec.name
        self.spec = spec
        self.opts = opts
        self.wait = opts.wait
        self.poll_interval = opts.poll_interval
        self._sdk = anthropic
        from anthropic.types.messages import MessageBatch

        self._batch_type = MessageBatch
        self._secret = api_key(spec)  # fails here, before any work, when the variable is unset
        self.client = anthropic.AsyncAnthropic(api_key=self._secret, base_url=spec.base_url,
                                               timeout=spec.timeout,
                                               max_retries=opts.http_retries)
        # create is not idempotent: retried by hand after checking it did not happen
        self._create_client = self.client.with_options(max_retries=0)
        if store is None:
            log.warning("anthropic-batch %s: no store given; batch ids are kept in memory only,"
                        " so a crash loses track of submitted batches", spec.name)
            store = Store(":memory:")
        self.store = store
        self._batches: dict[str, _Batch] = {}
        self._owner: dict[str, _Batch] = {}  # requested key -> newest batch holding it
        self._poll_errors: dict[str, int] = {}
        self._stuck = False  # a batch could not be polled max_poll_errors times in a row

    # ---- the protocol ------------------------------------------------------------------
    async def complete(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        unique = {r.key: r for r in requests}
        self._load(unique)
        done: dict[str, ChatResult] = {}
        waiting: dict[str, str] = {}
        tries = dict.fromkeys(unique, 0)
        self._stuck = False

        def settle(key: str, res: ChatResult) -> None:
            """Keep an answer; with ``wait``, leave a failure open for another round."""
            if res.ok or not self.wait or tries[key] >= self.spec.max_retries:
                res.attempts = tries[key] + 1
                done[key] = res
            else:
                tries[key] += 1

        while True:
            todo = [k for k in unique if k not in done]
            collected, waiting = await self._poll(todo)
            for k, res in collected.items():
                settle(k, res)
            fresh = [unique[k] for k in todo if k not in done and k not in waiting]
            for k, res in (await self._submit(fresh)).items():
                if res.pending:
                    waiting[k] = res.error or "pending"
                else:
                    settle(k, res)
            if not self.wait or len(done) == len(unique) or self._stuck:
                break
            await asyncio.sleep(self.poll_interval)
        return [done.get(r.key) or ChatResult.waiting(
            r.key, waiting.get(r.key, f"{PENDING} not submitted")) for r in requests]

    async def aclose(self) -> None:
        await self.client.close()

    # ---- state -------------------------------------------------------------------------
    def _load(self, wanted: Iterable[str]) -> None:
        """Read this model's batches once per call (one process owns a store at a time)."""
        want = set(wanted)
        self._batches, self._owner = {}, {}
        for row in self.store.batches(model=self.spec.name):  # oldest first: newest wins
            if row["info"].get("provider") != PROVIDER:
                continue
            b = _Batch(row["batch_id"], row["keys"], row["status"], row["info"])
            self._batches[b.id] = b
            for k in b.keys:
                if k in want:
                    self._owner[k] = b

    def _save(self, b: _Batch) -> None:
        self.store.record_batch(b.id, self.spec.name, None, b.keys, b.status, b.info)

    def _redact(self, err: object) -> str:
        """An error message safe to store: the key never appears, however a server echoes it."""
        return redact(str(err), self._secret)[:300]

    def _auth(self, err: Exception) -> BackendError:
        env = self.spec.api_key_env or "ANTHROPIC_API_KEY"
        return BackendError(f"models.{self.spec.name}: the Message Batches API refused the key "
                            f"from {env} ({type(err).__name__})")

    # ---- polling and collecting --------------------------------------------------------
    async def _poll(self, todo: Sequence[str]) -> tuple[dict[str, ChatResult], dict[str, str]]:
        """Visit the batches that hold ``todo``: results of ended ones (now collected) and
        pending messages for live ones. Batches are polled a few at a time."""
        groups: dict[str, list[str]] = {}
        for k in todo:
            if k in self._owner:
                groups.setdefault(self._owner[k].id, []).append(k)
        collected: dict[str, ChatResult] = {}
        waiting: dict[str, str] = {}
        gate = asyncio.Semaphore(8)
        sdk = self._sdk

        async def visit(b: _Batch, keys: list[str]) -> None:
            async with gate:
                if b.status == COLLECTED:
                    await self._recover(b, keys, collected)
                    return
                results: dict[str, ChatResult] = {}
                try:
                    obj = await self.client.messages.batches.retrieve(b.id)
                    self._observe(b, obj)
                    if obj.processing_status == ENDED:
                        results = await self._download(b)
                except sdk.AuthenticationError as e:
                    raise self._auth(e) from None
                except sdk.APIError as e:
                    n = self._poll_errors[b.id] = self._poll_errors.get(b.id, 0) + 1
                    why = f"{PENDING} batch {b.id} {b.status} (poll failed: {self._redact(e)})"
                    waiting.update(dict.fromkeys(keys, why))
                    self._stuck = self._stuck or n >= self.opts.max_poll_errors
                    return
                self._poll_errors.pop(b.id, None)
                if obj.processing_status != ENDED:
                    why = f"{PENDING} batch {b.id} {obj.processing_status}"
                    waiting.update(dict.fromkeys(keys, why))
                    return
                b.info["failed_keys"] = [k for k in b.keys if not results[k].ok]
                b.status = COLLECTED
                self._save(b)
                log.info("anthropic-batch %s: batch %s ended, %d answered, %d failed",
                         self.name, b.id, len(b.keys) - len(b.info["failed_keys"]),
                         len(b.info["failed_keys"]))
                collected.update({k: results[k] for k in keys})

        await asyncio.gather(*(visit(self._batches[bid], ks) for bid, ks in groups.items()))
        return collected, waiting

    async def _recover(self, b: _Batch, keys: list[str], out: dict[str, ChatResult]) -> None:
        """Keys of a collected batch asked for again: failed ones are left for resubmission;
        answered ones were lost in a crash before the executor's commit — read again."""
        failed = set(b.info.get("failed_keys") or [])
        again = [k for k in keys if k not in failed]
        if not again:
            return
        try:
            results = await self._download(b)
        except self._sdk.APIError as e:  # results gone (29 days): submit again
            log.warning("anthropic-batch %s: cannot re-read batch %s: %s", self.name, b.id,
                        self._redact(e))
            return
        out.update({k: results[k] for k in again if results[k].ok})

    def _observe(self, b: _Batch, obj: Any) -> None:
        """Record what a retrieve says; written to the store only when something changed."""
        counts = obj.request_counts.model_dump() if obj.request_counts else {}
        before = (b.status, b.info.get("request_counts"))
        b.info.update(api_status=obj.processing_status, request_counts=counts,
                      ended_at=_iso(obj.ended_at), expires_at=_iso(obj.expires_at))
        b.status = obj.processing_status
        if (b.status, counts) != before:
            self._save(b)

    async def _download(self, b: _Batch) -> dict[str, ChatResult]:
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
    async def _submit(self, requests: Sequence[ChatRequest]) -> dict[str, ChatResult]:
        """Split into batches and create them: a pending result per key, or an error where
        creation failed (the executor stores it; the next run retries)."""
        out: dict[str, ChatResult] = {}
        if not requests:
            return out
        rejected: dict[str, str] = {}
        cap = self.opts.max_batches_in_flight
        for keys, data in iter_batches(requests, self.opts.max_requests_per_batch,
                                       self.opts.max_bytes_per_batch, rejected):
            live = sum(b.status not in (ENDED, COLLECTED) for b in self._batches.values())
            if cap is not None and live >= cap:
                break
            out.update(await self._submit_one(keys, data))
        for k, why in rejected.items():
            out[k] = ChatResult(k, error=why)
        queued = f"{PENDING} queued locally, {cap} batches in flight (max_batches_in_flight)"
        for r in requests:
            out.setdefault(r.key, ChatResult.waiting(r.key, queued))
        return out

    async def _submit_one(self, keys: list[str], data: bytes) -> dict[str, ChatResult]:
        try:
            obj = await self._create(data, len(keys))
        except self._sdk.APIError as e:
            why = f"batch create failed: {self._redact(e)}"
            return {k: ChatResult(k, error=why) for k in keys}
        b = _Batch(obj.id, keys, obj.processing_status,
                   {"provider": PROVIDER, "api_status": obj.processing_status,
                    "created_at": _iso(obj.created_at), "expires_at": _iso(obj.expires_at)})
        self._save(b)  # first thing after create: from now on a crash resumes by polling
        self._batches[b.id] = b
        self._owner.update(dict.fromkeys(keys, b))
        log.info("anthropic-batch %s: submitted batch %s (%d requests)", self.name, b.id,
                 len(keys))
        return {k: ChatResult.waiting(k, f"{PENDING} batch {b.id} {b.status}") for k in keys}

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
            except sdk.AuthenticationError as e:
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


__all__ = ["ENDPOINT", "AnthropicBatchBackend", "BatchOptions", "batch_item", "batch_status",
           "iter_batches"]
