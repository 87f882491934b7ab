"""The plan of a run: prompts -> curation -> assignment -> shards -> requests, written once.

``prefsynth run`` (the pipeline), ``prefsynth status`` and ``prefsynth estimate`` all read it,
so they see the same prompts, the same picks, the same shards and the same request keys.
Building it loads the prompts and nothing else: it calls no model and opens no store.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefsynth.backends import backend_class
from prefsynth.config import Config, JudgeSpec
from prefsynth.records import ChatRequest, Comparison, Dropped, Generation, GenerationTag, Prompt
from prefsynth.stages.assign import assign
from prefsynth.stages.generate import generation_requests
from prefsynth.stages.judge.comparisons import comparisons
from prefsynth.stages.judge.judgments import JudgeRounds
from prefsynth.stages.prompts import load_prompts

#: prompts per shard when ``shard_size`` is unset: peak RSS stays near 130 MB at any prompt
#: count (``bench/pipeline_memory.py``; 1000 gave ~160 MB), about 1 KB per prompt beyond the
#: shard, and the data is the same as one shard's. Not for a run with a ``costly_shards`` backend (a model reload or a batch job per
#: shard): that run stays in one shard unless ``shard_size`` says otherwise.
AUTO_SHARD_SIZE = 500


def shard_size(cfg: Config, prompts: int) -> int:
    """Prompts per shard: ``cfg.shard_size``, else ``AUTO_SHARD_SIZE`` unless some backend of
    the run pays per shard, else all of them."""
    if cfg.shard_size:
        return cfg.shard_size
    specs = [*cfg.models, cfg.judge, *cfg.panel]
    if any(backend_class(s.backend).costly_shards for s in specs):
        return max(prompts, 1)
    return AUTO_SHARD_SIZE


def _picked(assignment: dict[str, list[str]]) -> list[str]:
    return sorted({m for ms in assignment.values() for m in ms})


@dataclass(slots=True)
class ShardPlan:
    """One shard's prompts, their picked models and their generation requests."""

    prompts: list[Prompt]
    assignment: dict[str, list[str]]  # this shard's prompts only
    requests: list[ChatRequest]

    def requests_of(self, model: str) -> list[ChatRequest]:
        return [r for r in self.requests
                if isinstance(r.tag, GenerationTag) and r.tag.model == model]

    @property
    def models(self) -> list[str]:
        """The pool models this shard asks, sorted."""
        return _picked(self.assignment)


class Plan:
    """Every prompt of ``cfg`` (at most ``limit``) and the pool models that answer each.

    Shards (``shard_size()`` prompts each) are planned one at a time (``shards()``), so a
    million-prompt run never holds all its requests at once. Every choice is seeded per
    prompt, so a shard's requests do not depend on the shard size.
    """

    def __init__(self, cfg: Config, limit: int | None = None) -> None:
        self.cfg = cfg
        self.prompts, self.stats = load_prompts(cfg.prompts, limit)
        #: what curation removed (run.json's ``curation``); None without a ``curate`` section
        self.curation: dict[str, Any] | None = None
        if cfg.curate is not None:  # on the whole prompt set, before any shard: deterministic
            from prefsynth.stages.curate import curate_prompts

            cur = curate_prompts(self.prompts, cfg.curate, Path.cwd(),
                                 exact_dup=self.stats.duplicates)
            self.prompts, self.curation = cur.prompts, cur.facts
        self.specs = {m.name: m for m in cfg.models}
        self.assignment = assign(self.prompts, list(self.specs), cfg.responses_per_prompt,
                                 cfg.seed, cfg.on_policy)

    @property
    def models(self) -> list[str]:
        """The pool models some prompt is assigned to, sorted."""
        return _picked(self.assignment)

    def requests(self, prompts: Sequence[Prompt], model: str | None = None
                 ) -> list[ChatRequest]:
        """Generation requests of ``prompts``: for their assigned models, or for ``model``."""
        picks = {p.id: [model] if model else self.assignment[p.id] for p in prompts}
        return generation_requests(prompts, picks, self.specs, self.cfg.seed)

    def shards(self) -> Iterator[ShardPlan]:
        size = shard_size(self.cfg, len(self.prompts))
        for i in range(0, len(self.prompts), size):
            prompts = self.prompts[i : i + size]
            yield ShardPlan(prompts, {p.id: self.assignment[p.id] for p in prompts},
                            self.requests(prompts))

    def comparisons(self, shard: ShardPlan, generations: Sequence[Generation]
                    ) -> tuple[list[Comparison], list[Dropped]]:
        """What the judges see of a shard, once its generations are in."""
        return comparisons(shard.prompts, generations, shard.assignment, self.cfg.seed,
                           self.cfg.judge.permutations)

    def judge_rounds(self, shard: ShardPlan, comps: Sequence[Comparison], spec: JudgeSpec
                     ) -> JudgeRounds:
        """One judge's re-ask rounds over a shard's comparisons, for a caller to drive."""
        return JudgeRounds(comps, {p.id: p for p in shard.prompts}, spec, self.cfg.seed)
