"""``openai-batch``: the judge at scale through OpenAI's Batch API (half price, 24 h window).

A batch outlives the process that submitted it, so its state lives in the ``Store``, not here:
each batch id is recorded with its input file id and the request keys (``custom_id``) it
carries the moment ``POST /v1/batches`` returns, before anything else. A crash after that
point is resumed by polling, never by paying twice. A crash between upload and create leaves
an orphan input file: harmless (batch files expire after 30 days), and the requests are
simply submitted again. The recorded ``status`` of one batch moves like this::

    upload ─► create ─► record: validating ─► in_progress ─► finalizing ─► completed ─┐
                                    │              ├─► (24 h window over) ─► expired ─┤
                                    │              └─► cancelling ─► cancelled ───────┼─► collected
                                    └─► failed (input file rejected) ─────────────────┘

Final batches are downloaded (output and error files, matched by ``custom_id``, order
ignored) and marked ``collected`` with the keys that got no answer (``info.failed_keys``).
The newest batch holding a key decides its fate: not yet collected → ``pending: batch <id>
<status>`` (the executor does not store it and asks again); collected and failed → submitted
in a new batch; collected and answered → downloaded again (only after a crash between
collection and the executor's commit, so answers that were paid for are never lost).

With ``wait`` (``prefsynth run --wait``) ``complete`` polls until every batch is final and
resubmits failed items up to ``spec.max_retries`` rounds. Input lines are also valid input
for ``vllm run-batch`` (same format, ``url: /v1/chat/completions``).

Options (``BatchOptions``; none changes an answer, so keys stay shared with ``openai``):
``poll_interval`` (30 s), ``max_requests_per_file`` (50,000), ``max_bytes_per_file``
(190 MB), ``max_batches_in_flight`` (none; OpenAI caps enqueued tokens per model),
``shard_dir`` (keep each input file for inspection), ``http_retries`` (2), ``upload_timeout``
(900 s), ``max_poll_errors`` (10 failed polls of one batch end a ``wait``), ``wait``,
``tokenizer`` (for ``prefsynth estimate``). A result line of the wrong shape is that
request's error, never an exception.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import orjson
from pydantic import Field

from prefsynth.backends.base import BackendOptions, BaseBackend, ResultSink, parse_options
from prefsynth.backends.openai_common import api_key, chat_body, result_from_completion
from prefsynth.config import ModelSpec
from prefsynth.core.store import Store
from prefsynth.errors import BackendError, MissingExtraError
from prefsynth.records import ChatRequest, ChatResult

log = logging.getLogger(__name__)

ENDPOINT: Final = "/v1/chat/completions"
MAX_REQUESTS = 50_000  # OpenAI: requests per input file
MAX_BYTES = 190_000_000  # OpenAI: 200 MB per input file; margin for multipart framing
FINAL = frozenset({"completed", "expired", "failed", "cancelled"})
COLLECTED = "collected"
PENDING = "pending:"


class BatchOptions(BackendOptions):
    """``openai-batch`` options: how batches are cut, sent and watched (see the module)."""

    poll_interval: float = Field(30.0, gt=0)
    max_requests_per_file: int = Field(MAX_REQUESTS, ge=1)
    max_bytes_per_file: int = Field(MAX_BYTES, ge=1)
    max_batches_in_flight: int | None = Field(None, ge=1)
    shard_dir: str | None = None
    http_retries: int = Field(2, ge=0)
    upload_timeout: float = Field(900.0, gt=0)
    max_poll_errors: int = Field(10, ge=1)
    wait: bool = False
    tokenizer: str | None = None  # what ``prefsynth estimate`` counts with


def batch_line(req: ChatRequest) -> bytes:
    """One input line; the body is the live backend's body, byte for byte."""
    line = {"custom_id": req.key, "method": "POST", "url": ENDPOINT, "body": chat_body(req)}
    return orjson.dumps(line) + b"\n"


def iter_shards(requests: Iterable[ChatRequest], max_requests: int, max_bytes: int,
                too_big: list[str]) -> Iterator[tuple[list[str], bytes]]:
    """Yield ``(keys, jsonl)`` input files within the limits, one at a time: a judge run of
    millions of requests never holds more than one file's bytes. Keys of requests that alone
    exceed ``max_bytes`` are appended to ``too_big``."""
    keys: list[str] = []
    lines: list[bytes] = []
    size = 0
    for req in requests:
        line = batch_line(req)
        if len(line) > max_bytes:
            too_big.append(req.key)
            continue
        if keys and (len(keys) >= max_requests or size + len(line) > max_bytes):
            yield keys, b"".join(lines)
            keys, lines, size = [], [], 0
        keys.append(req.key)
        lines.append(line)
        size += len(line)
    if keys:
        yield keys, b"".join(lines)


