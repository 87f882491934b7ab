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
