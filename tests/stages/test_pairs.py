from __future__ import annotations

from prefsynth.config import PairPolicy
from prefsynth.records import Generation, Judgment, Prompt, RequestState
from prefsynth.stages.pairs import aspect_means, make_pairs, position_means, score

ASPECTS = ["helpfulness", "honesty"]


def _prompt(pid: str = "p", constrained: bool = False) -> Prompt:
    p = Prompt(id=pid, messages=[{"role": "user", "content": f"question {pid}"}], source="src")
    if constrained:
        p.instruction_ids = ["punctuation:no_comma"]
        p.constraint_kwargs = [{}]
    return p


def _gens(pid: str, models: list[str]) -> list[Generation]:
    return [Generation(pid, m, f"answer of {m}") for m in models]


def _judg(pid: str, models: list[str], by_aspect: dict[str, list], order=None, error=None,
          state=RequestState.ANSWERED):
    order = order or list(range(len(models)))
    return [Judgment(pid, a, models, r, [None] * len(models), order, error=error, state=state)
            for a, r in by_aspect.items()]


def test_mean_excludes_na_and_missing() -> None:
    js = _judg("p", ["a", "b"], {"helpfulness": [4, 2], "honesty": ["N/A", 4]})
    means = aspect_means(js)
    assert means["a"] == {"helpfulness": 4.0, "honesty": None}
    assert score(means["a"], PairPolicy()) == 4.0
    assert score(means["b"], PairPolicy()) == 3.0
    assert score(means["b"], PairPolicy(aggregate="min")) == 2.0
    assert score(means["b"], PairPolicy(weights={"honesty": 3.0})) == (2 + 4 * 3) / 4


def test_chosen_best_rejected_random_lower_and_messages() -> None:
    models = ["a", "b", "c", "d"]
    js = _judg("p", models, {"helpfulness": [5, 3, 2, 1], "honesty": [5, 3, 2, 1]})
    pairs, dropped = make_pairs([_prompt()], _gens("p", models), js, PairPolicy(), seed=1)
    assert not dropped
    (pair,) = pairs
    assert pair.chosen_model == "a" and pair.chosen_rating == 5.0
    assert pair.rejected_model in {"b", "c", "d"}
    assert pair.chosen == [{"role": "user", "content": "question p"},
                           {"role": "assistant", "content": "answer of a"}]
    assert pair.prompt == "question p" and pair.source == "src"
    picked = {make_pairs([_prompt()], _gens("p", models), js, PairPolicy(), seed=s)[0][0].rejected_model
              for s in range(30)}
    assert picked == {"b", "c", "d"}  # random among all strictly lower
    (low,), _ = make_pairs([_prompt()], _gens("p", models), js, PairPolicy(rejected="lowest"), 1)
    assert low.rejected_model == "d"


def test_drops_counted_by_reason() -> None:
    models = ["a", "b"]
    prompts = [_prompt(x) for x in ("tie", "fail", "margin", "na", "pending")]
    js = (_judg("tie", models, {"helpfulness": [3, 3]})
          + _judg("fail", models, {"helpfulness": [None, 3]}, error="unparseable: found 1 of 2")
          + _judg("margin", models, {"helpfulness": [4, 3]})
          + _judg("na", models, {"honesty": ["N/A", 4]})
          + _judg("pending", models, {"helpfulness": [None, None]}, error="pending",
                  state=RequestState.PENDING))
    gens = [g for p in prompts for g in _gens(p.id, models)]
    pairs, dropped = make_pairs(prompts, gens, js, PairPolicy(min_margin=1.5), seed=1)
    assert pairs == []
    assert {d.prompt_id: d.reason for d in dropped} == {
        "tie": "all_tied", "fail": "judgment_failed", "margin": "below_min_margin",
        "na": "no_numeric_rating", "pending": "judgment_pending"}


def test_ties_at_top_never_pair_two_equals() -> None:
    models = ["a", "b", "c"]
    js = _judg("p", models, {"helpfulness": [4, 4, 2]})
    for seed in range(10):
        (pair,), _ = make_pairs([_prompt()], _gens("p", models), js, PairPolicy(), seed)
        assert pair.chosen_model in {"a", "b"} and pair.rejected_model == "c"


def test_constraint_verified_pairs() -> None:
    models = ["a", "b", "c"]
    js = _judg("p", models, {"helpfulness": [5, 4, 1]})
    prompts = [_prompt(constrained=True)]
    cons = {("p", "a"): [False], ("p", "b"): [True], ("p", "c"): [True]}
    (pair,), _ = make_pairs(prompts, _gens("p", models), js, PairPolicy(constraints="verify"), 1, cons)
    assert pair.chosen_model == "b"  # best passing response, not the best-rated one
    (pair,), _ = make_pairs(prompts, _gens("p", models), js, PairPolicy(constraints="off"), 1, cons)
    assert pair.chosen_model == "a"
    _, (drop,) = make_pairs(prompts, _gens("p", models), js, PairPolicy(constraints="strict"), 1, cons)
    assert drop.reason == "no_rejected_fails_constraints"  # c is lower but passes too
    cons_none = {k: [False] for k in cons}
    _, (drop,) = make_pairs(prompts, _gens("p", models), js, PairPolicy(constraints="verify"), 1,
                            cons_none)
    assert drop.reason == "no_response_passes_constraints"


def test_position_means_by_shown_position() -> None:
    # model x shown second, model y shown first; ratings are by model
    js = [Judgment("p", "helpfulness", ["x", "y"], [5, 1], [None, None], [1, 0])]
    assert position_means(js) == {"helpfulness": [1.0, 5.0]}
