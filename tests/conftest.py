"""Shared fixtures: configs written to real files, the shipped example prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PROMPTS = ROOT / "examples" / "prompts.jsonl"


def fake_config(tmp_path: Path, prompts: Path | str = EXAMPLE_PROMPTS, **over: Any) -> dict[str, Any]:
    """A config whose pool and judge are the deterministic fake backend (logic tests only)."""
    cfg: dict[str, Any] = {
        "name": "fake-run",
        "seed": 7,
        "prompts": {"path": str(prompts)},
        "models": [
            {"name": "a", "backend": "fake", "model": "fa", "license": "apache-2.0"},
            {"name": "b", "backend": "fake", "model": "fb", "license": "llama3.1"},
            {"name": "c", "backend": "fake", "model": "fc", "license": "cc-by-nc-4.0"},
            {"name": "d", "backend": "fake", "model": "fd", "license": "mit"},
        ],
        "responses_per_prompt": 4,
        "judge": {"name": "judge", "backend": "fake", "model": "fj", "license": "openai"},
        "output": str(tmp_path / "out"),
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg


def write_config(tmp_path: Path, cfg: dict[str, Any], name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture
def fake_cfg(tmp_path: Path) -> dict[str, Any]:
    return fake_config(tmp_path)
