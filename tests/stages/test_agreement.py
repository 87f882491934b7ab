from __future__ import annotations

import math

from prefsynth.records import Judgment
from prefsynth.stages.judge.agreement import judge_agreement, kendall_tau_b, spearman


def test_spearman_and_kendall_reference_values() -> None:
    a = [1, 2, 3, 4, 5]
    assert spearman(a, [5, 6, 7, 8, 7]) == spearman(a, [5, 6, 7, 8, 7])
    assert math.isclose(spearman(a, a) or 0, 1.0)
    assert math.isclose(spearman(a, a[::-1]) or 0, -1.0)
    assert math.isclose(kendall_tau_b(a, a[::-1]) or 0, -1.0)
    # scipy.stats.spearmanr([1,2,3,4,5],[2,1,4,3,5]) = 0.8; kendalltau = 0.6
    assert math.isclose(spearman(a, [2, 1, 4, 3, 5]) or 0, 0.8)
    assert math.isclose(kendall_tau_b(a, [2, 1, 4, 3, 5]) or 0, 0.6)
    # with ties: scipy kendalltau([1,1,2,3],[1,2,2,3]) = 0.8, spearmanr = 0.8333
    assert math.isclose(kendall_tau_b([1, 1, 2, 3], [1, 2, 2, 3]) or 0, 0.8)
    assert math.isclose(spearman([1, 1, 2, 3], [1, 2, 2, 3]) or 0, 5 / 6)
    assert spearman([3, 3, 3], [1, 2, 3]) is None  # constant side


def test_panel_agreement_pairs_by_prompt_and_model() -> None:
    js = []
    for i, (ra, rb) in enumerate([((5, 1), (4, 2)), ((2, 4), (1, 5)), ((3, "N/A"), (3, 3))]):
        js.append(Judgment(f"p{i}", "honesty", ["x", "y"], list(ra), [None, None], [0, 1], judge="A"))
        js.append(Judgment(f"p{i}", "honesty", ["x", "y"], list(rb), [None, None], [1, 0], judge="B"))
    (row,) = judge_agreement(js)
    assert row["judges"] == ["A", "B"] and row["aspect"] == "honesty"
    assert row["n"] == 5  # the N/A pair is left out
    assert math.isclose(row["spearman"], 0.8)  # pairs (5,4) (1,2) (2,1) (4,5) (3,3)
