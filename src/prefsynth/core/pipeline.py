"""The whole job: plan -> generate -> judge -> pairs -> export, shard by shard.

This module wires stages together; each stage is a plain function in its own module, the plan
(``core.plan``) says what to ask and the executor decides where requests run. Each shard
comes out as one ``ShardResult`` (its records and summary) for the output writer to consume;
the run's summary is the sum of the shards' (``RunSummary.add``). Everything a rerun needs
comes from the store, so a run killed at any point and started again finishes without
repeating an answered request, and gives the same dataset as an uninterrupted run with the
same seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prefsynth.backends import Backend, backend_class
from prefsynth.config import Config, ModelSpec
from prefsynth.core.executor import Executor, LocalExecutor, NoProgress, Progress, executor_for
from prefsynth.core.plan import Plan, ShardPlan
from prefsynth.core.store import Store
from prefsynth.core.stream import check_constraints, judge_label, shard_result, stream_shards
from prefsynth.output.files import claim_output_dir
from prefsynth.records import (
    ChatRequest,
    ChatResult,
    Judgment,
    RunSummary,
    ShardResult,
    StageCounts,
)
from prefsynth.stages.generate import to_generations
from prefsynth.stages.judge.judgments import JudgeRounds
from prefsynth.stages.judge.rubrics import check_rubrics
from prefsynth.stages.prompts import PromptStats

if TYPE_CHECKING:
    from prefsynth.output.facts import RunFacts
    from prefsynth.output.writer import OutputWriter

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RunResult:
    """A run: its config, its prompts' stats, the sum of its shards' summaries, what
    ``run.json`` holds once written (``facts``), and its records when run with ``keep``."""

    config: Config
    prompt_stats: PromptStats
    summary: RunSummary = field(default_factory=RunSummary)
    records: ShardResult = field(default_factory=ShardResult)  # empty unless ``keep``
    facts: RunFacts | None = None  # what run.json holds, once the output is written


async def judge_all(rounds: JudgeRounds, backend: Backend, store: Store,
                    progress: Progress, executor: Executor | None = None) -> StageCounts:
    """Drive one judge's re-ask rounds through the executor; returns its stage counts."""
    executor = executor or LocalExecutor()
    total = StageCounts()
    while reqs := rounds.requests():
        results, counts = await executor.run_stage(
            rounds.stage, {rounds.spec.name: (backend, reqs)}, store, progress)
        total.add(counts)
        rounds.take(results)
    return total


