"""Comparisons: the responses one judge request sees, shuffled per (prompt, permutation).

Responses are shuffled before judging (seeded per prompt and permutation) and the order is
recorded, so position bias does not follow model identity. A prompt whose picked models did
not all answer is dropped here, with its reason.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from prefsynth.records import Comparison, Dropped, Generation, Prompt
from prefsynth.seeding import rng_for


def _orders(seed: int, prompt_id: str, k: int, n: int) -> list[list[int]]:
    """``n`` distinct shuffled orders of ``k`` responses (as distinct as k! allows)."""
    rng = rng_for(seed, "order", prompt_id)
    all_orders = [list(p) for p in itertools.permutations(range(k))] if k <= 6 else []
    if all_orders:
        rng.shuffle(all_orders)
        return [all_orders[i % len(all_orders)] for i in range(n)]
    out = []
    for _ in range(n):
        order = list(range(k))
        rng.shuffle(order)
        out.append(order)
    return out


def comparisons(prompts: Sequence[Prompt], generations: Sequence[Generation],
                assignment: Mapping[str, list[str]], seed: int, permutations: int = 1
                ) -> tuple[list[Comparison], list[Dropped]]:
    """Comparisons for prompts whose every picked model answered; the rest are dropped."""
    gens = {(g.prompt_id, g.model): g for g in generations}
    comps: list[Comparison] = []
    dropped: list[Dropped] = []
    for p in prompts:
        models = assignment[p.id]
        got = [gens.get((p.id, m)) for m in models]
        if any(g is None or g.pending for g in got):
            dropped.append(Dropped(p.id, "generation_pending"))
            continue
        if any(g is None or g.text is None for g in got):
            dropped.append(Dropped(p.id, "generation_failed"))
            continue
        texts = [g.text or "" for g in got if g is not None]
        for i, order in enumerate(_orders(seed, p.id, len(models), permutations)):
            comps.append(Comparison(p.id, list(models), texts, order, i))
    return comps, dropped
