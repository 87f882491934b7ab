"""The plan's automatic shard size: bounded memory by default, one shard where shards cost."""

from __future__ import annotations

import json
from pathlib import Path

from prefsynth.config import parse_config
from prefsynth.core.plan import AUTO_SHARD_SIZE, Plan, shard_size
from tests.conftest import fake_config


def _prompts(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(n)))
    return path


def test_unset_shard_size_shards_automatically(tmp_path: Path) -> None:
    n = AUTO_SHARD_SIZE * 2 + 5
    plan = Plan(parse_config(fake_config(tmp_path, _prompts(tmp_path, n))))
    sizes = [len(s.prompts) for s in plan.shards()]
    assert sizes == [AUTO_SHARD_SIZE, AUTO_SHARD_SIZE, 5]


def test_explicit_shard_size_wins(tmp_path: Path) -> None:
    cfg = parse_config(fake_config(tmp_path, _prompts(tmp_path, 10), shard_size=4))
    assert [len(s.prompts) for s in Plan(cfg).shards()] == [4, 4, 2]


def test_a_backend_that_pays_per_shard_keeps_one_shard(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    raw = fake_config(tmp_path, _prompts(tmp_path, 3))
    raw["judge"] = {"name": "j", "backend": "openai-batch", "model": "gpt-4o-2024-08-06"}
    cfg = parse_config(raw)
    assert shard_size(cfg, AUTO_SHARD_SIZE * 3) == AUTO_SHARD_SIZE * 3
    cfg.shard_size = 50  # the user's choice still holds
    assert shard_size(cfg, AUTO_SHARD_SIZE * 3) == 50


def test_the_plan_holds_no_prompt_and_shards_read_the_source_again(tmp_path: Path) -> None:
    """Without curation the plan keeps counts and picked models only; its shards are the
    prompts ``load_prompts`` gives, deduplicated the same way, with the same picks."""
    from prefsynth.stages.assign import assign
    from prefsynth.stages.prompts import load_prompts

    path = _prompts(tmp_path, 25)
    with path.open("a") as f:
        f.write(json.dumps({"prompt": "question 3"}) + "\n")  # a duplicate
    cfg = parse_config(fake_config(tmp_path, path, shard_size=10, responses_per_prompt=2))
    plan = Plan(cfg)
    assert not any(isinstance(v, list) for v in vars(plan).values() if v is not plan.models)
    assert (plan.count, plan.stats.kept, plan.stats.duplicates) == (25, 25, 1)
    prompts, _ = load_prompts(cfg.prompts)
    shards = list(plan.shards())
    assert [p for s in shards for p in s.prompts] == prompts
    picks = assign(prompts, [m.name for m in cfg.models], 2, cfg.seed)
    assert {k: v for s in shards for k, v in s.assignment.items()} == picks
    assert plan.models == sorted({m for ms in picks.values() for m in ms})


def test_prompts_changed_during_the_run_stop_it(tmp_path: Path) -> None:
    import pytest

    from prefsynth.errors import InputError

    path = _prompts(tmp_path, 12)
    plan = Plan(parse_config(fake_config(tmp_path, path, shard_size=5)))
    path.write_text("".join(json.dumps({"prompt": f"q {i}"}) + "\n" for i in range(8)))
    with pytest.raises(InputError, match="changed during the run"):
        list(plan.shards())
