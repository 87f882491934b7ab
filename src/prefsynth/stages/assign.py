"""Assign: which pool models answer which prompt. Pure and seeded.

Off-policy (Tulu 3's default): ``k`` distinct models per prompt, sampled from the pool.
On-policy: the ``on_policy`` model against one random other pool model. Only what is
assigned is generated — one response per (prompt, picked model), not the whole pool per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

from prefsynth.records import Prompt
from prefsynth.seeding import rng_for


def assign(prompts: Sequence[Prompt], pool: Sequence[str], k: int, seed: int,
        on_policy: str | None = None) -> dict[str, list[str]]:
    """prompt id -> the model names that answer it (sorted for stable output)."""
    out: dict[str, list[str]] = {}
    others = [m for m in pool if m != on_policy]
    for p in prompts:
        rng = rng_for(seed, "mix", p.id)  # the purpose string is part of every seed: never rename it
        if on_policy is not None:
            picked = [on_policy, rng.choice(others)]
        else:
            picked = rng.sample(list(pool), k)
        out[p.id] = sorted(picked)
    return out
