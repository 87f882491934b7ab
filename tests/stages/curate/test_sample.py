"""Source-balanced sampling: per-source counts or a total, order- and shard-free, stable when
one prompt comes or goes."""

from __future__ import annotations

import random

import pytest

from prefsynth.config import SampleSpec
from prefsynth.errors import InputError
from prefsynth.records import Prompt
from prefsynth.stages.curate.sample import check_sources, sample


def _prompts(counts: dict[str, int]) -> list[Prompt]:
    out = [Prompt(f"{src}-{i}", [{"role": "user", "content": f"{src} {i}"}], source=src)
           for src, n in counts.items() for i in range(n)]
    random.Random(0).shuffle(out)
    return out


def test_per_source_counts_and_input_order() -> None:
    prompts = _prompts({"flan": 50, "wildchat": 30, "code": 20})
    kept, out, facts = sample(prompts, SampleSpec(per_source={"flan": 10, "code": 25}))
    assert facts["drawn"] == {"code": 20, "flan": 10}
    assert facts["shortfall"] == {"code": {"wanted": 25, "available": 20}}
    assert len(out) == 70 and not {p.source for p in kept} - {"flan", "code"}
    order = {p.id: i for i, p in enumerate(prompts)}
    assert [order[p.id] for p in kept] == sorted(order[p.id] for p in kept)


def test_total_is_independent_of_order_and_depends_on_seed() -> None:
    prompts = _prompts({"a": 200, "b": 100})
    first = {p.id for p in sample(prompts, SampleSpec(total=60))[0]}
    again = {p.id for p in sample(list(reversed(prompts)), SampleSpec(total=60))[0]}
    other = {p.id for p in sample(prompts, SampleSpec(total=60, seed=1))[0]}
    assert first == again and len(first) == 60 and first != other


def test_one_prompt_removed_moves_at_most_one_other() -> None:
    prompts = _prompts({"a": 100, "b": 100})
    spec = SampleSpec(per_source={"a": 20, "b": 20})
    before = {p.id for p in sample(prompts, spec)[0]}
    for gone in [*sorted(before)[:5], "a-99", "b-0"]:
        after = {p.id for p in sample([p for p in prompts if p.id != gone], spec)[0]}
        assert len(before - after - {gone}) == 0 and len(after - before) <= 1


def test_a_source_no_prompt_has_is_one_line() -> None:
    prompts = _prompts({"flan": 3})
    with pytest.raises(InputError, match=r"curate.sample.per_source.flna: no prompt has "
                                         r"source 'flna' \(sources: 'flan'\)"):
        check_sources(SampleSpec(per_source={"flna": 2}), prompts)
