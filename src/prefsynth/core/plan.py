"""The plan of a run: prompts -> curation -> assignment -> shards -> requests, written once.

``prefsynth run`` (the pipeline), ``prefsynth status`` and ``prefsynth estimate`` all read it,
so they see the same prompts, the same picks, the same shards and the same request keys.
Building it reads the prompts and nothing else: it calls no model and opens no store.

Without curation the plan holds no prompt: building it reads the source once for the counts
and the models some prompt is assigned to, and ``shards()`` reads it again, one shard's
prompts at a time (``stages.prompts.iter_prompts``: the same prompts, deduplicated the same
way). Memory is then one shard plus the deduplication's hashes (11-21 bytes per prompt, for
each of the two sets it keeps), at any prompt count. Curation (near-duplicates, sampling)
needs every prompt at once, so a plan with a ``curate`` section holds the curated list.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from prefsynth.backends import backend_class
from prefsynth.config import Config, JudgeSpec
from prefsynth.errors import InputError
from prefsynth.records import ChatRequest, Comparison, Dropped, Generation, GenerationTag, Prompt
from prefsynth.stages.assign import assign
from prefsynth.stages.generate import generation_requests
from prefsynth.stages.judge.comparisons import comparisons
from prefsynth.stages.judge.judgments import JudgeRounds
from prefsynth.stages.prompts import PromptStats, iter_prompts, load_prompts

#: prompts per shard when ``shard_size`` is unset: peak RSS stays near 130 MB at any prompt
#: count (``bench/pipeline_memory.py``; 1000 gave ~160 MB), and the data is the same as one
#: shard's. Not for a run with a ``costly_shards`` backend (a model reload or a batch job per
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


def _batches(prompts: Iterable[Prompt], size: int) -> Iterator[list[Prompt]]:
    it = iter(prompts)
    while batch := list(islice(it, size)):
        yield batch


class Plan:
    """Every prompt of ``cfg`` (at most ``limit``) and the pool models that answer each.

    Shards (``shard_size()`` prompts each) are planned one at a time (``shards()``), so a
    million-prompt run never holds all its prompts or requests at once (see the module).
    Every choice is seeded per prompt, so a shard's requests do not depend on the shard size.
    """

    def __init__(self, cfg: Config, limit: int | None = None) -> None:
        self.cfg = cfg
        self.limit = limit
        self.specs = {m.name: m for m in cfg.models}
        #: what curation removed (run.json's ``curation``); None without a ``curate`` section
        self.curation: dict[str, Any] | None = None
        #: the curated prompts; None when ``shards()`` reads them from the source
        self._curated: list[Prompt] | None = None
        if cfg.curate is not None:  # on the whole prompt set, before any shard: deterministic
            from prefsynth.stages.curate import curate_prompts

            prompts, self.stats = load_prompts(cfg.prompts, limit)
            cur = curate_prompts(prompts, cfg.curate, Path.cwd(),
                                 exact_dup=self.stats.duplicates)
            self._curated, self.curation = cur.prompts, cur.facts
        else:
            self.stats = PromptStats()
        self.count, self.models = self._survey()

    def _survey(self) -> tuple[int, list[str]]:
        """The prompt count and the pool models some prompt is assigned to (sorted), from one
        read of the prompts that keeps none of them."""
        count, picked, pool = 0, set[str](), set(self.specs)
        for batch in _batches(self._source(self.stats), AUTO_SHARD_SIZE):
            count += len(batch)
            if picked != pool:
                picked.update(m for ms in self._assign(batch).values() for m in ms)
        return count, sorted(picked)

    def _source(self, stats: PromptStats | None = None) -> Iterator[Prompt]:
        if self._curated is not None:
            return iter(self._curated)
        return iter_prompts(self.cfg.prompts, self.limit, stats)

    def _assign(self, prompts: Sequence[Prompt]) -> dict[str, list[str]]:
        return assign(prompts, list(self.specs), self.cfg.responses_per_prompt, self.cfg.seed,
                      self.cfg.on_policy)

    @property
    def prompts(self) -> list[Prompt]:
        """Every prompt, read into one list (``prefsynth estimate``; a run never asks)."""
        return list(self._source())

    @property
    def assignment(self) -> dict[str, list[str]]:
        """Every prompt's picked models (``prefsynth estimate``; a run asks per shard)."""
        return self._assign(self.prompts)

    def requests(self, prompts: Sequence[Prompt], model: str | None = None,
                 assignment: dict[str, list[str]] | None = None) -> list[ChatRequest]:
        """Generation requests of ``prompts``: for their assigned models, or for ``model``."""
        if model:
            picks = {p.id: [model] for p in prompts}
        else:
            picks = assignment if assignment is not None else self._assign(prompts)
        return generation_requests(prompts, picks, self.specs, self.cfg.seed)

    def shards(self) -> Iterator[ShardPlan]:
        size = shard_size(self.cfg, self.count)
        seen = 0
        for prompts in _batches(self._source(), size):
            seen += len(prompts)
            assignment = self._assign(prompts)
            yield ShardPlan(prompts, assignment, self.requests(prompts, None, assignment))
        if seen != self.count:  # the file changed between the two reads
            raise InputError(f"{self.cfg.prompts.path or self.cfg.prompts.dataset}: the "
                             f"prompts changed during the run ({self.count} read at the "
                             f"start, {seen} now)")

    def comparisons(self, shard: ShardPlan, generations: Sequence[Generation]
                    ) -> tuple[list[Comparison], list[Dropped]]:
        """What the judges see of a shard, once its generations are in."""
        return comparisons(shard.prompts, generations, shard.assignment, self.cfg.seed,
                           self.cfg.judge.permutations)

    def judge_rounds(self, shard: ShardPlan, comps: Sequence[Comparison], spec: JudgeSpec
                     ) -> JudgeRounds:
        """One judge's re-ask rounds over a shard's comparisons, for a caller to drive."""
        return JudgeRounds(comps, {p.id: p for p in shard.prompts}, spec, self.cfg.seed)
