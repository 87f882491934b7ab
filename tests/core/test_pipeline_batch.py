"""The pipeline with the judge on the Batch API (a loopback implementation of OpenAI's Files
and Batches endpoints): ``run`` returns after submitting, ``status`` shows the batch, a later
run collects it; a crash between runs never resubmits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefsynth.cli import EXIT_PENDING, main
from prefsynth.config import ModelSpec
from prefsynth.records import ChatRequest
from prefsynth.testing import FakeBackend
from tests.conftest import fake_config, write_config
from tests.servers.batch_api import BatchAPI, serve

KEY_ENV = "PREFSYNTH_TEST_BATCH_KEY"
SENTINEL = "sk-sentinel-pipeline-0b5e"


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[BatchAPI, str]]:
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    server = BatchAPI(api_key=SENTINEL)
    judge = FakeBackend(ModelSpec(name="j", backend="fake", model="gpt-4o"))
    server.responder = lambda body: judge._one(  # a judge that answers in UltraFeedback format
        ChatRequest("k", body["model"], body["messages"])).text or ""
    with serve(server) as url:
        yield server, url


def test_submit_then_collect(tmp_path: Path, api, capsys) -> None:
    server, url = api
    cfg = fake_config(tmp_path)
    cfg["judge"] = {"name": "gpt-4o", "backend": "openai-batch", "model": "gpt-4o-2024-08-06",
                    "license": "openai", "base_url": url, "api_key_env": KEY_ENV,
                    "options": {"poll_interval": 0.02, "max_requests_per_file": 50}}
    path = write_config(tmp_path, cfg)

    assert main(["run", str(path), "--limit", "20"]) == EXIT_PENDING
    out = capsys.readouterr().out
    assert "pending" in out and server.created == 2  # 80 judge requests, 50 per file
    facts = json.loads((tmp_path / "out" / "run.json").read_text())
    assert facts["complete"] is False and facts["pairs"] == 0

    assert main(["status", str(path), "--limit", "20"]) == 0
    status = capsys.readouterr().out
    assert status.count("batch batch-") == 2 and "judge     gpt-4o" in status

    # a new process (the store is all it shares with the first) collects, never resubmits
    assert main(["run", str(path), "--limit", "20", "--wait"]) == 0
    out = capsys.readouterr().out
    assert server.created == 2
    facts = json.loads((tmp_path / "out" / "run.json").read_text())
    assert facts["complete"] is True and facts["pairs"] + sum(facts["dropped"].values()) == 20
    assert facts["pairs"] > 0

    # the key is nowhere on disk
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            assert SENTINEL.encode() not in f.read_bytes(), f
