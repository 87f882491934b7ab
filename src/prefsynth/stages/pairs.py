"""Pairs: judged responses become chosen/rejected pairs. Pure — changing the policy and
re-pairing never calls a model.

Per model: each aspect's rating is averaged over permutations (N/A and missing excluded), then
aspects are aggregated (``mean`` with optional weights, or ``min``). Chosen is the best score
(a seeded pick among equals); rejected is a random strictly lower one (Tulu 3) or the lowest,
at least ``min_margin`` below. Every prompt without a pair is dropped with a reason.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

from prefsynth.config import PairPolicy
from prefsynth.records import Dropped, Generation, Judgment, Pair, Prompt
from prefsynth.seeding import rng_for

Scores = dict[str, float | None]


def aspect_means(judgments: Sequence[Judgment]) -> dict[str, dict[str, float | None]]:
    """model -> aspect -> mean numeric rating over permutations (None if none numeric)."""
    acc: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    seen: dict[str, set[str]] = defaultdict(set)
    for j in judgments:
        for model, r in zip(j.models, j.ratings, strict=True):
            seen[model].add(j.aspect)
            if isinstance(r, int):
                acc[model][j.aspect].append(r)
    return {m: {a: (sum(acc[m][a]) / len(acc[m][a]) if acc[m][a] else None) for a in seen[m]}
            for m in seen}


def score(per_aspect: Mapping[str, float | None], policy: PairPolicy) -> float | None:
    vals = {a: v for a, v in per_aspect.items() if v is not None}
    if not vals:
        return None
    if policy.aggregate == "min":
        return min(vals.values())
    w = {a: policy.weights.get(a, 1.0) for a in vals}
    total = sum(w.values())
    return sum(vals[a] * w[a] for a in vals) / total if total else None


def _pair_one(p: Prompt, models: list[str], scores: Scores, texts: Mapping[str, str],
              passes: Mapping[str, bool] | None, policy: PairPolicy, seed: int
              ) -> Pair | Dropped:
    if any(scores[m] is None for m in models):
        return Dropped(p.id, "no_numeric_rating")
    s = {m: float(scores[m] or 0.0) for m in models}
    candidates = list(models)
    if passes is not None:
        candidates = [m for m in models if passes[m]]
        if not candidates:
            return Dropped(p.id, "no_response_passes_constraints")
    best = max(s[m] for m in candidates)
    if all(s[m] == best for m in models):
        return Dropped(p.id, "all_tied")
    rng = rng_for(seed, "pair", p.id)
    chosen = rng.choice(sorted(m for m in candidates if s[m] == best))
    lower = sorted(m for m in models if s[m] < best)
    if passes is not None and policy.constraints == "strict":
        lower = [m for m in lower if not passes[m]]
        if not lower:
            return Dropped(p.id, "no_rejected_fails_constraints")
    lower = [m for m in lower if best - s[m] >= policy.min_margin]
    if not lower:
        return Dropped(p.id, "below_min_margin")
    if policy.rejected == "lowest":
        low = min(s[m] for m in lower)
        rejected = rng.choice([m for m in lower if s[m] == low])
    else:
        rejected = rng.choice(lower)
    return Pair(
        id=p.id,
        prompt=p.text,
        chosen=[*p.messages, {"role": "assistant", "content": texts[chosen]}],
        rejected=[*p.messages, {"role": "assistant", "content": texts[rejected]}],
        chosen_rating=s[chosen],
        rejected_rating=s[rejected],
        chosen_model=chosen,
        rejected_model=rejected,
        source=p.source,
    )


def make_pairs(prompts: Sequence[Prompt], generations: Sequence[Generation],
               judgments: Sequence[Judgment], policy: PairPolicy, seed: int,
               constraint_results: Mapping[tuple[str, str], list[bool]] | None = None,
               skip: set[str] | None = None) -> tuple[list[Pair], list[Dropped]]:
    """Pairs in prompt order, plus a ``Dropped`` for each judged prompt without a pair.

    ``constraint_results`` maps (prompt id, model) to per-constraint pass flags; used when the
    policy's ``constraints`` is ``verify`` or ``strict``. ``skip``: prompt ids already dropped.
    """
    by_prompt: dict[str, list[Judgment]] = defaultdict(list)
    for j in judgments:
        by_prompt[j.prompt_id].append(j)
    texts: dict[str, dict[str, str]] = defaultdict(dict)
    for g in generations:
        if g.text is not None:
            texts[g.prompt_id][g.model] = g.text
    pairs: list[Pair] = []
    dropped: list[Dropped] = []
    for p in prompts:
        if skip and p.id in skip:
            continue
        js = by_prompt.get(p.id, [])
        if not js:
            continue
        if any(j.pending for j in js):
            dropped.append(Dropped(p.id, "judgment_pending"))
            continue
        if any(j.error for j in js):
            dropped.append(Dropped(p.id, "judgment_failed"))
            continue
        models = list(js[0].models)
        means = aspect_means(js)
        scores = {m: score(means.get(m, {}), policy) for m in models}
        passes = None
        if policy.constraints != "off" and p.instruction_ids and constraint_results is not None:
            passes = {m: all(constraint_results.get((p.id, m), [False])) for m in models}
        out = _pair_one(p, models, scores, texts[p.id], passes, policy, seed)
        (pairs if isinstance(out, Pair) else dropped).append(out)  # type: ignore[arg-type]
    return pairs, dropped


def position_sums(judgments: Sequence[Judgment]) -> dict[str, dict[int, tuple[int, int]]]:
    """aspect -> shown position (0-based) -> (sum, count) of numeric ratings; failed
    judgments left out. Sums, so shards of a streamed run can be added up."""
    acc: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for j in judgments:
        if j.error:
            continue
        for pos, idx in enumerate(j.order):
            r = j.ratings[idx]
            if isinstance(r, int):
                acc[j.aspect][pos][0] += r
                acc[j.aspect][pos][1] += 1
    return {a: {p: (v[0], v[1]) for p, v in by.items()} for a, by in acc.items()}


def means_from_sums(sums: Mapping[str, Mapping[int, Sequence[int]]]
                    ) -> dict[str, list[float | None]]:
    """aspect -> mean rating per position from ``position_sums``-shaped (sum, count) pairs."""
    out: dict[str, list[float | None]] = {}
    for aspect, by_pos in sums.items():
        if by_pos:
            out[aspect] = [by_pos[i][0] / by_pos[i][1] if i in by_pos and by_pos[i][1] else None
                           for i in range(max(by_pos) + 1)]
    return out


def position_means(judgments: Sequence[Judgment]) -> dict[str, list[float | None]]:
    """aspect -> mean numeric rating by shown position (1-based index = list index + 1)."""
    return means_from_sums(position_sums(judgments))


def position_spreads(means: Mapping[str, Sequence[float | None]]) -> dict[str, float]:
    """aspect -> max - min of its mean rating across shown positions (aspects with at least
    two positions rated): how much the judge's ratings follow presentation order."""
    out: dict[str, float] = {}
    for aspect, vals in means.items():
        known = [v for v in vals if v is not None]
        if len(known) > 1:
            out[aspect] = max(known) - min(known)
    return out
