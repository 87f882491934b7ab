"""The local executor's streaming side: requests submitted one by one, answers handed back one by one.

``run_stage`` answers a whole stage and returns; a ``Feed`` stays open for a run. The
streaming pipeline (``core.stream``) submits a prompt's requests as soon as they can be built
(a prompt's judge requests once its generations are in), and each answer comes back through
the callback given with its request the moment the backend has it, while other requests are
still in flight: no stage waits for the slowest request of the one before.

What ``run_stage`` guarantees holds here too: a key answered in the store is never asked
again (it is handed back at once); every answer is committed in groups, by count and by a
timer every ``TICK_SECONDS``; a backend bug on a chunk becomes that chunk's errors, a
``PrefsynthError`` (HTTP 401) stops the feed and is raised to whoever waits on it. Each model
(lane) keeps its ``batch_size`` / ``max_concurrency``; queued requests of an older shard
(a lower ``priority``) go out first. A lane bounds the requests it has in flight, to
``batch_size``, not its ``complete`` calls: a backend that ``streams`` answers each request
on its own, and a slot freed by one answer is filled at once, so more would only wait in the
backend (an HTTP backend's ``batch_size`` is twice its connections; ``run_stage``'s 8x that
parks hundreds of requests, their rendered messages held, on its semaphore).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prefsynth.backends.base import Backend
from prefsynth.core.executor import Progress
from prefsynth.core.executor.local import TICK_SECONDS, ResultWriter, Tally, ask_chunk, tally
from prefsynth.core.store import Store
from prefsynth.errors import PrefsynthError
from prefsynth.records import ChatRequest, ChatResult, StageCounts

#: takes a request and its final result (stored, answered, failed or pending)
Deliver = Callable[[ChatRequest, ChatResult], None]


@dataclass(slots=True)
class _Ask:
    """One key in the feed: who waits for it, where it is counted and stored."""

    model: str
    stage: str
    counts: StageCounts
    waiters: list[tuple[ChatRequest, Deliver]]
    stored: ChatResult | None = None  # a stored failure, asked again


@dataclass(slots=True)
class Submission:
    """Requests for one model and stage: where they are counted, who takes their answers,
    and their ``priority`` in the model's queue (lower goes first)."""

    model: str
    backend: Backend
    stage: str
    reqs: Sequence[ChatRequest]
    counts: StageCounts
    deliver: Deliver
    priority: int = 0


@dataclass(slots=True)
class _Lane:
    """One model's queue (by priority) and the chunks it has in flight."""

    backend: Backend
    capacity: int  # requests in flight at most: ``batch_size``
    queues: dict[int, deque[ChatRequest]] = field(default_factory=dict)
    size: int = 0
    inflight: int = 0
    scheduled: bool = False  # a dispatch is due on the next turn of the loop
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def put(self, priority: int, reqs: Sequence[ChatRequest]) -> None:
        self.queues.setdefault(priority, deque()).extend(reqs)
        self.size += len(reqs)

    def take(self, n: int) -> list[ChatRequest]:
        out: list[ChatRequest] = []
        for p in sorted(self.queues):
            q = self.queues[p]
            while q and len(out) < n:
                out.append(q.popleft())
            if not q:
                del self.queues[p]
            if len(out) == n:
                break
        self.size -= len(out)
        return out


