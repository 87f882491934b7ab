"""The local executor: runs a stage's requests through backends on one asyncio loop.

It decides *where* requests run, not *what* they are (stages build requests, parse results).
Per backend: requests already answered in the store are skipped; the rest go out in chunks of
``backend.batch_size`` with at most ``backend.max_concurrency`` chunks in flight; answers are
committed from a buffer every ``FLUSH_EVERY`` results or ``FLUSH_SECONDS``, whichever first —
one transaction per group instead of one fsync per request, so a crash loses at most what was
in flight plus under half a second of answers. Pending results
(a Batch API job still running) are not stored: the next run asks again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence

from prefsynth.backends.base import Backend
from prefsynth.core.executor import NoProgress, Progress
from prefsynth.core.store import Store
from prefsynth.errors import PrefsynthError
from prefsynth.records import ChatRequest, ChatResult, StageCounts, Usage

log = logging.getLogger(__name__)

FLUSH_EVERY = 256
FLUSH_SECONDS = 0.5


class _Writer:
    """Buffers results and commits them in groups (the hot path never waits on fsync)."""

    def __init__(self, store: Store, stage: str) -> None:
        self.store, self.stage = store, stage
        self.buf: list[tuple[ChatResult, str]] = []
        self.last = time.monotonic()

    def add(self, result: ChatResult, model: str) -> None:
        self.buf.append((result, model))
        if len(self.buf) >= FLUSH_EVERY or time.monotonic() - self.last >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            self.store.put_many([r for r, _ in self.buf], self.stage, [m for _, m in self.buf])
            self.buf.clear()
        self.last = time.monotonic()


async def _drive(backend: Backend, model: str, todo: list[ChatRequest], writer: _Writer,
                 counts: StageCounts, out: dict[str, ChatResult] | None,
                 progress: Progress) -> None:
    size = max(1, backend.batch_size)
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
    queue: asyncio.Queue[list[ChatRequest]] = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)

    async def worker() -> None:
        while not queue.empty():
            chunk = queue.get_nowait()
            for r in chunk:
                r.materialize()
            try:
                results = await backend.complete(chunk)
            except PrefsynthError:  # the backend cannot work at all (e.g. HTTP 401): stop cleanly
                raise
            except Exception as e:  # a backend bug must not lose the rest of the stage
                log.exception("backend %s failed on a chunk", model)
                results = [ChatResult(r.key, error=f"backend error: {type(e).__name__}: {e}")
                           for r in chunk]
            for r in chunk:
                r.release()
            ok = failed = 0
            usage = Usage()
            for res in results:
                if res.pending:
                    counts.pending += 1
                    continue
                writer.add(res, model)
                if out is not None:
                    out[res.key] = res
                if res.ok:
                    ok += 1
                else:
                    failed += 1
                usage.prompt_tokens += res.usage.prompt_tokens
                usage.completion_tokens += res.usage.completion_tokens
            counts.answered += ok
            counts.failed += failed
            counts.usage.prompt_tokens += usage.prompt_tokens
            counts.usage.completion_tokens += usage.completion_tokens
            progress.advance(ok, failed, usage, model)

    await asyncio.gather(*(worker() for _ in range(max(1, backend.max_concurrency))))


async def run_stage(stage: str, work: Mapping[str, tuple[Backend, Sequence[ChatRequest]]],
                    store: Store, progress: Progress | None = None, *, collect: bool = True
                    ) -> tuple[dict[str, ChatResult], StageCounts]:
    """Answer every request of a stage; returns key -> result (stored or new) and counts.

    ``work`` maps a model name to its backend and requests. Every model's requests run
    concurrently; a key already answered in the store costs nothing. With ``collect=False``
    the results go to the store only and the returned dict is empty: the executor then holds
    memory for the requests in flight and the write buffer, whatever the request count.
    """
    progress = progress or NoProgress()
    counts = StageCounts()
    out: dict[str, ChatResult] = {}
    todo: dict[str, list[ChatRequest]] = {}
    for model, (_backend, reqs) in work.items():
        unique = list({r.key: r for r in reqs}.values())
        counts.total += len(unique)
        answered: set[str] = set()
        for i in range(0, len(unique), 10_000):  # look keys up in slices: bounded memory
            stored = store.get_many(r.key for r in unique[i : i + 10_000])
            for k, res in stored.items():
                if collect:
                    out[k] = res
                if res.ok:
                    counts.cached += 1
                    answered.add(k)
        todo[model] = [r for r in unique if r.key not in answered]
    progress.start(stage, counts.total, counts.cached)
    writer = _Writer(store, stage)
    try:
        await asyncio.gather(*(
            _drive(work[m][0], m, reqs, writer, counts, out if collect else None, progress)
            for m, reqs in todo.items() if reqs
        ))
    finally:
        writer.flush()
        progress.finish()
    return out, counts
