"""``prefsynth status``: per stage, how many requests are done, failed, or pending.

Recomputes the plan (prompts, mix, requests — all pure and cheap) and looks every key up in
the store. Creates no backend, so it needs no API key and loads no model.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from prefsynth.backends import backend_class
from prefsynth.config import Config, JudgeSpec
from prefsynth.core.store import Store
from prefsynth.records import Comparison, GenerationTag, JudgeTag, Prompt
from prefsynth.stages.assign import assign
from prefsynth.stages.generate import generation_requests, to_generations
from prefsynth.stages.judge.comparisons import comparisons
from prefsynth.stages.judge.judgments import judge_requests, needs_reask, to_judgment
from prefsynth.stages.prompts import load_prompts


@dataclass(slots=True)
class Line:
    stage: str
    model: str
    done: int = 0
    failed: int = 0
    pending: int = 0
    errors: Counter[str] = field(default_factory=Counter)


def _judge_line(cfg: Config, spec: JudgeSpec, comps: list[Comparison], by_id: dict[str, Prompt],
                store: Store | None) -> tuple[Line, int]:
    """Done/failed/pending judgments of one judge, following its re-ask chain in the store."""
    by_comp = {(c.prompt_id, c.permutation): c for c in comps}
    jline = Line("judge", spec.name)
    unparsed: set[tuple[str, str, int]] | None = None
    reasks = 0
    for attempt in range(spec.max_reasks + 1):
        reqs = judge_requests(comps, by_id, spec, cfg.seed, attempt, unparsed)
        if not reqs:
            break
        got = store.get_many(r.key for r in reqs) if store else {}
        if attempt:
            reasks += sum(r.key in got for r in reqs)
        nxt: set[tuple[str, str, int]] = set()
        for r in reqs:
            assert isinstance(r.tag, JudgeTag)
            j = to_judgment(r, by_comp[(r.tag.prompt_id, r.tag.permutation)], got.get(r.key), spec)
            last = attempt == spec.max_reasks
            if j.error == "pending":
                jline.pending += 1
            elif needs_reask(j) and not last:
                nxt.add((j.prompt_id, j.aspect, j.permutation))
            elif j.error:
                jline.failed += 1
                jline.errors[j.error.split(":")[0]] += 1
            else:
                jline.done += 1
        unparsed = nxt
        if not nxt:
            break
    return jline, reasks


def _merge(into: Line, other: Line) -> None:
    into.done += other.done
    into.failed += other.failed
    into.pending += other.pending
    into.errors.update(other.errors)


def compute_status(cfg: Config, limit: int | None = None) -> dict[str, Any]:
    """Per stage and model: done / failed / pending, shard by shard (``shard_size``) so a
    million-prompt plan is never held at once."""
    prompts, pstats = load_prompts(cfg.prompts, limit)
    assignment = assign(prompts, [m.name for m in cfg.models], cfg.responses_per_prompt, cfg.seed,
                     cfg.on_policy)
    specs = {m.name: m for m in cfg.models}
    gen_lines: dict[str, Line] = {}
    judge_lines = {spec.name: Line("judge", spec.name) for spec in cfg.judges}
    dropped_before: Counter[str] = Counter()
    reasks = 0
    store = Store(cfg.store_path) if cfg.store_path.exists() else None
    try:
        size = cfg.shard_size or len(prompts)
        for i in range(0, len(prompts), size):
            shard = prompts[i : i + size]
            by_id = {p.id: p for p in shard}
            sub = {p.id: assignment[p.id] for p in shard}
            gen_reqs = generation_requests(shard, sub, specs, cfg.seed)
            stored = store.get_many(r.key for r in gen_reqs) if store else {}
            for r in gen_reqs:
                assert isinstance(r.tag, GenerationTag)
                model = r.tag.model
                line = gen_lines.setdefault(model, Line("generate", model))
                res = stored.get(r.key)
                if res is None:
                    line.pending += 1
                elif res.ok:
                    line.done += 1
                else:
                    line.failed += 1
                    line.errors[(res.error or "").split(":")[0]] += 1
            gens = to_generations(gen_reqs, stored)
            comps, dropped = comparisons(shard, gens, sub, cfg.seed, cfg.judge.permutations)
            dropped_before.update(d.reason for d in dropped)
            waiting = sum(d.reason == "generation_pending" for d in dropped)
            for spec in cfg.judges:
                jline, n = _judge_line(cfg, spec, comps, by_id, store)
                jline.pending += waiting * len(spec.aspects) * spec.permutations
                _merge(judge_lines[spec.name], jline)
                reasks += n
        batches = [row for name in sorted({m.backend for m in [*cfg.models, *cfg.judges]})
                   for row in backend_class(name).store_status(store)] if store else []
    finally:
        if store:
            store.close()
    lines = [gen_lines[m] for m in sorted(gen_lines)] + list(judge_lines.values())
    return {"prompts": pstats, "lines": lines, "reasks": reasks,
            "dropped_before_judge": dropped_before, "batches": batches}