class Run:
    """One run of a config. Backends are created before any work, so a missing API key or
    model file fails at once; they are closed when the run ends, however it ends. The
    executor (``cfg.executor``: local, or ray) decides where each request is answered.

    A shard streams (``core.stream``: a prompt is judged while others are generated) when
    the executor and every backend of the run can (``streams``); otherwise, or with
    ``stream=False``, it runs stage by stage (``_shard``). Both give the same records."""

    def __init__(self, cfg: Config, *, limit: int | None = None, wait: bool = False,
                 progress: Progress | None = None, force: bool = False,
                 executor: Executor | None = None, stream: bool = True) -> None:
        self.cfg = cfg
        self.force = force
        self.limit = limit
        self.wait = wait
        self.progress = progress or NoProgress()
        self.plan = Plan(cfg, limit)
        self.executor = executor or executor_for(cfg)
        self.streams = stream and self.executor.streams and all(
            backend_class(s.backend).streams for s in self._specs())

    def _check_rubrics(self) -> None:
        check_rubrics(self.cfg.judges, 2 if self.cfg.on_policy else self.cfg.responses_per_prompt)

    def _specs(self) -> list[ModelSpec]:
        """Every model the run asks: the pool models some prompt is assigned to, the judges."""
        return [self.cfg.model(n) for n in self.plan.models] + list(self.cfg.judges)

    def _backends(self, store: Store) -> dict[str, Backend]:
        out: dict[str, Backend] = {}
        for spec in self._specs():
            backend = self.executor.backend(spec, store)
            if self.wait:  # --wait; a backend's own `options.wait` stays as it is
                backend.wait = True
            out[spec.name] = backend
        return out

    async def _generate(self, work: dict[str, tuple[Backend, list[ChatRequest]]], store: Store,
                        backends: dict[str, Backend]) -> tuple[dict[str, ChatResult], StageCounts]:
        """All shareable backends at once; ``exclusive`` ones (a whole GPU each) one at a time,
        each closed when done unless it is also a judge."""
        shared = {m: w for m, w in work.items() if not w[0].exclusive}
        alone = [m for m in work if m not in shared]
        run_stage = self.executor.run_stage
        results, counts = await run_stage("generate", shared, store, self.progress)
        judges = {j.name for j in self.cfg.judges}
        for m in alone:
            res, c = await run_stage("generate", {m: work[m]}, store, self.progress)
            results.update(res)
            counts.add(c)
            if m not in judges:
                await backends[m].aclose()  # frees the GPU; reloads if a later shard needs it
        return results, counts

    async def _shard(self, shard: ShardPlan, store: Store, backends: dict[str, Backend]
                     ) -> ShardResult:
        """Every stage for one shard of prompts; its records are independent of other shards
        (all choices are seeded per prompt)."""
        cfg, plan = self.cfg, self.plan
        work = {m: (backends[m], shard.requests_of(m)) for m in shard.models}
        results, gen_counts = await self._generate(work, store, backends)
        gens = to_generations(shard.requests, results)
        del work, results
        comps, dropped = plan.comparisons(shard, gens)
        stages = {"generate": gen_counts}
        judgments: list[Judgment] = []
        reasks = 0
        for spec in cfg.judges:
            rounds = plan.judge_rounds(shard, comps, spec)
            counts = await judge_all(rounds, backends[spec.name], store, self.progress,
                                     self.executor)
            stages[judge_label(cfg, spec)] = counts
            judgments += rounds.judgments
            reasks += rounds.reasks
        return shard_result(cfg, shard, gens, comps, judgments, dropped,
                            check_constraints(shard.prompts, gens), stages, reasks)

    async def shards(self) -> AsyncGenerator[ShardResult, None]:
        """Run the plan shard by shard, yielding each shard's records and summary as it is
        done: the caller (the output writer) consumes them, so memory is bounded by one."""
        claim_output_dir(self.cfg.output_dir, self.force)  # before any model call
        self._check_rubrics()
        store = Store(self.cfg.store_path, exclusive=True)  # one run per store (RunLock)
        backends: dict[str, Backend] = {}
        try:
            backends = self._backends(store)
            if self.streams:
                async with self.executor.feed(store, self.progress) as feed:
                    flow = stream_shards(self.cfg, self.plan.shards(), feed, backends)
                    async with contextlib.aclosing(flow) as results:
                        async for result in results:
                            yield result
            else:
                for shard in self.plan.shards():
                    yield await self._shard(shard, store, backends)
        finally:
            try:
                for b in backends.values():
                    await b.aclose()
                await self.executor.aclose()
            finally:
                store.close()

    async def execute(self, on_shard: Callable[[ShardResult], Any] | None = None,
                      keep: bool = True) -> RunResult:
        """Run every shard; hand each to ``on_shard`` (the streaming writer) as it is done.

        With ``keep`` the result holds every record; without, only the summary (what the
        card needs): memory is then bounded by one shard.
        """
        result = RunResult(self.cfg, self.plan.stats)
        async with contextlib.aclosing(self.shards()) as shards:
            async for shard in shards:
                if on_shard is not None:
                    on_shard(shard)
                result.summary.add(shard.summary)
                if keep:
                    result.records.extend(shard)
        return result


#: the young-generation threshold during a run (CPython's default is 700): a run allocates
#: millions of short-lived objects per shard, few of them in cycles
GC_THRESHOLD = 20_000


@contextlib.contextmanager
def _run_gc() -> Iterator[None]:
    """Collect less often during a run, and never scan what exists before it (modules, the
    plan's prompts): the collector took ~25% of a run's CPU against ``bench/instant_server``
    (2,000 prompts, ``gc.callbacks``), ~2% with this; the whole CLI's CPU per request fell
    by ~13%. Undone when the run ends."""
    old = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)
        gc.unfreeze()


def run(cfg: Config, *, limit: int | None = None, wait: bool = False,
        progress: Progress | None = None, export: bool = True, keep: bool = True,
        force: bool = False, stream: bool = True) -> RunResult:
    """Run the whole pipeline and (by default) write the output folder, shard by shard.

    ``keep=False`` (what the CLI does) drops each shard's records once they are written.
    ``force`` writes into a non-empty folder that is not a prefsynth output; ``stream=False``
    runs every shard stage by stage even where it could stream (the same records).
    """
    runner = Run(cfg, limit=limit, wait=wait, progress=progress, force=force, stream=stream)
    writers: list[OutputWriter] = []

    def writer() -> OutputWriter:
        """Made at the first finished shard, not before: pyarrow's import (~0.5 s) then
        overlaps nothing a user waits for before the first request."""
        if not writers:
            from prefsynth.output.writer import OutputWriter

            writers.append(OutputWriter(cfg))
        return writers[0]

    add = (lambda shard: writer().add(shard)) if export else None
    with _run_gc():
        result = asyncio.run(runner.execute(add, keep=keep))
    if export:
        result.facts = writer().close(result.summary, result.prompt_stats, runner.plan.curation)
    return result