@dataclass(slots=True)
class _Batch:
    id: str
    input_file_id: str | None
    keys: list[str]
    status: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def live(self) -> bool:
        return self.status not in FINAL and self.status != COLLECTED


def batch_status(store: Store, model_name: str | None = None) -> list[dict[str, Any]]:
    """Per recorded batch, what ``prefsynth status`` prints, as last seen (no network)."""
    rows = []
    for b in store.batches(model=model_name):
        info = b["info"]
        rows.append({
            "batch_id": b["batch_id"], "model": b["model"], "status": b["status"],
            "api_status": info.get("api_status", b["status"]), "requests": len(b["keys"]),
            "request_counts": info.get("request_counts") or {},
            "failed": len(info.get("failed_keys") or []), "created": b["created"],
            "updated": b["updated"], "input_file_id": b["input_file_id"],
            "output_file_id": info.get("output_file_id"),
            "error_file_id": info.get("error_file_id"), "errors": info.get("errors") or [],
        })
    return rows


class OpenAIBatchBackend(BaseBackend):
    """``openai-batch`` backend: hand it every open request of one model in one call."""

    batch_size = 10**9  # the executor passes everything at once: one file set per run
    max_concurrency = 1
    batch_pricing = True
    costly_shards = True  # one batch job (and its wait) per shard
    key_family = "openai"  # the same body as a live request: switching reuses every answer
    Options = BatchOptions
    endpoint_fields = frozenset({"base_url", "api_key_env", "timeout", "max_retries"})
    #: its jobs are recorded in the driver's store, and a job already runs on the provider's
    #: machines: under ``executor: ray`` it stays on the driver
    shippable = False

    @classmethod
    def store_status(cls, store: Store) -> list[dict[str, Any]]:
        return batch_status(store)

    def __init__(self, spec: ModelSpec, store: Store | None = None) -> None:
        opts = parse_options(BatchOptions, spec)
        try:
            import openai
        except ImportError:
            raise MissingExtraError("the openai-batch backend", "openai") from None
        self.name = spec.name
        self.spec = spec
        self.wait = opts.wait
        self.poll_interval = opts.poll_interval
        self.max_requests = opts.max_requests_per_file
        self.max_bytes = opts.max_bytes_per_file
        self.max_in_flight = opts.max_batches_in_flight
        self.shard_dir = Path(opts.shard_dir) if opts.shard_dir else None
        self.http_retries = opts.http_retries
        self.upload_timeout = opts.upload_timeout
        self.max_poll_errors = opts.max_poll_errors
        self._openai = openai
        #: HTTP 401 and 403: no request can succeed, the run stops (``BackendError``)
        self._refused = (openai.AuthenticationError, openai.PermissionDeniedError)
        key = api_key(spec)  # fails here, before any work, when the variable is unset
        self._secret = key if spec.api_key_env else None
        self.client = openai.AsyncOpenAI(api_key=key, base_url=spec.base_url,
                                         timeout=spec.timeout, max_retries=self.http_retries)
        # batches.create is not idempotent: retried by hand after checking it did not happen
        self._create_client = self.client.with_options(max_retries=0)
        if store is None:
            log.warning("openai-batch %s: no store given; batch ids are kept in memory only, "
                        "so a crash loses track of submitted batches", spec.name)
            store = Store(":memory:")
        self.store = store
        self._batches: dict[str, _Batch] = {}
        self._owner: dict[str, _Batch] = {}  # requested key -> newest batch holding it
        self._poll_errors: dict[str, int] = {}
        self._stuck = False  # a batch could not be polled max_poll_errors times in a row

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
        return [done.get(r.key) or ChatResult.waiting(r.key, waiting.get(r.key, f"{PENDING} "
                "not submitted")) for r in requests]

    async def aclose(self) -> None:
        await self.client.close()

    # ---- state -------------------------------------------------------------------------
    def _load(self, wanted: Iterable[str]) -> None:
        """Read this model's batches once per call (one process owns a store at a time)."""
        want = set(wanted)
        self._batches = {}
        self._owner = {}
        for row in self.store.batches(model=self.spec.name):  # oldest first: newest wins
            b = _Batch(row["batch_id"], row["input_file_id"], row["keys"], row["status"],
                       row["info"])
            self._batches[b.id] = b
            for k in b.keys:
                if k in want:
                    self._owner[k] = b

    def _save(self, b: _Batch) -> None:
        self.store.record_batch(b.id, self.spec.name, b.input_file_id, b.keys, b.status, b.info)

    def _redact(self, err: object) -> str:
        """An error message safe to store: the key never appears, however a server echoes it."""
        text = str(err)
        if self._secret:
            text = text.replace(self._secret, "***")
        return text[:300]

    def _auth(self, err: Exception) -> BackendError:
        status = getattr(err, "status_code", None)
        return BackendError(f"{self.spec.where}: the Batch API refused the key from "
                            f"{self.spec.api_key_env} (HTTP {status}, {type(err).__name__})")

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

        async def visit(b: _Batch, keys: list[str]) -> None:
            async with gate:
                if b.status == COLLECTED:
                    await self._recover(b, keys, collected)
                    return
                results: dict[str, ChatResult] = {}
                try:
                    obj = await self.client.batches.retrieve(b.id)
                    self._observe(b, obj)
                    if obj.status in FINAL:
                        results = await self._download(b)
                except self._refused as e:
                    raise self._auth(e) from None
                except self._openai.APIError as e:
                    n = self._poll_errors[b.id] = self._poll_errors.get(b.id, 0) + 1
                    why = f"{PENDING} batch {b.id} {b.status} (poll failed: {self._redact(e)})"
                    waiting.update(dict.fromkeys(keys, why))
                    self._stuck = self._stuck or n >= self.max_poll_errors
                    return
                self._poll_errors.pop(b.id, None)
                if obj.status not in FINAL:
                    waiting.update(dict.fromkeys(keys, f"{PENDING} batch {b.id} {obj.status}"))
                    return
                b.info["failed_keys"] = [k for k in b.keys if not results[k].ok]
                b.status = COLLECTED
                self._save(b)
                log.info("openai-batch %s: batch %s %s, %d answered, %d failed", self.name, b.id,
                         obj.status, len(b.keys) - len(b.info["failed_keys"]),
                         len(b.info["failed_keys"]))
                collected.update({k: results[k] for k in keys})

        await asyncio.gather(*(visit(self._batches[bid], ks) for bid, ks in groups.items()))
        return collected, waiting

    async def _recover(self, b: _Batch, keys: list[str], out: dict[str, ChatResult]) -> None:
        """Keys of a collected batch asked for again: failed ones are left for resubmission;
        answered ones were lost in a crash before the executor's commit — download again."""
        failed = set(b.info.get("failed_keys") or [])
        again = [k for k in keys if k not in failed]
        if not again:
            return
        try:
            results = await self._download(b)
        except self._openai.APIError as e:  # files gone (30-day expiry): submit again
            log.warning("openai-batch %s: cannot re-read batch %s: %s", self.name, b.id,
                        self._redact(e))
            return
        out.update({k: results[k] for k in again if results[k].ok})

    def _observe(self, b: _Batch, obj: Any) -> None:
        """Record what a retrieve says; written to the store only when something changed."""
        counts = obj.request_counts.model_dump() if obj.request_counts else {}
        errors = [f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "")
                  for e in ((obj.errors.data or []) if obj.errors else [])[:5]]
        before = (b.status, b.info.get("request_counts"))
        b.info.update(api_status=obj.status, created_at=obj.created_at,
                      output_file_id=obj.output_file_id, error_file_id=obj.error_file_id,
                      request_counts=counts, errors=[self._redact(x) for x in errors])
        b.status = obj.status
        if (b.status, counts) != before:
            self._save(b)

    async def _download(self, b: _Batch) -> dict[str, ChatResult]:
        """Every key of a final batch: its output or error line, else why it has none.
        Files are streamed line by line: an output file can be hundreds of megabytes."""
        wanted = set(b.keys)
        out: dict[str, ChatResult] = {}
        for fid in (b.info.get("output_file_id"), b.info.get("error_file_id")):
            if not fid:
                continue
            async with self.client.files.with_streaming_response.content(fid) as resp:
                async for raw in resp.iter_lines():
                    try:
                        line = orjson.loads(raw)
                        cid = line["custom_id"]
                    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
                        continue  # blank or foreign line
                    if not isinstance(cid, str):
                        continue
                    if cid in wanted and not (cid in out and out[cid].ok):
                        out[cid] = self._line_result(cid, line)
        status = b.info.get("api_status", b.status)
        if status == "failed":
            why = "; ".join(b.info.get("errors") or []) or "no reason given"
            missing = f"batch failed: {why} (batch {b.id})"
        elif status == "completed":
            missing = f"batch completed without a result for this request (batch {b.id})"
        else:
            missing = f"batch {status} before this request ran (batch {b.id})"
        return {k: out.get(k) or ChatResult(k, error=missing) for k in b.keys}

    def _line_result(self, key: str, line: dict[str, Any]) -> ChatResult:
        err = line.get("error")
        if err:
            code = err.get("code") if isinstance(err, dict) else None
            msg = err.get("message") if isinstance(err, dict) else err
            return ChatResult(key, error=self._redact(f"batch item error {code}: {msg}"))
        resp = line.get("response")
        if not isinstance(resp, dict):
            return ChatResult(key, error=self._redact(
                f"malformed completion payload: batch line {str(line)[:200]}"))
        body = resp.get("body") or {}
        status = resp.get("status_code")
        if status != 200:
            detail = body.get("error", body) if isinstance(body, dict) else body
            if isinstance(detail, dict):
                detail = detail.get("message", detail)
            return ChatResult(key, error=self._redact(f"HTTP {status}: {detail}"))
        res = result_from_completion(key, body)
        if res.error is not None:
            res.error = self._redact(res.error)
        return res

    # ---- submitting --------------------------------------------------------------------
    async def _submit(self, requests: Sequence[ChatRequest]) -> dict[str, ChatResult]:
        """Shard, upload and create batches for ``requests``: a pending result per key, or
        an error where submission failed (the executor stores it; the next run retries)."""
        out: dict[str, ChatResult] = {}
        if not requests:
            return out
        too_big: list[str] = []
        for n, (keys, data) in enumerate(
                iter_shards(requests, self.max_requests, self.max_bytes, too_big)):
            live = sum(b.live for b in self._batches.values())
            if self.max_in_flight is not None and live >= self.max_in_flight:
                break
            out.update(await self._submit_one(n, keys, data))
        for k in too_big:
            out[k] = ChatResult(k, error=f"request larger than max_bytes_per_file "
                                         f"({self.max_bytes} bytes) cannot go in a batch")
        queued = (f"{PENDING} queued locally, {self.max_in_flight} batches in flight "
                  f"(max_batches_in_flight)")
        for r in requests:
            out.setdefault(r.key, ChatResult.waiting(r.key, queued))
        return out

    async def _submit_one(self, n: int, keys: list[str], data: bytes) -> dict[str, ChatResult]:
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", self.name)
        name = f"{safe}-{int(time.time() * 1000)}-{n:04d}.jsonl"
        if self.shard_dir is not None:
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            (self.shard_dir / name).write_bytes(data)
        try:
            f = await self.client.files.create(file=(name, data, "application/jsonl"),
                                               purpose="batch", timeout=self.upload_timeout)
        except self._refused as e:
            raise self._auth(e) from None
        except self._openai.APIError as e:
            return {k: ChatResult(k, error=f"batch upload failed: {self._redact(e)}")
                    for k in keys}
        # A crash from here until record_batch leaves an unused input file: harmless.
        try:
            obj = await self._create(f.id)
        except self._openai.APIError as e:
            why = f"batch create failed (input file {f.id} left unused): {self._redact(e)}"
            return {k: ChatResult(k, error=why) for k in keys}
        b = _Batch(obj.id, f.id, keys, obj.status,
                   {"api_status": obj.status, "created_at": obj.created_at, "shard": name})
        self._save(b)  # first thing after create: from now on a crash resumes by polling
        self._batches[b.id] = b
        self._owner.update(dict.fromkeys(keys, b))
        log.info("openai-batch %s: submitted batch %s (%d requests, %s)", self.name, b.id,
                 len(keys), name)
        return {k: ChatResult.waiting(k, f"{PENDING} batch {b.id} {b.status}") for k in keys}

    async def _create(self, file_id: str) -> Any:
        """``POST /v1/batches``, retried by hand: a timeout or 5xx may hide a batch that was
        created, so look for one on this input file before creating another (no double pay)."""
        oai = self._openai
        for attempt in range(self.http_retries + 1):
            try:
                return await self._create_client.batches.create(
                    input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h")
            except self._refused as e:
                raise self._auth(e) from None
            except (oai.APIConnectionError, oai.InternalServerError, oai.RateLimitError):
                try:
                    page = await self.client.batches.list(limit=100)
                    found = next((x for x in page.data if x.input_file_id == file_id), None)
                except oai.APIError:
                    found = None
                if found is not None:
                    return found
                if attempt == self.http_retries:
                    raise
                await asyncio.sleep(min(2.0**attempt, self.poll_interval))
        raise AssertionError("unreachable")


__all__ = ["ENDPOINT", "OpenAIBatchBackend", "batch_line", "batch_status", "iter_shards"]
