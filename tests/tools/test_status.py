"""``prefsynth status`` counts the keys a run asks: the same plan, the same re-ask rounds and
the same counting, answered from the store instead of the executor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefsynth.config import parse_config
from prefsynth.core.pipeline import run
from prefsynth.core.store import Store
from prefsynth.records import StageCounts
from prefsynth.tools.status import compute_status
from tests.conftest import fake_config


def _raw(tmp_path: Path) -> dict[str, Any]:
    raw = fake_config(tmp_path, shard_size=4)
    raw["models"][1]["options"] = {"fail_rate": 0.3}
    raw["judge"]["options"] = {"garble_first": True}
    raw["panel"] = [{"name": "judge2", "backend": "fake", "model": "fj2", "license": "mit"}]
    return raw


def _lines(by_model: dict[tuple[str, str], StageCounts]) -> dict[tuple[str, str], tuple]:
    return {k: (c.total, c.answered, c.failed, c.pending, dict(c.errors))
            for k, c in by_model.items()}


def _generate(by_model: dict[tuple[str, str], StageCounts]) -> StageCounts:
    total = StageCounts()
    for (stage, _), c in by_model.items():
        if stage == "generate":
            total.add(c)
    return total


def test_status_and_run_count_the_same_keys(tmp_path: Path) -> None:
    cfg = parse_config(_raw(tmp_path))
    before = compute_status(cfg, limit=20)
    gen_before = [c for stage, _, c in before.lines() if stage == "generate"]
    assert all(c.pending == c.total > 0 for c in gen_before)
    assert [c.pending for stage, _, c in before.lines() if stage == "judge"] == [80, 80]

    half = run(cfg, limit=10)  # a partial run: half the prompts
    assert _lines(compute_status(cfg, limit=10).summary.by_model) == _lines(half.summary.by_model)

    mid = _generate(compute_status(cfg, limit=20).summary.by_model)  # what is left
    assert (mid.answered + mid.failed, mid.pending) == (4 * 10, 4 * 10)
    full = run(cfg, limit=20)  # asks exactly that: the pending keys and the failed ones again
    gen = full.summary.stages["generate"]
    assert (gen.total, gen.cached) == (4 * 20, mid.answered)
    assert gen.answered + gen.failed == mid.failed + mid.pending
    after = compute_status(cfg, limit=20)
    assert _lines(after.summary.by_model) == _lines(full.summary.by_model)
    assert after.summary.reasks == full.summary.reasks > 0
    assert after.summary.dropped["generation_failed"] == \
        full.summary.dropped["generation_failed"] > 0

    # and every key status counts is a row of the store, stage by stage
    with Store(cfg.store_path) as store:
        rows = store.stage_counts()
    for stage, model, c in after.lines():
        if stage == "generate":
            assert rows[("generate", model)] == (c.answered, c.failed)
    assert rows[("judge-reask1", "judge")] == (after.summary.reasks, 0)
