"""What the Batch API backends (``openai-batch``, ``anthropic-batch``) share: the submit / poll /
collect lifecycle and its crash safety. Each provider supplies its API calls.

A batch outlives the process that submitted it, so its state lives in the ``Store``: the
moment a provider's create call returns, the batch id is recorded with the request keys it
carries, before anything else. A crash after that point is resumed by polling, never by paying
twice. Rows carry ``info.provider``: the batches table is one for every batch backend, and
each reads and lists only its own provider's rows (rows from before the field are OpenAI's).

The newest batch holding a key decides its fate: not yet collected → ``pending: batch <id>
<status>`` (the executor does not store it and asks again); collected and failed → submitted
again in a new batch; collected and answered → its results read again (only after a crash
between collection and the executor's commit, so answers that were paid for are never lost).

``complete`` returns after submitting; with ``wait`` (``prefsynth run --wait``) it polls
until every batch is final and resubmits failed items up to ``spec.max_retries`` rounds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import Field

from prefsynth.backends.base import BackendOptions, BaseBackend, ResultSink
from prefsynth.backends.http_common import redact
from prefsynth.config import ModelSpec
from prefsynth.core.store import Store
from prefsynth.errors import BackendError
from prefsynth.records import ChatRequest, ChatResult

log = logging.getLogger(__name__)

COLLECTED = "collected"
PENDING = "pending:"
#: the provider of a recorded batch without ``info.provider`` (rows written before the field)
LEGACY_PROVIDER = "openai"


class BatchOptions(BackendOptions):
    """Options every batch backend takes: how batches are watched and how many go at once.
    None changes an answer, so a batch backend shares keys with its live backend."""

    wait: bool = False
    poll_interval: float = Field(30.0, gt=0)
    max_batches_in_flight: int | None = Field(None, ge=1)
    http_retries: int = Field(2, ge=0)  # the SDK's retries of the calls that may be repeated
    max_poll_errors: int = Field(10, ge=1)  # failed polls of one batch that end a ``wait``


@dataclass(slots=True)
class Batch:
    """One recorded batch, as the store holds it."""

    id: str
    input_file_id: str | None
    keys: list[str]
    status: str
    info: dict[str, Any] = field(default_factory=dict)


def provider_of(row: dict[str, Any]) -> str:
    return str(row["info"].get("provider") or LEGACY_PROVIDER)


def pack(requests: Iterable[ChatRequest], encode: Callable[[ChatRequest], bytes],
         max_requests: int, max_bytes: int, rejected: dict[str, str], *, limit_name: str,
         head: bytes = b"", sep: bytes = b"", tail: bytes = b"",
         ) -> Iterator[tuple[list[str], bytes]]:
    """Yield ``(keys, head + sep.join(items) + tail)`` within the limits, one at a time: a
    judge run of millions of requests never holds more than one batch's bytes. A request that
    cannot go in a batch (not expressible, or larger than ``max_bytes`` alone) is left out, its
    key and the reason put in ``rejected``."""
    frame = len(head) + len(tail)
    keys: list[str] = []
    items: list[bytes] = []
    size = frame
    for req in requests:
        try:
            item = encode(req)
        except (TypeError, ValueError, KeyError) as e:  # orjson.JSONEncodeError: a TypeError
            rejected[req.key] = f"bad_request: cannot encode request: {e}"
            continue
        if len(item) + frame > max_bytes:
            rejected[req.key] = (f"request larger than {limit_name} ({max_bytes} bytes) "
                                 "cannot go in a batch")
            continue
        if keys and (len(keys) >= max_requests or size + len(item) + len(sep) > max_bytes):
            yield keys, head + sep.join(items) + tail
            keys, items, size = [], [], frame
        keys.append(req.key)
        items.append(item)
        size += len(item) + len(sep)
    if keys:
        yield keys, head + sep.join(items) + tail


def batch_rows(store: Store, provider: str, model_name: str | None = None,
               extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Per recorded batch of ``provider``, what ``prefsynth status`` prints, as last seen (no
    network); ``extra`` names more ``info`` fields to show."""
    rows = []
    for b in store.batches(model=model_name):
        if provider_of(b) != provider:
            continue
        info = b["info"]
        rows.append({
            "batch_id": b["batch_id"], "model": b["model"], "status": b["status"],
            "api_status": info.get("api_status", b["status"]), "requests": len(b["keys"]),
            "request_counts": info.get("request_counts") or {},
            "failed": len(info.get("failed_keys") or []), "created": b["created"],
            "updated": b["updated"], "input_file_id": b["input_file_id"],
            "errors": info.get("errors") or [], **{k: info.get(k) for k in extra},
        })
    return rows


