"""The whole job: prompts -> generate -> mix -> judge -> pairs -> export.

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
from prefsynth.constraints import verify_constraints
from prefsynth.executor import NoProgress, Progress, StageCounts, run_stage
from prefsynth.generate import generation_requests, to_generations
from prefsynth.judge import comparisons, judge_requests, to_judgment
from prefsynth.judge_templates import render_judge_messages
from prefsynth.mix import mix
from prefsynth.pairs import make_pairs
from prefsynth.prompts import PromptStats, load_prompts
from prefsynth.records import (
    ChatRequest,
    ChatResult,
    Comparison,
    Dropped,
    Generation,
    Judgment,
    Pair,
    Prompt,
)
from prefsynth.store import Store

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
            pid, aspect, perm = str(r.tag["prompt_id"]), str(r.tag["aspect"]), int(r.tag["permutation"])
            j = to_judgment(r, by_comp[(pid, perm)], results.get(r.key), spec)
            final[(pid, aspect, perm)] = j
            if j.error and j.error.startswith(("unparseable", "truncated")):
                retry.add((pid, aspect, perm))
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
            if self.wait and hasattr(backend, "wait"):
                backend.wait = True
            out[spec.name] = backend
        return out

    async def _generate(self, work: dict[str, tuple[Backend, list[ChatRequest]]], store: Store,
                        backends: dict[str, Backend]) -> tuple[dict[str, ChatResult], StageCounts]:
        """All shareable backends at once; ``exclusive`` ones (a whole GPU each) one at a time,
        each closed when done unless it is also a judge."""
        shared = {m: w for m, w in work.items() if not getattr(w[0], "exclusive", False)}
        alone = [m for m in work if m not in shared]
        results, counts = await run_stage("generate", shared, store, self.progress)
        judges = {j.name for j in self.cfg.judges}
        for m in alone:
            res, c = await run_stage("generate", {m: work[m]}, store, self.progress)
            results.update(res)
            counts.add(c)
            if m not in judges:
                await backends.pop(m).aclose()
        return results, counts

    async def execute(self) -> RunResult:
        cfg = self.cfg
        prompts, pstats = load_prompts(cfg.prompts, self.limit)
        by_id = {p.id: p for p in prompts}
        assignment = mix(prompts, [m.name for m in cfg.models], cfg.responses_per_prompt,
                         cfg.seed, cfg.on_policy)
        used = sorted({m for ms in assignment.values() for m in ms})
        self._check_rubrics()
        store = Store(cfg.store_path)
        backends: dict[str, Backend] = {}
        try:
            backends = self._backends(used, store)
            gen_reqs = generation_requests(prompts, assignment, {m.name: m for m in cfg.models},
                                           cfg.seed)
            work = {m: (backends[m], [r for r in gen_reqs if r.tag["model"] == m]) for m in used}
            results, gen_counts = await self._generate(work, store, backends)
            gens = to_generations(gen_reqs, results)
            comps, dropped = comparisons(prompts, gens, assignment, cfg.seed,
                                         cfg.judge.permutations)
            outcomes = [await judge_all(comps, by_id, spec, backends[spec.name], store,
                                        cfg.seed, self.progress) for spec in cfg.judges]
        finally:
            for b in backends.values():
                await b.aclose()
            store.close()
        cons = check_constraints(prompts, gens)
        judgments = [j for o in outcomes for j in o.judgments]
        pairs, dropped_pairs = make_pairs(prompts, gens, judgments, cfg.pairs, cfg.seed,
                                          cons, skip={d.prompt_id for d in dropped})
        all_dropped = dropped + dropped_pairs
        pending = gen_counts.pending > 0 or any(o.counts.pending for o in outcomes) or any(
            d.reason.endswith("_pending") for d in all_dropped)
        stages = {"generate": gen_counts}
        for spec, o in zip(cfg.judges, outcomes, strict=True):
            stages["judge" if spec is cfg.judge else f"judge:{spec.name}"] = o.counts
        return RunResult(cfg, pstats, prompts, assignment, gens, comps, judgments, pairs,
                         all_dropped, cons, stages, sum(o.reasks for o in outcomes), pending)


def run(cfg: Config, *, limit: int | None = None, wait: bool = False,
        progress: Progress | None = None, export: bool = True,
        on_result: Callable[[RunResult], Any] | None = None) -> RunResult:
    """Run the whole pipeline and (by default) write the output folder."""
    result = asyncio.run(Run(cfg, limit=limit, wait=wait, progress=progress).execute())
    if export:
        from prefsynth.export import write_output

        write_output(result)
    if on_result is not None:
        on_result(result)
    return result
