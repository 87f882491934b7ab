"""Prompt curation, between loading and the model mix: eval decontamination, near-duplicate
removal and source-balanced sampling (exact duplicates are already gone at load).

``curate_prompts(prompts, cfg.curate, base_dir)`` is the whole step: kept prompts in input
order, a ``Removal`` per prompt left out, additive ``CurationStats`` and the facts the card
and run.json show (``output.curation`` writes and renders them). No model is called, and the
result depends only on the prompts, the eval sets and the thresholds: redoing it is cheap,
and a changed threshold changes only the prompts it concerns.

Order: decontamination first, then near duplicates, then sampling. A contaminated prompt is
removed before it can stand for its cluster, so a clean near-copy of it is not dropped as
its duplicate; sampling draws from what is clean and distinct.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from prefsynth.config import CurateSpec
from prefsynth.errors import MissingExtraError
from prefsynth.records import CurationStats, Prompt, Removal
from prefsynth.stages.curate.tokenize import user_turns, words

log = logging.getLogger(__name__)

BATCH = 2048  # prompts hashed and looked up together (numpy works per batch)
EXAMPLES = 5  # matches of each kind kept for the card


@dataclass(slots=True)
class CurationResult:
    prompts: list[Prompt]  # kept, in input order
    removals: list[Removal]
    stats: CurationStats
    facts: dict[str, Any] = field(default_factory=dict)


class Curator:
    """Curation state that spans shards: the eval index (built once, read-only) and the
    near-duplicate index of the prompts kept so far. ``feed`` shards in input order, then
    ``finish``; the result equals one ``feed`` of every prompt."""

    def __init__(self, spec: CurateSpec, base_dir: Path | None = None) -> None:
        try:
            from prefsynth.stages.curate.decontaminate import build_index
        except ImportError:
            raise MissingExtraError("prompt curation (curate)", "curate") from None
        from prefsynth.stages.curate.evals import load_eval_sets
        from prefsynth.stages.curate.near_dup import NearDup

        self.spec = spec
        self.stats = CurationStats()
        self.examples: dict[str, list[dict[str, Any]]] = {"eval_overlap": [], "near_dup": []}
        self.index = None
        self.eval_sets: list[tuple[str, str, str]] = []  # (name, origin, field)
        if spec.decontaminate is not None:
            d = spec.decontaminate
            sets = load_eval_sets(d.evals, base_dir or Path.cwd())
            self.index = build_index(sets, d.ngram, d.threshold)
            self.eval_sets = [(s.name, s.origin, s.field) for s in sets]
        self.near = NearDup(spec.near_dup) if spec.near_dup is not None else None
        self.sample_facts: dict[str, Any] | None = None
        self.seen: list[Prompt] = []

    def feed(self, prompts: Sequence[Prompt]) -> tuple[list[Prompt], list[Removal]]:
        """Decontaminate and deduplicate one shard against every prompt fed before it."""
        from prefsynth.stages.curate.decontaminate import scan

        kept: list[Prompt] = []
        removed: list[Removal] = []
        self.stats.prompts_in += len(prompts)
        for start in range(0, len(prompts), BATCH):
            batch = prompts[start:start + BATCH]
            turns = [[words(t) for t in user_turns(p)] for p in batch]
            matches = scan(self.index, turns) if self.index is not None else [None] * len(batch)
            why: list[Removal | None] = [
                None if m is None else Removal(p.id, "eval_overlap", m.eval_set, m.eval_id,
                                               m.ratio) for p, m in zip(batch, matches, strict=True)]
            clean = [i for i, r in enumerate(why) if r is None]
            if self.near is not None:
                dups = self.near.check([batch[i].id for i in clean],
                                       [[w for t in turns[i] for w in t] for i in clean],
                                       ["\n".join(user_turns(batch[i])) for i in clean])
                for i, dup in zip(clean, dups, strict=True):
                    if dup is not None:
                        why[i] = Removal(batch[i].id, "near_dup", matched_prompt_id=dup)
            for p, r in zip(batch, why, strict=True):  # in input order
                if r is None:
                    kept.append(p)
                else:
                    self._remove(removed, r, p)
        self.seen.extend(kept)
        return kept, removed

    def _remove(self, removed: list[Removal], r: Removal, p: Prompt) -> None:
        removed.append(r)
        self.stats.count(r)
        shown = self.examples[r.reason]
        if len(shown) < EXAMPLES:
            shown.append({"prompt_id": p.id, "source": p.source,
                          **{k: v for k, v in asdict(r).items()  # type: ignore[call-overload]
                             if v is not None and k not in ("prompt_id", "reason")}})

    def finish(self, all_prompts: Sequence[Prompt] = ()) -> tuple[list[Prompt], list[Removal]]:
        """Sampling, over every prompt kept by ``feed``. ``all_prompts`` (the loaded set)
        lets a misspelt source name fail as one line instead of drawing nothing."""
        from prefsynth.stages.curate.sample import check_sources, sample

        kept = self.seen
        removed: list[Removal] = []
        if self.spec.sample is not None:
            check_sources(self.spec.sample, all_prompts or kept)
            kept, out, self.sample_facts = sample(kept, self.spec.sample)
            for p in out:
                r = Removal(p.id, "sampled_out")
                removed.append(r)
                self.stats.count(r)
        self.stats.kept = len(kept)
        return kept, removed


def curate_prompts(prompts: Sequence[Prompt], spec: CurateSpec, base_dir: Path | None = None,
                   *, exact_dup: int = 0, shard_size: int | None = None) -> CurationResult:
    """Curate a loaded prompt set. ``exact_dup`` is ``PromptStats.duplicates`` from loading
    (counted on the card); ``shard_size`` feeds the prompts in shards (same result)."""
    from prefsynth.stages.curate.summary import curation_facts

    if spec.sample is not None:  # fail on a misspelt source before any work
        from prefsynth.stages.curate.sample import check_sources

        check_sources(spec.sample, prompts)
    cur = Curator(spec, base_dir)
    cur.stats.exact_dup = exact_dup
    removals: list[Removal] = []
    step = shard_size or max(len(prompts), 1)
    for start in range(0, len(prompts), step):
        removals.extend(cur.feed(prompts[start:start + step])[1])
    kept, sampled_out = cur.finish(prompts)
    removals.extend(sampled_out)
    log.info("curation kept %d of %d prompts", len(kept), len(prompts))
    return CurationResult(kept, removals, cur.stats, curation_facts(cur, kept))