class BatchBackend(BaseBackend):
    """A batch backend: hand it every open request of one model in one call.

    A subclass sets ``self.client`` and the SDK's ``auth_error`` / ``api_error`` classes,
    and implements ``_retrieve``, ``_download``, ``_shards`` and ``_start``.
    """

    batch_size = 10**9  # the executor passes everything at once: one set of batches per run
    max_concurrency = 1
    batch_pricing: ClassVar[bool] = True
    #: one batch job (and its wait) per shard: the automatic shard size leaves the run whole
    costly_shards: ClassVar[bool] = True
    #: its jobs are recorded in the driver's store, and a job already runs on the provider's
    #: machines: under ``executor: ray`` it stays on the driver
    shippable: ClassVar[bool] = False
    #: ``info.provider`` of this backend's batches
    provider: ClassVar[str]
    #: what the provider's API is called in errors and logs
    api_name: ClassVar[str]
    #: API statuses after which a batch's results can be read
    final: ClassVar[frozenset[str]]
    #: ``info`` fields ``prefsynth status`` shows besides the common ones
    status_fields: ClassVar[tuple[str, ...]] = ()
    #: where the key comes from when ``api_key_env`` is not set (``None``: no key)
    default_key_env: ClassVar[str | None] = None

    client: Any
    auth_error: type[Exception] | tuple[type[Exception], ...]  # HTTP 401 and 403: stop the run
    api_error: type[Exception]

    @classmethod
    def store_status(cls, store: Store) -> list[dict[str, Any]]:
        return batch_rows(store, cls.provider, extra=cls.status_fields)

    def __init__(self, spec: ModelSpec, store: Store | None, opts: BatchOptions,
                 secret: str | None) -> None:
        self.name = spec.name
        self.spec = spec
        self.wait = opts.wait
        self.poll_interval = opts.poll_interval
        self.max_in_flight = opts.max_batches_in_flight
        self.http_retries = opts.http_retries
        self.max_poll_errors = opts.max_poll_errors
        self._secret = secret
        if store is None:
            log.warning("%s %s: no store given; batch ids are kept in memory only, so a crash "
                        "loses track of submitted batches", self.kind, spec.name)
            store = Store(":memory:")
        self.store = store
        self._batches: dict[str, Batch] = {}
        self._owner: dict[str, Batch] = {}  # requested key -> newest batch holding it
        self._poll_errors: dict[str, int] = {}
        self._stuck = False  # a batch could not be polled max_poll_errors times in a row

    @property
    def kind(self) -> str:
        """The backend's registered name, for logs."""
        return self.spec.backend

    # ---- provider hooks ----------------------------------------------------------------
    async def _retrieve(self, b: Batch) -> tuple[str, dict[str, Any]]:
        """Ask the API how ``b`` is doing: its API status, and what to record of it in
        ``info`` (``request_counts`` included)."""
        raise NotImplementedError

    async def _download(self, b: Batch) -> dict[str, ChatResult]:
        """Every key of a final batch: its result, else why it has none."""
        raise NotImplementedError

    def _shards(self, requests: Sequence[ChatRequest],
                rejected: dict[str, str]) -> Iterator[tuple[list[str], bytes]]:
        """The requests cut into batches within the provider's limits (``pack``)."""
        raise NotImplementedError

    async def _start(self, n: int, keys: list[str], data: bytes) -> Batch | str:
        """Create the ``n``-th batch of this call: the batch (not yet recorded), or why it
        could not be created."""
        raise NotImplementedError

    # ---- the protocol ------------------------------------------------------------------
    async def complete(self, requests: Sequence[ChatRequest],
                       on_result: ResultSink | None = None) -> list[ChatResult]:
        """With ``wait``, batches finish one by one over hours: each one's results go to
        ``on_result`` as it is collected, not when the last batch is done."""
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
                if on_result is not None:
                    on_result(res)
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
            if provider_of(row) != self.provider:
                continue
            b = Batch(row["batch_id"], row["input_file_id"], row["keys"], row["status"],
                      row["info"])
            self._batches[b.id] = b
            for k in b.keys:
                if k in want:
                    self._owner[k] = b

    def _save(self, b: Batch) -> None:
        self.store.record_batch(b.id, self.spec.name, b.input_file_id, b.keys, b.status, b.info)

    def _live(self, b: Batch) -> bool:
        return b.status not in self.final and b.status != COLLECTED

    def _redact(self, err: object) -> str:
        """An error message safe to store: the key never appears, however a server echoes it."""
        return redact(str(err), self._secret)[:300]

    def _auth(self, err: Exception) -> BackendError:
        env = self.spec.api_key_env or self.default_key_env
        source = f"the key from {env}" if env else "its request (api_key_env is not set)"
        status = getattr(err, "status_code", None)
        return BackendError(f"{self.spec.where}: the {self.api_name} refused {source} "
                            f"(HTTP {status}, {type(err).__name__})")

    # ---- polling and collecting --------------------------------------------------------
    async def _poll(self, todo: Sequence[str]) -> tuple[dict[str, ChatResult], dict[str, str]]:
        """Visit the batches that hold ``todo``: results of final ones (now collected) and
        pending messages for live ones. Batches are polled a few at a time."""
        groups: dict[str, list[str]] = {}
        for k in todo:
            if k in self._owner:
                groups.setdefault(self._owner[k].id, []).append(k)
        collected: dict[str, ChatResult] = {}
        waiting: dict[str, str] = {}
        gate = asyncio.Semaphore(8)

        async def visit(b: Batch, keys: list[str]) -> None:
            async with gate:
                if b.status == COLLECTED:
                    await self._recover(b, keys, collected)
                    return
                results: dict[str, ChatResult] = {}
                try:
                    status = await self._observe(b)
                    if status in self.final:
                        results = await self._download(b)
                except self.auth_error as e:
                    raise self._auth(e) from None
                except self.api_error as e:
                    n = self._poll_errors[b.id] = self._poll_errors.get(b.id, 0) + 1
                    why = f"{PENDING} batch {b.id} {b.status} (poll failed: {self._redact(e)})"
                    waiting.update(dict.fromkeys(keys, why))
                    self._stuck = self._stuck or n >= self.max_poll_errors
                    return
                self._poll_errors.pop(b.id, None)
                if status not in self.final:
                    waiting.update(dict.fromkeys(keys, f"{PENDING} batch {b.id} {status}"))
                    return
                b.info["failed_keys"] = [k for k in b.keys if not results[k].ok]
                b.status = COLLECTED
                self._save(b)
                log.info("%s %s: batch %s %s, %d answered, %d failed", self.kind, self.name,
                         b.id, status, len(b.keys) - len(b.info["failed_keys"]),
                         len(b.info["failed_keys"]))
                collected.update({k: results[k] for k in keys})

        await asyncio.gather(*(visit(self._batches[bid], ks) for bid, ks in groups.items()))
        return collected, waiting

    async def _observe(self, b: Batch) -> str:
        """``_retrieve``, recorded in ``b``; written to the store only when the status or the
        counts changed. Returns the API status."""
        status, info = await self._retrieve(b)
        before = (b.status, b.info.get("request_counts"))
        b.info.update(api_status=status, **info)
        b.status = status
        if (status, b.info.get("request_counts")) != before:
            self._save(b)
        return status

    async def _recover(self, b: Batch, keys: list[str], out: dict[str, ChatResult]) -> None:
        """Keys of a collected batch asked for again: failed ones are left for resubmission;
        answered ones were lost in a crash before the executor's commit — read again."""
        failed = set(b.info.get("failed_keys") or [])
        again = [k for k in keys if k not in failed]
        if not again:
            return
        try:
            results = await self._download(b)
        except self.api_error as e:  # results gone (they expire after a month): submit again
            log.warning("%s %s: cannot re-read batch %s: %s", self.kind, self.name, b.id,
                        self._redact(e))
            return
        out.update({k: results[k] for k in again if results[k].ok})

    # ---- submitting --------------------------------------------------------------------
    async def _submit(self, requests: Sequence[ChatRequest]) -> dict[str, ChatResult]:
        """Cut into batches and create them: a pending result per key, or an error where
        creation failed (the executor stores it; the next run retries)."""
        out: dict[str, ChatResult] = {}
        if not requests:
            return out
        rejected: dict[str, str] = {}
        for n, (keys, data) in enumerate(self._shards(requests, rejected)):
            live = sum(self._live(b) for b in self._batches.values())
            if self.max_in_flight is not None and live >= self.max_in_flight:
                break
            out.update(await self._submit_one(n, keys, data))
        for k, why in rejected.items():
            out[k] = ChatResult(k, error=why)
        queued = (f"{PENDING} queued locally, {self.max_in_flight} batches in flight "
                  f"(max_batches_in_flight)")
        for r in requests:
            out.setdefault(r.key, ChatResult.waiting(r.key, queued))
        return out

    async def _submit_one(self, n: int, keys: list[str], data: bytes) -> dict[str, ChatResult]:
        b = await self._start(n, keys, data)
        if isinstance(b, str):
            return {k: ChatResult(k, error=b) for k in keys}
        b.info["provider"] = self.provider
        self._save(b)  # first thing after create: from now on a crash resumes by polling
        self._batches[b.id] = b
        self._owner.update(dict.fromkeys(keys, b))
        log.info("%s %s: submitted batch %s (%d requests)", self.kind, self.name, b.id,
                 len(keys))
        return {k: ChatResult.waiting(k, f"{PENDING} batch {b.id} {b.status}") for k in keys}


__all__ = ["COLLECTED", "PENDING", "Batch", "BatchBackend", "BatchOptions", "batch_rows",
           "pack", "provider_of"]
