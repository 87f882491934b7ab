"""``openai-batch``: the judge at scale through OpenAI's Batch API (half price, 24 h window).

The lifecycle (record on create, poll, collect, resubmit what failed) is
``batch_common.BatchBackend``'s; this module holds OpenAI's calls. Each batch id is recorded
with its input file id and the request keys (``custom_id``) it carries the moment
``POST /v1/batches`` returns. A crash between upload and create leaves an orphan input file:
harmless (batch files expire after 30 days), and the requests are simply submitted again. The
recorded ``status`` of one batch moves like this::

    upload ─► create ─► record: validating ─► in_progress ─► finalizing ─► completed ─┐
                                    │              ├─► (24 h window over) ─► expired ─┤
                                    │              └─► cancelling ─► cancelled ───────┼─► collected
                                    └─► failed (input file rejected) ─────────────────┘

Final batches are downloaded (output and error files, matched by ``custom_id``, order
ignored) and marked ``collected`` with the keys that got no answer (``info.failed_keys``).
Input lines are also valid input for ``vllm run-batch`` (same format,
``url: /v1/chat/completions``).

Options (``OpenAIBatchOptions``; none changes an answer, so keys stay shared with ``openai``):
``poll_interval`` (30 s), ``max_requests_per_file`` (50,000), ``max_bytes_per_file``
(190 MB), ``max_batches_in_flight`` (none; OpenAI caps enqueued tokens per model),
``shard_dir`` (keep each input file for inspection), ``http_retries`` (2), ``upload_timeout``
(900 s), ``max_poll_errors`` (10 failed polls of one batch end a ``wait``), ``wait``,
``tokenizer`` (for ``prefsynth estimate``). A result line of the wrong shape is that
request's error, never an exception.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import orjson
from pydantic import Field

from prefsynth.backends.base import parse_options
from prefsynth.backends.batch_common import Batch, BatchBackend, BatchOptions, batch_rows, pack
from prefsynth.backends.openai_common import api_key, chat_body, result_from_completion
from prefsynth.config import ModelSpec
from prefsynth.core.store import Store
from prefsynth.errors import MissingExtraError
from prefsynth.records import ChatRequest, ChatResult

ENDPOINT: Final = "/v1/chat/completions"
MAX_REQUESTS = 50_000  # OpenAI: requests per input file
MAX_BYTES = 190_000_000  # OpenAI: 200 MB per input file; margin for multipart framing
FINAL = frozenset({"completed", "expired", "failed", "cancelled"})
PROVIDER = "openai"  # info["provider"] of these batches in the shared table
STATUS_FIELDS = ("output_file_id", "error_file_id")


class OpenAIBatchOptions(BatchOptions):
    """``openai-batch`` options: how batches are cut, sent and watched (see the module)."""

    max_requests_per_file: int = Field(MAX_REQUESTS, ge=1)
    max_bytes_per_file: int = Field(MAX_BYTES, ge=1)
    shard_dir: str | None = None
    upload_timeout: float = Field(900.0, gt=0)
    tokenizer: str | None = None  # what ``prefsynth estimate`` counts with


def batch_line(req: ChatRequest) -> bytes:
    """One input line; the body is the live backend's body, byte for byte."""
    line = {"custom_id": req.key, "method": "POST", "url": ENDPOINT, "body": chat_body(req)}
    return orjson.dumps(line) + b"\n"


def iter_shards(requests: Iterable[ChatRequest], max_requests: int, max_bytes: int,
                rejected: dict[str, str]) -> Iterator[tuple[list[str], bytes]]:
    """Yield ``(keys, jsonl)`` input files within the limits, one at a time (``pack``)."""
    return pack(requests, batch_line, max_requests, max_bytes, rejected,
                limit_name="max_bytes_per_file")


def batch_status(store: Store, model_name: str | None = None) -> list[dict[str, Any]]:
    """Per recorded OpenAI batch, what ``prefsynth status`` prints, as last seen (no network)."""
    return batch_rows(store, PROVIDER, model_name, STATUS_FIELDS)


