"""The whole pipeline through the ``openai`` backend against a real llama.cpp server, judge
included, with 30% of requests faulted by the proxy: every prompt is accounted for and the
dataset equals the fault-free run's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from prefsynth.config import parse_config
from prefsynth.core.pipeline import run
from tests.conftest import EXAMPLE_PROMPTS

pytestmark = pytest.mark.slow

LIMIT = 4


def _config(url: str, out: Path) -> dict[str, Any]:
    endpoint = {"backend": "openai", "base_url": url, "timeout": 30.0, "max_retries": 10,
                "max_concurrency": 2}
    return {
        "name": "openai-faults",
        "seed": 3,
        "prompts": {"path": str(EXAMPLE_PROMPTS)},
        "models": [
            {"name": "smol-a", "model": "smollm2-135m", "license": "apache-2.0",
             "params": {"temperature": 1.0, "max_tokens": 32}, **endpoint},
            {"name": "smol-b", "model": "smollm2-135m", "license": "apache-2.0",
             "params": {"temperature": 0.6, "max_tokens": 32}, **endpoint},
        ],
        "responses_per_prompt": 2,
        "judge": {"name": "smol-judge", "model": "smollm2-135m", "license": "apache-2.0",
                  "mode": "structured", "params": {"temperature": 0.1, "max_tokens": 240},
                  "options": {"response_format_style": "json_object"}, **endpoint},
        "output": str(out),
    }


def _table(out: Path, name: str) -> list[dict]:
    return pq.read_table(out / name / "train.parquet").to_pylist()


def test_thirty_percent_faults_give_the_fault_free_dataset(tmp_path: Path, llama_server: str,
                                                           fault_proxy) -> None:
    clean = run(parse_config(_config(llama_server, tmp_path / "clean")), limit=LIMIT).summary
    assert clean.stages["generate"].failed == 0 and clean.stages["judge"].failed == 0

    fault_proxy.configure(rate=0.3, seed=8, retry_after="0", stall_s=40.0,
                          kinds=("429", "500", "503", "disconnect", "truncate", "malformed"))
    faulted = run(parse_config(_config(fault_proxy.base_url, tmp_path / "faulted")), limit=LIMIT)
    injected = fault_proxy.faults()
    assert injected >= 5, fault_proxy.counts

    # every prompt accounted for: a pair or a counted drop, nothing silently lost
    assert faulted.summary.pairs + sum(faulted.summary.dropped.values()) == LIMIT
    assert len(faulted.records.pairs) + len(faulted.records.dropped) == LIMIT
    stages = faulted.summary.stages
    assert stages["generate"].failed == 0 and stages["judge"].failed == 0
    assert stages["generate"].answered == 2 * LIMIT
    # and the data equals the fault-free run's, byte for byte
    for name in ("pairs", "annotations", "judgments"):
        assert _table(tmp_path / "faulted", name) == _table(tmp_path / "clean", name), name
