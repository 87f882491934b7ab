"""The streaming shard: each prompt's judge requests go out as soon as its generations are in.

The staged path (``Run._shard``) answers a whole stage before the next starts, so the
backends idle while the last generations come in, while every judge prompt is rendered, and
again while every judgment is parsed. Here a shard is one flow through the executor's
``Feed``: generations of every prompt are submitted at once; the moment a prompt's last
generation is in, its comparisons are made and its first-round judge requests are rendered
(once each: the rendered messages give the key and are sent, then dropped) and queued, as
far as keeps each judge's queue full (``low_water``), no further: only requests near sending
hold their messages. Each judge answer is parsed as it arrives and a re-ask for it (the
rule of ``JudgeRounds``: ``reask_due``) is queued at once. CPU work runs in slices of at most
``SLICE_SECONDS`` between which the event loop sends and receives.

The records are those of the staged path, in the same order, byte for byte: every choice is
seeded per prompt, comparisons and constraints are made per prompt, and the shard's lists
are put together in prompt order when it is complete (then pairs are made). ``stream_shards``
starts shard k+1 as soon as shard k's generations are all in, so no shard boundary leaves
the backends idle either; at most ``MAX_HELD`` shards are held; they are yielded in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections import deque
from collections.abc import AsyncGenerator, Iterator, Sequence
from typing import Any

from prefsynth.backends import Backend
from prefsynth.config import Config, JudgeSpec
from prefsynth.core.executor.feed import Feed, Submission
from prefsynth.core.plan import ShardPlan
from prefsynth.core.summary import summarize
from prefsynth.records import (
    ChatRequest,
    ChatResult,
    Comparison,
    Dropped,
    Generation,
    GenerationTag,
    JudgeTag,
    Judgment,
    Prompt,
    ShardResult,
    StageCounts,
)
from prefsynth.stages.constraints.verifier import verify_constraints
from prefsynth.stages.generate import to_generations
from prefsynth.stages.judge.comparisons import comparisons
from prefsynth.stages.judge.judgments import judge_request, reask_due, stage_of, to_judgment
from prefsynth.stages.pairs import make_pairs

#: the longest stretch of CPU work (parsing, rendering, hashing) before the loop runs again
SLICE_SECONDS = 0.005


def check_constraints(prompts: Sequence[Prompt], generations: Sequence[Generation]
                      ) -> dict[tuple[str, str], list[bool]]:
    """(prompt, model) -> each IFEval check's verdict, for prompts that carry checks."""
    by_id = {p.id: p for p in prompts}
    out: dict[tuple[str, str], list[bool]] = {}
    for g in generations:
        p = by_id[g.prompt_id]
        if p.instruction_ids and g.text is not None:
            out[(g.prompt_id, g.model)] = verify_constraints(g.text, p.instruction_ids,
                                                             p.constraint_kwargs)
    return out


def shard_result(cfg: Config, shard: ShardPlan, gens: list[Generation],
                 comps: list[Comparison], judgments: list[Judgment], dropped: list[Dropped],
                 cons: dict[tuple[str, str], list[bool]], stages: dict[str, StageCounts],
                 reasks: int) -> ShardResult:
    """A shard's records once every answer is in, its pairs made and its summary taken:
    the end of a shard, staged (``Run._shard``) or streamed (``StreamShard``)."""
    pairs, dropped_pairs = make_pairs(shard.prompts, gens, judgments, cfg.pairs, cfg.seed, cons,
                                      skip={d.prompt_id for d in dropped})
    out = ShardResult(shard.prompts, shard.assignment, gens, comps, judgments, pairs,
                      dropped + dropped_pairs, cons)
    out.summary = summarize(out, cfg, stages, reasks,
                            pending=any(c.pending for c in stages.values()))
    return out


def low_water(backend: Backend) -> int:
    """Queued requests that keep a backend busy until the next slice (what the feed has
    in flight for it again: ``batch_size``)."""
    return max(16, backend.batch_size)


def judge_label(cfg: Config, spec: JudgeSpec) -> str:
    """A judge's name in the run's stage counts (``run.json``)."""
    return "judge" if spec is cfg.judge else f"judge:{spec.name}"