class OpenAIBatchBackend(BatchBackend):
    """``openai-batch`` backend: hand it every open request of one model in one call."""

    key_family = "openai"  # the same body as a live request: switching reuses every answer
    Options = OpenAIBatchOptions
    endpoint_fields = frozenset({"base_url", "api_key_env", "timeout", "max_retries"})
    provider = PROVIDER
    api_name = "Batch API"
    final = FINAL
    status_fields = STATUS_FIELDS

    def __init__(self, spec: ModelSpec, store: Store | None = None) -> None:
        opts = parse_options(OpenAIBatchOptions, spec)
        try:
            import openai
        except ImportError:
            raise MissingExtraError("the openai-batch backend", "openai") from None
        key = api_key(spec)  # fails here, before any work, when the variable is unset
        super().__init__(spec, store, opts, key if spec.api_key_env else None)
        self.max_requests = opts.max_requests_per_file
        self.max_bytes = opts.max_bytes_per_file
        self.shard_dir = Path(opts.shard_dir) if opts.shard_dir else None
        self.upload_timeout = opts.upload_timeout
        self._openai = openai
        self.auth_error = (openai.AuthenticationError, openai.PermissionDeniedError)
        self.api_error = openai.APIError
        self.client = openai.AsyncOpenAI(api_key=key, base_url=spec.base_url,
                                         timeout=spec.timeout, max_retries=self.http_retries)
        # batches.create is not idempotent: retried by hand after checking it did not happen
        self._create_client = self.client.with_options(max_retries=0)

    # ---- polling and collecting --------------------------------------------------------
    async def _retrieve(self, b: Batch) -> tuple[str, dict[str, Any]]:
        obj = await self.client.batches.retrieve(b.id)
        counts = obj.request_counts.model_dump() if obj.request_counts else {}
        errors = [f"{e.code}: {e.message}" + (f" (line {e.line})" if e.line else "")
                  for e in ((obj.errors.data or []) if obj.errors else [])[:5]]
        return str(obj.status), {
            "created_at": obj.created_at, "output_file_id": obj.output_file_id,
            "error_file_id": obj.error_file_id, "request_counts": counts,
            "errors": [self._redact(x) for x in errors]}

    async def _download(self, b: Batch) -> dict[str, ChatResult]:
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
    def _shards(self, requests: Sequence[ChatRequest],
                rejected: dict[str, str]) -> Iterator[tuple[list[str], bytes]]:
        return iter_shards(requests, self.max_requests, self.max_bytes, rejected)

    async def _start(self, n: int, keys: list[str], data: bytes) -> Batch | str:
        """Upload the input file and create the batch on it."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", self.name)
        name = f"{safe}-{int(time.time() * 1000)}-{n:04d}.jsonl"
        if self.shard_dir is not None:
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            (self.shard_dir / name).write_bytes(data)
        try:
            f = await self.client.files.create(file=(name, data, "application/jsonl"),
                                               purpose="batch", timeout=self.upload_timeout)
        except self.auth_error as e:
            raise self._auth(e) from None
        except self._openai.APIError as e:
            return f"batch upload failed: {self._redact(e)}"
        # A crash from here until the batch is recorded leaves an unused input file: harmless.
        try:
            obj = await self._create(f.id)
        except self._openai.APIError as e:
            return f"batch create failed (input file {f.id} left unused): {self._redact(e)}"
        return Batch(obj.id, f.id, keys, obj.status,
                     {"api_status": obj.status, "created_at": obj.created_at, "shard": name})

    async def _create(self, file_id: str) -> Any:
        """``POST /v1/batches``, retried by hand: a timeout or 5xx may hide a batch that was
        created, so look for one on this input file before creating another (no double pay)."""
        oai = self._openai
        for attempt in range(self.http_retries + 1):
            try:
                return await self._create_client.batches.create(
                    input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h")
            except self.auth_error as e:
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


__all__ = ["ENDPOINT", "OpenAIBatchBackend", "OpenAIBatchOptions", "batch_line", "batch_status",
           "iter_shards"]
