from __future__ import annotations

from collections import Counter

from prefsynth.records import Prompt
from prefsynth.stages.assign import assign


def _prompts(n: int) -> list[Prompt]:
    return [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"q{i}"}]) for i in range(n)]


def test_off_policy_k_distinct_and_reproducible() -> None:
    pool = [f"m{i}" for i in range(6)]
    a = assign(_prompts(200), pool, 4, seed=1)
    assert a == assign(_prompts(200), pool, 4, seed=1)
    assert a != assign(_prompts(200), pool, 4, seed=2)
    for models in a.values():
        assert len(models) == 4 == len(set(models))
        assert set(models) <= set(pool)
    use = Counter(m for ms in a.values() for m in ms)
    assert set(use) == set(pool)
    assert min(use.values()) > 200 * 4 / 6 * 0.7  # roughly balanced


def test_choice_does_not_depend_on_other_prompts() -> None:
    pool = ["a", "b", "c", "d", "e"]
    full = assign(_prompts(50), pool, 2, seed=3)
    part = assign(_prompts(50)[10:20], pool, 2, seed=3)
    assert all(full[k] == v for k, v in part.items())


def test_on_policy_one_against_one_other() -> None:
    pool = ["policy", "x", "y", "z"]
    a = assign(_prompts(100), pool, 4, seed=5, on_policy="policy")
    for models in a.values():
        assert len(models) == 2 and "policy" in models
        assert len(set(models)) == 2
    others = Counter(m for ms in a.values() for m in ms if m != "policy")
    assert set(others) == {"x", "y", "z"}
