"""``prefsynth status``: per stage and model, how many requests are done, failed, or pending.

Walks the run's plan (``core.plan``: prompts, assignment, shards, requests — pure and cheap)
shard by shard and answers every request from the store alone: the judge's re-ask rounds are
the pipeline's own (``JudgeRounds``), driven by look-ups instead of the executor, and the
counts are the pipeline's (``core.summary``). So status counts exactly the keys a run asks.
Creates no backend, so it needs no API key and loads no model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from prefsynth.backends import backend_class
from prefsynth.config import Config
from prefsynth.core.plan import Plan, ShardPlan
from prefsynth.core.store import Store
from prefsynth.core.summary import summarize
from prefsynth.records import (
    ChatRequest,
    ChatResult,
    Judgment,
    RunSummary,
    ShardResult,
    StageCounts,
)
from prefsynth.stages.generate import to_generations
from prefsynth.stages.prompts import PromptStats


@dataclass(slots=True)
class Status:
    """What ``prefsynth status`` prints. ``summary.by_model`` holds the lines (answered is
    done); ``summary.dropped`` the prompts not judged yet, by reason."""

    config: Config
    prompts: PromptStats
    summary: RunSummary
    batches: list[dict[str, Any]] = field(default_factory=list)

    def lines(self) -> list[tuple[str, str, StageCounts]]:
        """(stage, model, counts): pool models sorted, then the judges in config order."""
        by = self.summary.by_model
        gen = sorted(m for stage, m in by if stage == "generate")
        return ([("generate", m, by[("generate", m)]) for m in gen]
                + [("judge", j.name, by[("judge", j.name)]) for j in self.config.judges])


def _lookup(store: Store | None, reqs: list[ChatRequest]) -> Mapping[str, ChatResult]:
    return store.get_many(r.key for r in reqs) if store else {}


def _shard(plan: Plan, shard: ShardPlan, store: Store | None) -> RunSummary:
    """One shard as the pipeline would see it if it asked nothing: stored answers only."""
    gens = to_generations(shard.requests, _lookup(store, shard.requests))
    comps, dropped = plan.comparisons(shard, gens)
    judgments: list[Judgment] = []
    reasks = 0
    for spec in plan.cfg.judges:
        rounds = plan.judge_rounds(shard, comps, spec)
        while reqs := rounds.requests():
            rounds.take(_lookup(store, reqs))
        judgments += rounds.judgments
        reasks += rounds.reasks
    seen = ShardResult(shard.prompts, shard.assignment, gens, comps, judgments, dropped=dropped)
    return summarize(seen, plan.cfg, reasks=reasks)


def compute_status(cfg: Config, limit: int | None = None) -> Status:
    """Per stage and model: done / failed / pending, shard by shard (``shard_size``) so a
    million-prompt plan is never held at once."""
    plan = Plan(cfg, limit)
    total = RunSummary()
    store = Store(cfg.store_path) if cfg.store_path.exists() else None
    try:
        for shard in plan.shards():
            total.add(_shard(plan, shard, store))
        batches = [row for name in sorted({m.backend for m in [*cfg.models, *cfg.judges]})
                   for row in backend_class(name).store_status(store)] if store else []
    finally:
        if store:
            store.close()
    return Status(cfg, plan.stats, total, batches)
