"""Source-balanced sampling of the prompts that survive curation, as Tulu 3 drew its preference
prompts from several subsets of its SFT mix.

``per_source: {name: n}`` keeps n prompts of each named source (all of them where a source
has fewer, which the facts report) and none of the sources not named; ``total: n`` keeps n
prompts over all sources, each source in proportion to its size on average. Each prompt's
draw is the hash of (seed, prompt id) and the n lowest draws are kept: so the sample is the
same whatever order or shards the prompts come in, and when a threshold change removes or
restores one prompt, at most one other prompt enters or leaves the sample; every other
kept prompt, and its stored answers, stays. Kept prompts keep their input order.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from prefsynth.config import SampleSpec
from prefsynth.errors import InputError
from prefsynth.records import Prompt, stable_hash


def draw(seed: int, prompt_id: str) -> str:
    return stable_hash([seed, "curate-sample", prompt_id])  # never rename the purpose string


def check_sources(spec: SampleSpec, prompts: Sequence[Prompt],
                  where: str = "curate.sample.per_source") -> None:
    """A named source that no loaded prompt has is a typo, not an empty draw: say so."""
    if spec.per_source is None:
        return
    have = {p.source for p in prompts}
    for name in spec.per_source:
        if name not in have:
            shown = ", ".join(repr(s) for s in sorted(have)[:8]) or "none"
            raise InputError(f"{where}.{name}: no prompt has source {name!r} (sources: {shown})")


def sample(prompts: Sequence[Prompt], spec: SampleSpec) -> tuple[list[Prompt], list[Prompt],
                                                                    dict[str, Any]]:
    """(kept, left out, facts) where facts has the counts drawn and any shortfall."""
    quota: dict[str, int]
    if spec.per_source is not None:
        quota = dict(spec.per_source)
        groups: dict[str, list[Prompt]] = defaultdict(list)
        for p in prompts:
            if p.source in quota:
                groups[p.source].append(p)
    else:
        assert spec.total is not None
        quota = {"": spec.total}
        groups = {"": list(prompts)}
    chosen: set[str] = set()
    for name, n in quota.items():
        ranked = sorted(groups.get(name, []), key=lambda p: (draw(spec.seed, p.id), p.id))
        chosen.update(p.id for p in ranked[:n])
    kept = [p for p in prompts if p.id in chosen]
    out = [p for p in prompts if p.id not in chosen]
    by_source = Counter(p.source for p in kept)
    facts: dict[str, Any] = {
        "per_source": spec.per_source, "total": spec.total, "seed": spec.seed,
        "drawn": dict(sorted(by_source.items())),
        "shortfall": {k: {"wanted": n, "available": len(groups.get(k, []))}
                      for k, n in quota.items() if len(groups.get(k, [])) < n},
    }
    return kept, out, facts
