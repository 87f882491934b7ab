"""The local executor: runs a stage's requests through backends on one asyncio loop.

It decides *where* requests run, not *what* they are (stages build requests, parse results).
Per backend: requests already answered in the store are skipped; the rest go out in chunks of
``backend.batch_size`` with at most ``backend.max_concurrency`` chunks in flight. Each result
is taken as it arrives (a backend hands it to ``on_result`` before its chunk is done) into a
buffer committed every ``FLUSH_EVERY`` results, and by a timer every ``TICK_SECONDS`` when
answers trickle in: one transaction per group instead of one fsync per request, and a run
killed at any moment loses only what was in flight plus under ``FLUSH_SECONDS`` of answers.
Pending results (a Batch API job still running) are not stored: the next run asks again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence

from prefsynth.backends.base import Backend, ResultSink
from prefsynth.core.executor import NoProgress, Progress
from prefsynth.core.store import Store
from prefsynth.errors import PrefsynthError
from prefsynth.records import ChatRequest, ChatResult, StageCounts, Usage

log = logging.getLogger(__name__)

FLUSH_EVERY = 256
#: the longest an answer the client holds waits before it is committed
FLUSH_SECONDS = 0.5
TICK_SECONDS = FLUSH_SECONDS / 2


#: a model's answers and failures not yet shown by ``Progress``, and their token usage
Tally = tuple[int, int, Usage]


def tally(counts: StageCounts, unreported: Tally | None, res: ChatResult) -> Tally:
    """Count one answered or failed result in its stage's ``counts`` and in the tally not yet
    reported (both executors' local sides keep the two the same way)."""
    ok, failed, usage = unreported or (0, 0, Usage())
    if res.ok:
        counts.answered += 1
        ok += 1
    else:
        counts.failed += 1
        failed += 1
    for u in (usage, counts.usage):
        u.prompt_tokens += res.usage.prompt_tokens
        u.completion_tokens += res.usage.completion_tokens
    return ok, failed, usage


class ResultWriter:
    """Buffers results and commits them in groups, one transaction per stage (the hot path
    never waits on fsync): by count, and by time once ``FLUSH_SECONDS`` have passed."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.buf: list[tuple[ChatResult, str, str]] = []
        self.last = time.monotonic()

    def add(self, result: ChatResult, stage: str, model: str) -> None:
        self.buf.append((result, stage, model))
        if len(self.buf) >= FLUSH_EVERY or time.monotonic() - self.last >= FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            by_stage: dict[str, list[tuple[ChatResult, str]]] = {}
            for res, stage, model in self.buf:
                by_stage.setdefault(stage, []).append((res, model))
            for stage, rows in by_stage.items():
                self.store.put_many([r for r, _ in rows], stage, [m for _, m in rows])
            self.buf.clear()
        self.last = time.monotonic()


async def ask_chunk(backend: Backend, chunk: list[ChatRequest], on_result: ResultSink
                    ) -> list[ChatResult]:
    """One ``complete`` call with its lazy requests rendered just for it. A backend bug
    becomes an error for each request of the chunk (it must not lose the rest of the run);
    a ``PrefsynthError`` (HTTP 401: the backend cannot work at all) is raised."""
    for r in chunk:
        r.materialize()
    try:
        results = await backend.complete(chunk, on_result=on_result)
    except PrefsynthError:
        raise
    except Exception as e:
        log.exception("backend %s failed on a chunk", backend.name)
        results = [ChatResult(r.key, error=f"backend error: {type(e).__name__}: {e}")
                   for r in chunk]
    for r in chunk:
        r.release()
    return results


class _Stage:
    """One stage's bookkeeping: every result goes through ``take`` exactly once, whether a
    backend streamed it or returned it; ``tick`` commits and reports what has come in."""

    def __init__(self, stage: str, writer: ResultWriter, counts: StageCounts,
                 out: dict[str, ChatResult] | None, progress: Progress) -> None:
        self.stage, self.writer, self.counts = stage, writer, counts
        self.out, self.progress = out, progress
        #: model -> (ok, failed, usage) not yet shown by ``progress``
        self.unreported: dict[str, Tally] = {}

    def take(self, res: ChatResult, model: str) -> None:
        counts = self.counts
        if res.pending:
            counts.pending += 1
            return
        self.writer.add(res, self.stage, model)
        if self.out is not None:
            self.out[res.key] = res
        self.unreported[model] = tally(counts, self.unreported.get(model), res)

    def sink(self, model: str) -> ResultSink:
        """What one chunk's results go through: ``take`` once per key, whether the backend
        streamed a result, returned it, or both (its own set: a late hand-over from a
        backend's thread cannot be confused with the next chunk's)."""
        seen: set[str] = set()

        def sink(res: ChatResult) -> None:
            if res.key not in seen:
                seen.add(res.key)
                self.take(res, model)

        return sink

    def report(self) -> None:
        for model, (ok, failed, usage) in self.unreported.items():
            self.progress.advance(ok, failed, usage, model)
        self.unreported.clear()

    def tick(self) -> None:
        self.writer.flush()
        self.report()

    async def ticker(self) -> None:
        """Commit on a timer: answers that arrive while a chunk's slowest request is still
        out are on disk within ``FLUSH_SECONDS`` even when nothing else arrives."""
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self.tick()


async def _drive(backend: Backend, model: str, todo: list[ChatRequest], stage: _Stage) -> None:
    size = max(1, backend.batch_size)
    chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
    queue: asyncio.Queue[list[ChatRequest]] = asyncio.Queue()
    for c in chunks:
        queue.put_nowait(c)

    async def worker() -> None:
        while not queue.empty():
            chunk = queue.get_nowait()
            sink = stage.sink(model)
            results = await ask_chunk(backend, chunk, sink)  # a 401 stops the stage here
            for res in results:
                sink(res)
            stage.report()

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
    state = _Stage(stage, ResultWriter(store), counts, out if collect else None, progress)
    tasks = [asyncio.create_task(_drive(work[m][0], m, reqs, state))
             for m, reqs in todo.items() if reqs]
    tasks.append(asyncio.create_task(state.ticker()))
    try:
        await asyncio.gather(*tasks[:-1])
    finally:
        for t in tasks:  # the ticker; on an error, every other model's requests too
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        state.tick()  # whatever arrived before the end (or the error) is committed
        progress.finish()
    return out, counts