class StreamShard:
    """One shard's flow through the feed; ``run`` returns its ``ShardResult``. ``index``
    orders its requests against another shard's in a shared queue (older first)."""

    def __init__(self, cfg: Config, shard: ShardPlan, index: int, feed: Feed,
                 backends: dict[str, Backend]) -> None:
        self.cfg, self.shard, self.index, self.feed, self.backends = cfg, shard, index, feed, backends
        self.prompts = {p.id: p for p in shard.prompts}
        self.gen_reqs: dict[str, list[ChatRequest]] = {p.id: [] for p in shard.prompts}
        for r in shard.requests:
            assert isinstance(r.tag, GenerationTag)
            self.gen_reqs[r.tag.prompt_id].append(r)
        self.left = {pid: len(reqs) for pid, reqs in self.gen_reqs.items()}
        self.gen_left = len(shard.requests)
        self.gens_done = asyncio.Event()  # every generation is in: the next shard may start
        self.results: dict[str, ChatResult] = {}  # generations not yet made records
        self.events: deque[tuple[JudgeSpec | None, ChatRequest, ChatResult]] = deque()
        self.outstanding = 0  # submitted requests not yet taken from ``events``
        self.ready: dict[str, deque[str]] = {j.name: deque() for j in cfg.judges}
        self.gens: dict[str, list[Generation]] = {}
        self.comps: dict[str, list[Comparison]] = {}
        self.dropped: dict[str, list[Dropped]] = {}
        self.cons: dict[str, dict[tuple[str, str], list[bool]]] = {}
        self.by_comp: dict[tuple[str, int], Comparison] = {}
        self.final: dict[str, dict[tuple[str, str, int], Judgment]] = {j.name: {} for j in cfg.judges}
        self.reasks = 0
        #: (model, stage) -> requests, counts, judge: what goes to the feed at the slice's end
        self._batch: dict[tuple[str, str], tuple[list[ChatRequest], StageCounts,
                                                 JudgeSpec | None]] = {}
        self.stages = {"generate": StageCounts()}
        self.stages.update({judge_label(cfg, j): StageCounts() for j in cfg.judges})

    def _deliver(self, spec: JudgeSpec | None, req: ChatRequest, res: ChatResult) -> None:
        self.events.append((spec, req, res))
        self.feed.changed.set()

    def _ask(self, name: str, stage: str, reqs: list[ChatRequest], counts: StageCounts,
             spec: JudgeSpec | None) -> None:
        """Queue ``reqs`` for the feed; they go in at the end of the slice, with one store
        look-up for the slice instead of one per prompt."""
        self.outstanding += len(reqs)
        batch = self._batch.get((name, stage))
        if batch is None:
            self._batch[(name, stage)] = (list(reqs), counts, spec)
        else:
            batch[0].extend(reqs)

    def _submit(self) -> None:
        if self._batch:
            self.feed.submit_many([
                Submission(name, self.backends[name], stage, reqs, counts,
                           functools.partial(self._deliver, spec), self.index)
                for (name, stage), (reqs, counts, spec) in self._batch.items()])
            self._batch.clear()

    def _queued(self, name: str) -> int:
        return self.feed.backlog(name) + sum(len(b[0]) for (n, _), b in self._batch.items()
                                             if n == name)

    async def run(self) -> ShardResult:
        for m in self.shard.models:
            self._ask(m, "generate", self.shard.requests_of(m), self.stages["generate"], None)
        for pid, n in self.left.items():
            if n == 0:
                self._prompt_ready(pid)
        if not self.gen_left:
            self.gens_done.set()
        self._submit()
        loop = asyncio.get_running_loop()
        while True:
            self.feed.check()
            self.feed.changed.clear()
            more = self._slice(loop.time() + SLICE_SECONDS)
            self._submit()  # stored answers come back at once: more work
            if more or self.events:
                await asyncio.sleep(0)  # let the loop send and receive first
                continue
            if not self.outstanding and not any(self.ready.values()):
                return self._finish()
            await self.feed.changed.wait()

    def _slice(self, until: float) -> bool:
        """Take answers and build judge requests until ``until``; True if work is left."""
        loop = asyncio.get_running_loop()
        while self.events:
            spec, req, res = self.events.popleft()
            self.outstanding -= 1
            if spec is None:
                self._on_generation(req, res)
            else:
                self._on_judgment(spec, req, res)
            if loop.time() > until:
                return True
        for spec in self.cfg.judges:
            queue, low = self.ready[spec.name], low_water(self.backends[spec.name])
            while queue and self._queued(spec.name) < low:
                self._submit_judge(spec, queue.popleft())
                if loop.time() > until:
                    return True
        return False

    def _on_generation(self, req: ChatRequest, res: ChatResult) -> None:
        assert isinstance(req.tag, GenerationTag)
        self.results[req.key] = res
        pid = req.tag.prompt_id
        self.left[pid] -= 1
        self.gen_left -= 1
        if not self.gen_left:
            self.gens_done.set()
        if not self.left[pid]:
            self._prompt_ready(pid)

    def _prompt_ready(self, pid: str) -> None:
        """A prompt's generations are all in: its records, comparisons and constraint checks
        (as the staged path makes them for the whole shard), and its place in each judge's
        queue."""
        p, cfg = self.prompts[pid], self.cfg
        reqs = self.gen_reqs.pop(pid)
        gens = self.gens[pid] = to_generations(reqs, self.results)
        for r in reqs:
            self.results.pop(r.key, None)
        comps, self.dropped[pid] = comparisons([p], gens, self.shard.assignment, cfg.seed,
                                               cfg.judge.permutations)
        self.comps[pid] = comps
        self.cons[pid] = check_constraints([p], gens)
        for c in comps:
            self.by_comp[(pid, c.permutation)] = c
        if comps:
            for queue in self.ready.values():
                queue.append(pid)

    def _submit_judge(self, spec: JudgeSpec, pid: str) -> None:
        p, seed = self.prompts[pid], self.cfg.seed
        reqs = [judge_request(c, p, aspect, spec, seed, 0, keep=True)
                for c in self.comps[pid] for aspect in spec.aspects]
        self._ask(spec.name, stage_of(0), reqs, self.stages[judge_label(self.cfg, spec)], spec)

    def _on_judgment(self, spec: JudgeSpec, req: ChatRequest, res: ChatResult) -> None:
        tag = req.tag
        assert isinstance(tag, JudgeTag)
        comp = self.by_comp[(tag.prompt_id, tag.permutation)]
        j = to_judgment(req, comp, res, spec)
        self.final[spec.name][tag.slot] = j
        if tag.attempt and not res.pending:
            self.reasks += 1
        if reask_due(j, spec):
            attempt = tag.attempt + 1
            again = judge_request(comp, self.prompts[tag.prompt_id], tag.aspect, spec,
                                  self.cfg.seed, attempt, keep=True)
            self._ask(spec.name, stage_of(attempt), [again],
                      self.stages[judge_label(self.cfg, spec)], spec)

    def _finish(self) -> ShardResult:
        """The shard's records in the staged path's order, its pairs and summary."""
        cfg, prompts = self.cfg, self.shard.prompts
        gens = [g for p in prompts for g in self.gens[p.id]]
        comps = [c for p in prompts for c in self.comps[p.id]]
        dropped = [d for p in prompts for d in self.dropped[p.id]]
        cons = {k: v for p in prompts for k, v in self.cons[p.id].items()}
        judgments = [self.final[spec.name][(c.prompt_id, aspect, c.permutation)]
                     for spec in cfg.judges for c in comps for aspect in spec.aspects]
        return shard_result(cfg, self.shard, gens, comps, judgments, dropped, cons,
                            self.stages, self.reasks)


