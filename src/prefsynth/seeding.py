"""Per-item randomness. Every random choice is seeded by (run seed, item, purpose), never by a
global generator's position, so a resumed or partial run makes exactly the same choices as an
uninterrupted one, whatever order the items were processed in."""

from __future__ import annotations

import random

from prefsynth.records import stable_hash


def rng_for(seed: int, *parts: object) -> random.Random:
    return random.Random(int(stable_hash([seed, *map(str, parts)], 16), 16))


def seed_for(seed: int, *parts: object) -> int:
    """A 31-bit seed for a backend's sampler (llama.cpp, vLLM and OpenAI all accept it)."""
    return int(stable_hash([seed, *map(str, parts)], 8), 16) & 0x7FFFFFFF
