"""The whole job: prompts -> mix -> generate -> judge -> pairs -> export, shard by shard.

This module wires stages together; each stage is a plain function in its own module and the
executor decides where requests run. Everything a rerun needs comes from the store, so a run
killed at any point and started again finishes without repeating an answered request, and
gives the same dataset as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prefsynth.backends import Backend, create_backend
from prefsynth.config import Config, JudgeSpec, ModelSpec
from prefsynth.core.executor import NoProgress, Progress
from prefsynth.core.executor.local import run_stage
from prefsynth.core.store import Store
from prefsynth.records import (
    ChatRequest,
    ChatResult,
    Comparison,
    Dropped,
    Generation,
    GenerationTag,
    JudgeTag,
    Judgment,
    Pair,
    Prompt,
    StageCounts,
)
from prefsynth.stages.assign import assign
from prefsynth.stages.constraints.verifier import verify_constraints
from prefsynth.stages.generate import generation_requests, to_generations
from prefsynth.stages.judge.comparisons import comparisons
from prefsynth.stages.judge.judgments import judge_requests, needs_reask, to_judgment
from prefsynth.stages.judge.rubrics import render_judge_messages
from prefsynth.stages.pairs import make_pairs
from prefsynth.stages.prompts import PromptStats, load_prompts

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RunResult:
    """Everything the exporters, the card and the CLI summary need."""

    config: Config
    prompt_stats: PromptStats
    prompts: list[Prompt]
    assignment: dict[str, list[str]]
    generations: list[Generation]
    comparisons: list[Comparison]
    judgments: list[Judgment]
    pairs: list[Pair]
    dropped: list[Dropped]
    constraint_results: dict[tuple[str, str], list[bool]]
    stages: dict[str, StageCounts] = field(default_factory=dict)
    reasks: int = 0
    pending: bool = False
    pair_count: int = 0  # pairs over every shard, also when records are not kept
    facts: dict[str, Any] | None = None  # what run.json holds, once the output is written

    def absorb(self, shard: RunResult, keep: bool = True) -> None:
        """Fold one shard into this (the run's) result: counts always, records if ``keep``."""
        if keep:
            self.prompts.extend(shard.prompts)
            self.assignment.update(shard.assignment)
            self.generations.extend(shard.generations)
            self.comparisons.extend(shard.comparisons)
            self.judgments.extend(shard.judgments)
            self.pairs.extend(shard.pairs)
            self.constraint_results.update(shard.constraint_results)
        self.dropped.extend(shard.dropped)
        for name, counts in shard.stages.items():
            self.stages.setdefault(name, StageCounts()).add(counts)
        self.reasks += shard.reasks
        self.pending = self.pending or shard.pending
        self.pair_count += len(shard.pairs)

    def dropped_by_reason(self) -> dict[str, int]:
        return dict(Counter(d.reason for d in self.dropped).most_common())


@dataclass(slots=True)
class JudgeOutcome:
    judgments: list[Judgment]
    counts: StageCounts
    reasks: int


async def judge_all(comps: Sequence[Comparison], prompts: dict[str, Prompt], spec: JudgeSpec,
                    backend: Backend, store: Store, seed: int,
                    progress: Progress) -> JudgeOutcome:
    """Judge every (comparison, aspect), re-asking unparseable answers up to max_reasks."""
    by_comp = {(c.prompt_id, c.permutation): c for c in comps}
    final: dict[tuple[str, str, int], Judgment] = {}
    only: set[tuple[str, str, int]] | None = None
    total = StageCounts()
    reasks = 0
    for attempt in range(spec.max_reasks + 1):
        reqs: list[ChatRequest] = judge_requests(comps, prompts, spec, seed, attempt, only)
        if not reqs:
            break
        if attempt > 0:
            reasks += len(reqs)
        results, counts = await run_stage(
            "judge" if attempt == 0 else f"judge-reask{attempt}",
            {spec.name: (backend, reqs)}, store, progress,
        )
        total.add(counts)
        retry: set[tuple[str, str, int]] = set()
        for r in reqs:
            assert isinstance(r.tag, JudgeTag)
            j = to_judgment(r, by_comp[(r.tag.prompt_id, r.tag.permutation)],
                            results.get(r.key), spec)
            final[r.tag.slot] = j
            if needs_reask(j):
                retry.add(r.tag.slot)
        if not retry:
            break
        only = retry
    return JudgeOutcome(list(final.values()), total, reasks)


def check_constraints(prompts: Sequence[Prompt], generations: Sequence[Generation]
                      ) -> dict[tuple[str, str], list[bool]]:
    by_id = {p.id: p for p in prompts}
    out: dict[tuple[str, str], list[bool]] = {}
    for g in generations:
        p = by_id[g.prompt_id]
        if p.instruction_ids and g.text is not None:
            out[(g.prompt_id, g.model)] = verify_constraints(g.text, p.instruction_ids,
                                                             p.constraint_kwargs)
    return out


class Run:
    """One run of a config. Backends are created before any work, so a missing API key or
    model file fails at once; they are closed when the run ends, however it ends."""

    def __init__(self, cfg: Config, *, limit: int | None = None, wait: bool = False,
                 progress: Progress | None = None) -> None:
        self.cfg = cfg
        self.limit = limit
        self.wait = wait
        self.progress = progress or NoProgress()

    def _check_rubrics(self) -> None:
        """Render every judge's rubrics once before any work: a missing or unsafe template
        fails now, not after the generation stage has run."""
        k = 2 if self.cfg.on_policy else self.cfg.responses_per_prompt
        for spec in self.cfg.judges:
            for aspect in spec.aspects:
                render_judge_messages(aspect, "instruction", ["text"] * k, "reference",
                                      structured=spec.mode == "structured",
                                      custom_dir=spec.templates_dir)

    def _backends(self, names: Sequence[str], store: Store) -> dict[str, Backend]:
        specs: list[ModelSpec] = [self.cfg.model(n) for n in names] + list(self.cfg.judges)
        out: dict[str, Backend] = {}
        for spec in specs:
            backend = create_backend(spec, store=store)
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
        results, counts = await run_stage("generate", shared, store, self.progress)
        judges = {j.name for j in self.cfg.judges}
        for m in alone:
            res, c = await run_stage("generate", {m: work[m]}, store, self.progress)
            results.update(res)
            counts.add(c)
            if m not in judges:
                await backends[m].aclose()  # frees the GPU; reloads if a later shard needs it
        return results, counts

    async def _shard(self, prompts: list[Prompt], pstats: PromptStats,
                     assignment: dict[str, list[str]], store: Store,
                     backends: dict[str, Backend]) -> RunResult:
        """Every stage for one shard of prompts; its records are independent of other shards
        (all choices are seeded per prompt)."""
        cfg = self.cfg
        by_id = {p.id: p for p in prompts}
        sub = {p.id: assignment[p.id] for p in prompts}
        used = sorted({m for ms in sub.values() for m in ms})
        gen_reqs = generation_requests(prompts, sub, {m.name: m for m in cfg.models}, cfg.seed)
        work = {m: (backends[m], [r for r in gen_reqs
                                    if isinstance(r.tag, GenerationTag) and r.tag.model == m]) for m in used}
        results, gen_counts = await self._generate(work, store, backends)
        gens = to_generations(gen_reqs, results)
        del gen_reqs, work, results
        comps, dropped = comparisons(prompts, gens, sub, cfg.seed, cfg.judge.permutations)
        outcomes = [await judge_all(comps, by_id, spec, backends[spec.name], store, cfg.seed,
                                    self.progress) for spec in cfg.judges]
        cons = check_constraints(prompts, gens)
        judgments = [j for o in outcomes for j in o.judgments]
        pairs, dropped_pairs = make_pairs(prompts, gens, judgments, cfg.pairs, cfg.seed, cons,
                                          skip={d.prompt_id for d in dropped})
        all_dropped = dropped + dropped_pairs
        pending = gen_counts.pending > 0 or any(o.counts.pending for o in outcomes) or any(
            d.reason.endswith("_pending") for d in all_dropped)
        stages = {"generate": gen_counts}
        for spec, o in zip(cfg.judges, outcomes, strict=True):
            stages["judge" if spec is cfg.judge else f"judge:{spec.name}"] = o.counts
        return RunResult(cfg, pstats, prompts, sub, gens, comps, judgments, pairs,
                         all_dropped, cons, stages, sum(o.reasks for o in outcomes), pending)

    async def execute(self, on_shard: Callable[[RunResult], Any] | None = None,
                      keep: bool = True) -> RunResult:
        """Run every shard; hand each to ``on_shard`` (the streaming exporter) as it is done.

        With ``keep`` the returned result holds every record; without, only the counts and
        drops (what the card needs) — memory is then bounded by one shard.
        """
        cfg = self.cfg
        prompts, pstats = load_prompts(cfg.prompts, self.limit)
        assignment = assign(prompts, [m.name for m in cfg.models], cfg.responses_per_prompt,
                         cfg.seed, cfg.on_policy)
        used = sorted({m for ms in assignment.values() for m in ms})
        self._check_rubrics()
        size = cfg.shard_size or len(prompts)
        total = RunResult(cfg, pstats, [], {}, [], [], [], [], [], {})
        store = Store(cfg.store_path, exclusive=True)  # one run per store (RunLock)
        backends: dict[str, Backend] = {}
        try:
            backends = self._backends(used, store)
            for i in range(0, len(prompts), size):
                shard = await self._shard(prompts[i : i + size], pstats, assignment, store,
                                          backends)
                if on_shard is not None:
                    on_shard(shard)
                total.absorb(shard, keep)
        finally:
            for b in backends.values():
                await b.aclose()
            store.close()
        return total


def run(cfg: Config, *, limit: int | None = None, wait: bool = False,
        progress: Progress | None = None, export: bool = True, keep: bool = True) -> RunResult:
    """Run the whole pipeline and (by default) write the output folder, shard by shard.

    ``keep=False`` (what the CLI does) drops each shard's records once they are written.
    """
    writer = None
    if export:
        from prefsynth.output.writer import OutputWriter

        writer = OutputWriter(cfg)
    runner = Run(cfg, limit=limit, wait=wait, progress=progress)
    result = asyncio.run(runner.execute(writer.add if writer else None, keep=keep))
    if writer is not None:
        result.facts = writer.close(result)
    return result