class Feed:
    """Requests in, answers out, for the whole run (``async with``). ``changed`` is set
    whenever an answer is handed back, a lane's queue shrinks, or the feed fails."""

    def __init__(self, store: Store, progress: Progress) -> None:  # on the running loop
        self.store, self.progress = store, progress
        self.lanes: dict[str, _Lane] = {}
        self.asks: dict[str, _Ask] = {}
        self.error: BaseException | None = None
        self.changed = asyncio.Event()
        self._writer = ResultWriter(store)
        self._started: dict[str, list[int]] = {}  # stage -> [total, done] not yet shown
        self._unreported: dict[tuple[str, str], Tally] = {}
        self._ticker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Feed:
        self._ticker = asyncio.create_task(self._tick_forever())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def backlog(self, model: str) -> int:
        """Requests of ``model`` queued and not yet handed to its backend."""
        lane = self.lanes.get(model)
        return lane.size if lane else 0

    def submit(self, model: str, backend: Backend, stage: str, reqs: Sequence[ChatRequest],
               counts: StageCounts, deliver: Deliver, priority: int = 0) -> None:
        """Queue ``reqs`` for ``model``; stored answers are handed to ``deliver`` at once,
        before this returns. A key already in the feed is asked once and handed to both."""
        self.submit_many([Submission(model, backend, stage, reqs, counts, deliver, priority)])

    def submit_many(self, subs: Sequence[Submission]) -> None:
        """``submit`` for several groups, with one store look-up for all of them."""
        fresh: dict[str, _Ask] = {}
        for sub in subs:
            for r in sub.reqs:
                ask = self.asks.get(r.key) or fresh.get(r.key)
                if ask is not None:
                    ask.waiters.append((r, sub.deliver))
                    if ask.counts is not sub.counts:  # another stage's key (twin judges):
                        sub.counts.total += 1  # answered once, as the staged path's
                        sub.counts.cached += 1  # second stage finds it in the store
                else:
                    fresh[r.key] = _Ask(sub.model, sub.stage, sub.counts, [(r, sub.deliver)])
        if not fresh:
            return
        stored = self.store.get_many(fresh)
        lanes: dict[str, tuple[_Lane, int]] = {}
        for sub in subs:
            lanes.setdefault(sub.model, (self._lane(sub.model, sub.backend), sub.priority))
        for key, ask in fresh.items():
            ask.counts.total += 1
            started = self._started.setdefault(ask.stage, [0, 0])
            started[0] += 1
            res = stored.get(key)
            if res is not None and res.ok:
                ask.counts.cached += 1
                started[1] += 1
                for req, deliver in ask.waiters:
                    deliver(req, res)
                continue
            ask.stored = res
            self.asks[key] = ask
            lane, priority = lanes[ask.model]
            lane.put(priority, [ask.waiters[0][0]])
        for lane, _ in lanes.values():
            if lane.size:
                self._kick(lane)

    def _lane(self, model: str, backend: Backend) -> _Lane:
        lane = self.lanes.get(model)
        if lane is None:
            lane = self.lanes[model] = _Lane(backend, max(1, backend.batch_size))
        return lane

    def _kick(self, lane: _Lane) -> None:
        """Dispatch on the loop's next turn: answers that arrive together free their slots
        together, and their successors go out as one chunk."""
        if not lane.scheduled and self.error is None:
            lane.scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch, lane)

    def _dispatch(self, lane: _Lane) -> None:
        """Hand queued requests over while fewer than ``capacity`` are in flight: a slot
        freed by one answer is filled at once, not when the slowest request of its chunk is
        back."""
        lane.scheduled = False
        if self.error is not None:
            return
        size = max(1, lane.backend.batch_size)
        while lane.size and lane.inflight < lane.capacity:
            chunk = lane.take(min(size, lane.capacity - lane.inflight))
            lane.inflight += len(chunk)
            task = asyncio.create_task(self._send(lane, chunk))
            lane.tasks.add(task)
            task.add_done_callback(lane.tasks.discard)
        self.changed.set()  # room in the queue: the pipeline may build more

    async def _send(self, lane: _Lane, chunk: list[ChatRequest]) -> None:
        try:
            results = await ask_chunk(lane.backend, chunk, self._take)
        except PrefsynthError as e:  # the backend cannot work at all: stop the feed
            self._fail(e)
            return
        for res in results:
            self._take(res)

    def _take(self, res: ChatResult) -> None:
        """One final result, at most once per key (a backend may stream it and return it)."""
        ask = self.asks.pop(res.key, None)
        if ask is None:
            return
        lane = self.lanes[ask.model]
        lane.inflight -= 1
        if lane.size:
            self._kick(lane)
        counts = ask.counts
        if res.pending:
            counts.pending += 1
            res = ask.stored or res  # what run_stage hands back: the stored failure
        else:
            self._writer.add(res, ask.stage, ask.model)
            where = (ask.stage, ask.model)
            self._unreported[where] = tally(counts, self._unreported.get(where), res)
        for req, deliver in ask.waiters:
            deliver(req, res)
        self.changed.set()

    def _fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
        for lane in self.lanes.values():
            for t in lane.tasks:
                if t is not asyncio.current_task():
                    t.cancel()
        self.changed.set()

    def check(self) -> None:
        """Raise the error that stopped the feed, if any."""
        if self.error is not None:
            raise self.error

    def flush(self) -> None:
        """Commit what came in, one transaction per stage."""
        self._writer.flush()

    def report(self) -> None:
        """Show progress: bars grow by what was submitted, then advance by what came in."""
        for stage, (total, done) in self._started.items():
            self.progress.start(stage, total, done)
        self._started.clear()
        for (stage, model), (ok, failed, usage) in self._unreported.items():
            self.progress.start(stage, 0, 0)  # the bar ``advance`` adds to
            self.progress.advance(ok, failed, usage, model)
        self._unreported.clear()

    def tick(self) -> None:
        self.flush()
        self.report()

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            self.tick()

    async def aclose(self) -> None:
        """Stop every worker and the ticker; commit what arrived before the end."""
        tasks = [t for lane in self.lanes.values() for t in lane.tasks]
        if self._ticker is not None:
            tasks.append(self._ticker)
        for t in tasks:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        self.tick()
        self.progress.finish()
