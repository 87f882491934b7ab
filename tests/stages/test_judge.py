from __future__ import annotations

from prefsynth.config import JudgeSpec
from prefsynth.core.keys import request_key
from prefsynth.records import ChatResult, Generation, Prompt
from prefsynth.stages.judge.comparisons import comparisons
from prefsynth.stages.judge.judgments import judge_requests, to_judgment
from prefsynth.stages.judge.rubrics import render_judge_messages

SPEC = JudgeSpec(name="j", backend="fake", model="judge-model")


def _setup(k: int = 3, perms: int = 1):
    p = Prompt(id="p1", messages=[{"role": "user", "content": "What is 2+2?"}])
    models = [f"m{i}" for i in range(k)]
    gens = [Generation("p1", m, f"answer of {m}") for m in models]
    comps, dropped = comparisons([p], gens, {"p1": models}, seed=5, permutations=perms)
    return p, models, comps, dropped


def test_orders_are_shuffled_recorded_and_distinct() -> None:
    _, _, comps, dropped = _setup(k=3, perms=4)
    assert not dropped and len(comps) == 4
    orders = [tuple(c.order) for c in comps]
    assert len(set(orders)) == 4 and all(sorted(o) == [0, 1, 2] for o in orders)
    assert orders == [tuple(c.order) for c in _setup(k=3, perms=4)[2]]  # seeded


def test_generation_failure_or_pending_drops_the_prompt() -> None:
    p = Prompt(id="p1", messages=[{"role": "user", "content": "q"}])
    gens = [Generation("p1", "a", "x"), Generation("p1", "b", None, error="HTTP 500")]
    assert comparisons([p], gens, {"p1": ["a", "b"]}, 1)[1][0].reason == "generation_failed"
    gens[1] = Generation.waiting("p1", "b")
    assert comparisons([p], gens, {"p1": ["a", "b"]}, 1)[1][0].reason == "generation_pending"
    # pending is a state, not an error text: a failure that says "pending" is a failure
    gens[1] = Generation("p1", "b", None, error="pending")
    assert comparisons([p], gens, {"p1": ["a", "b"]}, 1)[1][0].reason == "generation_failed"


def test_ratings_map_back_to_models_through_the_order() -> None:
    p, _, (comp,), _ = _setup(k=3)
    (req, *_) = judge_requests([comp], {"p1": p}, SPEC, seed=5, attempt=0)
    # the judge rates the text it saw first 5, second 3, third 1
    raw = "\n\n".join(f"#### Output for Text {i + 1}\nRating: {r}\nRationale: ok"
                      for i, r in enumerate([5, 3, 1]))
    j = to_judgment(req, comp, ChatResult(req.key, raw), SPEC)
    assert j.error is None
    for pos, idx in enumerate(comp.order):
        assert j.ratings[idx] == [5, 3, 1][pos]


def test_unparseable_and_failed_never_become_numbers() -> None:
    p, _, (comp,), _ = _setup(k=2)
    (req, *_) = judge_requests([comp], {"p1": p}, SPEC, seed=5, attempt=0)
    j = to_judgment(req, comp, ChatResult(req.key, "#### Output for Text 1\nRating: 4"), SPEC)
    assert j.error == "unparseable: found 1 of 2 ratings" and None in j.ratings
    j = to_judgment(req, comp, ChatResult(req.key, error="timeout: read"), SPEC)
    assert j.error == "request failed: timeout: read" and j.ratings == [None, None]


def test_judge_requests_are_lazy_and_keyed_by_the_rendered_prompt() -> None:
    p, _, (comp,), _ = _setup(k=2)
    reqs = judge_requests([comp], {"p1": p}, SPEC, seed=5, attempt=0)
    assert len(reqs) == 4  # one per aspect
    for r in reqs:
        assert r.messages == []  # not held: rendered again just before sending
        shown = [comp.texts[i] for i in comp.order]
        eager = render_judge_messages(r.tag.aspect, p.text, shown)  # type: ignore[union-attr]
        r.materialize()
        assert r.messages == eager
        assert r.key == request_key({"backend": "fake", "model": "judge-model"}, eager, r.params)
        r.release()
        assert r.messages == []
    again = judge_requests([comp], {"p1": p}, SPEC, seed=5, attempt=1)
    assert {r.key for r in again}.isdisjoint({r.key for r in reqs})  # a re-ask is a new request