#: shards started and not yet yielded, at most: one may still be generating while the one
#: before is judged and the one before that is finishing its last re-asks
MAX_HELD = 3


async def stream_shards(cfg: Config, shards: Iterator[ShardPlan], feed: Feed,
                        backends: dict[str, Backend]) -> AsyncGenerator[ShardResult, None]:
    """Every shard, in order; shard k+1 starts once shard k's generations are in (while at
    most ``MAX_HELD`` are held), so no shard boundary leaves the backends idle. An error (a
    401 that stopped the feed) ends every shard."""
    running: deque[tuple[StreamShard, asyncio.Task[ShardResult]]] = deque()
    plans = iter(shards)
    left = True

    def start_more() -> None:
        nonlocal left
        while left and len(running) < MAX_HELD and (
                not running or running[-1][0].gens_done.is_set()):
            shard = next(plans, None)
            if shard is None:
                left = False
                return
            s = StreamShard(cfg, shard, running[-1][0].index + 1 if running else 0, feed,
                            backends)
            running.append((s, asyncio.create_task(s.run())))

    try:
        start_more()
        while running:
            head = running[0][1]
            if not head.done():
                waits: set[asyncio.Future[Any]] = {head}
                if left and len(running) < MAX_HELD:
                    waits.add(asyncio.ensure_future(running[-1][0].gens_done.wait()))
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                for w in waits - {head}:
                    w.cancel()
                start_more()
                continue
            result = head.result()  # raises the shard's error
            running.popleft()
            start_more()
            yield result
    finally:
        for _, t in running:
            t.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*(t for _, t in running), return_exceptions=True)
