"""The ``anthropic-batch`` backend against a loopback Message Batches API (tests/servers).

What matters is money and crash safety: a recorded batch is polled, never paid for twice
(a run killed right after create included); errored, expired and canceled requests are
submitted again alone; the API key never reaches disk or errors. What both batch backends
share (a restarted process polls, results matched by ``custom_id``, no double create) is tested
on both in test_batch_common.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest

from prefsynth.backends import create_backend
from prefsynth.backends.anthropic_batch import iter_batches
from prefsynth.backends.anthropic_common import message_body
from prefsynth.cli import EXIT_PENDING, main
from prefsynth.config import ModelSpec, parse_config
from prefsynth.core.store import Store
from prefsynth.errors import BackendError, ConfigError, MissingExtraError
from prefsynth.records import ChatRequest, ChatResult
from prefsynth.testing import FakeBackend
from prefsynth.tools.estimate import estimate
from tests.conftest import ROOT, fake_config, write_config
from tests.servers.anthropic_api import KEY_ENV, SENTINEL, AnthropicAPI, expected_text
from tests.servers.batch_api import run_batch as run

pytestmark = pytest.mark.timeout(90)

MODEL = "claude-3-5-sonnet-20241022"



def spec(url: str, **options: Any) -> ModelSpec:
    retries = options.pop("max_retries", 3)
    opts = {"poll_interval": 0.02, "http_retries": 0, **options}
    return ModelSpec(name="judge", backend="anthropic-batch", model=MODEL, base_url=url,
                     api_key_env=KEY_ENV, max_retries=retries, options=opts)


def requests(n: int, start: int = 0) -> list[ChatRequest]:
    return [ChatRequest(key=f"key{i:04d}", model=MODEL, params={"temperature": 0.1,
                                                                 "max_tokens": 256},
                        messages=[{"role": "system", "content": "You rate."},
                                  {"role": "user", "content": f"rate response number {i}"}])
            for i in range(start, start + n)]



def assert_answered(reqs: Sequence[ChatRequest], results: Sequence[ChatResult]) -> None:
    assert [r.key for r in results] == [q.key for q in reqs]
    for q, r in zip(reqs, results, strict=True):
        assert r.ok, r.error
        assert r.text == expected_text(q.messages[1:]) and r.finish_reason == "stop"
        assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens == 2


def test_errored_and_expired_requests_are_resubmitted_alone(
        anthropic_api: tuple[AnthropicAPI, str], store: Store) -> None:
    server, url = anthropic_api
    server.error_once = {"key0002"}
    server.expire = 0.3  # the last 3 of 10 are not run within the window
    reqs = requests(10)
    results = run(spec(url), store, reqs, wait=False, calls=3)  # submit, poll, collect
    assert [r.ok for r in results] == [True, True, False] + [True] * 4 + [False] * 3
    assert results[2].error == ("batch item errored: invalid_request_error: injected failure")
    assert all(r.error and r.error.startswith("batch item expired") for r in results[7:])
    # the next run (the executor asks again for what failed): one new batch, those 4 alone
    again = run(spec(url), store, reqs, wait=True)
    assert_answered(reqs, again)
    first, second = store.batches(model="judge")
    assert server.created == 2 and second["keys"] == first["info"]["failed_keys"]
    assert second["keys"] == ["key0002", "key0007", "key0008", "key0009"]


def test_with_wait_failed_items_get_new_rounds_up_to_max_retries(
        anthropic_api: tuple[AnthropicAPI, str], store: Store) -> None:
    server, url = anthropic_api
    server.expire = 0.5
    reqs = requests(4)
    results = run(spec(url), store, reqs, wait=True)
    assert_answered(reqs, results)
    assert [r.attempts for r in results] == [1, 1, 2, 2] and server.created == 2
    # an item that always errors: max_retries=1 means two rounds, then the error stays
    server.error_always = {"key0050"}
    [r] = run(spec(url, max_retries=1), store, requests(1, start=50), wait=True)
    assert r.error == "batch item errored: invalid_request_error: injected failure"
    assert r.attempts == 2 and server.created == 4


def test_canceled_batch_items_are_resubmitted(
        anthropic_api: tuple[AnthropicAPI, str], store: Store) -> None:
    server, url = anthropic_api
    server.steps = 5
    reqs = requests(3)
    run(spec(url), store, reqs, wait=False)
    [rec] = store.batches(model="judge")

    async def cancel() -> None:  # someone cancels the batch in the console, through the SDK
        client = anthropic.AsyncAnthropic(api_key=SENTINEL, base_url=url)
        obj = await client.messages.batches.cancel(rec["batch_id"])
        assert obj.processing_status == "canceling"
        await client.close()

    asyncio.run(cancel())
    results = run(spec(url), store, reqs, wait=True)
    assert_answered(reqs, results)
    first, second = store.batches(model="judge")
    assert first["info"]["request_counts"]["canceled"] == 3 and second["keys"] == rec["keys"]


def test_batches_split_within_the_limits_and_in_flight_cap(
        anthropic_api: tuple[AnthropicAPI, str], store: Store) -> None:
    server, url = anthropic_api
    reqs = requests(10)
    rejected: dict[str, str] = {}
    parts = list(iter_batches(reqs, 4, 10**9, rejected))
    assert [len(k) for k, _ in parts] == [4, 4, 2] and not rejected
    body = orjson.loads(parts[0][1])
    assert body["requests"][0] == {"custom_id": "key0000", "params": message_body(reqs[0])}
    one = len(parts[2][1]) // 2
    assert [len(k) for k, _ in iter_batches(reqs, 100, one + 40, rejected)] == [1] * 10
    odd = [*reqs[:2], ChatRequest("odd", MODEL, [{"role": "tool", "content": "x"}])]
    assert [k for k, _ in iter_batches(odd, 100, 300, rejected)] == [["key0000"], ["key0001"]]
    assert "role 'tool'" in rejected["odd"] and not any(k.startswith("key") for k in rejected)
    assert list(iter_batches(reqs[:1], 100, 50, rejected)) == []
    assert rejected["key0000"].startswith("request larger than max_bytes_per_batch (50 bytes)")
    first = run(spec(url, max_requests_per_batch=4, max_batches_in_flight=2), store, reqs,
                wait=False)
    assert server.created == 2
    assert [r.error.split()[1] for r in first if r.error] == ["batch"] * 8 + ["queued"] * 2
    assert_answered(reqs, run(spec(url, max_requests_per_batch=4), store, reqs, wait=True))
    assert [len(b["keys"]) for b in store.batches(model="judge")] == [4, 4, 2]


def test_api_key_never_reaches_store_or_errors(
        anthropic_api: tuple[AnthropicAPI, str], store: Store, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    server, url = anthropic_api
    server.error_once = {"key0001"}
    results = run(spec(url, max_retries=0), store, requests(3), wait=True)
    server.fail_retrieve = 1  # its message echoes the caller's key
    results += run(spec(url), store, requests(2, start=9), wait=False, calls=2)
    assert any(r.error and "poll failed" in r.error and "[redacted]" in r.error
               for r in results)
    monkeypatch.setenv(KEY_ENV, SENTINEL + "-wrong")
    with pytest.raises(BackendError, match=KEY_ENV) as err:
        run(spec(url), store, requests(1, start=20), wait=False)
    store.close()
    leaked = [str(err.value), *(r.error or "" for r in results)]
    leaked += [p.read_bytes().decode("utf-8", "replace") for p in tmp_path.glob("store*")]
    assert SENTINEL not in "".join(leaked)
    assert any("injected failure" in x for x in leaked)


def test_strict_options_and_missing_extra(monkeypatch: pytest.MonkeyPatch,
                                          store: Store) -> None:
    s = ModelSpec(name="judge", backend="anthropic-batch", model="m", options={"poll": 1})
    with pytest.raises(ConfigError, match=r"models\.judge\.options\.poll: unknown option"):
        create_backend(s, store=store)
    bad = s.model_copy(update={"options": {"max_requests_per_batch": 200_000}})
    with pytest.raises(ConfigError, match=r"models\.judge\.options\.max_requests_per_batch"):
        create_backend(bad, store=store)
    monkeypatch.setitem(sys.modules, "anthropic", None)
    with pytest.raises(MissingExtraError, match=r"prefsynth\[anthropic\]"):
        create_backend(s.model_copy(update={"options": {}}), store=store)


def _judge_config(tmp_path: Path, url: str, **options: Any) -> dict[str, Any]:
    cfg = fake_config(tmp_path)
    cfg["judge"] = {"name": "claude", "backend": "anthropic-batch", "model": MODEL,
                    "license": "anthropic", "base_url": url, "api_key_env": KEY_ENV,
                    "options": {"poll_interval": 0.05, **options}}
    cfg["prices"] = {MODEL: {"input_per_mtok": 3.0, "output_per_mtok": 15.0}}
    return cfg


def test_estimate_prices_the_batch_at_its_discount(tmp_path: Path) -> None:
    cfg = parse_config(_judge_config(tmp_path, "http://127.0.0.1:9"))
    judge = estimate(cfg, limit=4).stages[-1]
    assert judge.backend == "anthropic-batch" and judge.batch_discount == 0.5
    full = (judge.input_tokens * 3.0 + judge.output_tokens * 15.0) / 1e6
    assert judge.cost == pytest.approx(full / 2)


def test_reference_example_has_the_api_models_of_the_pool_priced() -> None:
    from prefsynth.config import load_config

    examples = ROOT / "examples"
    cfg = load_config(examples / "tulu3-on-policy.yaml",
                      {"prompts.path": str(examples / "prompts.jsonl"),
                       "prompts.messages_field": None})
    pool = {m.name: m for m in cfg.models}
    gpt, claude = pool["gpt-4o-2024-08-06"], pool["claude-3.5-sonnet"]
    assert (gpt.backend, gpt.license) == ("openai", "openai")
    assert (claude.backend, claude.license) == ("anthropic-batch", "anthropic")
    stages = {s.model: s for s in estimate(cfg, limit=40).stages if s.stage == "generate"}
    assert stages["claude-3.5-sonnet"].batch_discount == 0.5
    assert stages["claude-3.5-sonnet"].cost and stages["gpt-4o-2024-08-06"].cost


def _batches_in(db: Path) -> int:
    try:
        with sqlite3.connect(db) as conn:
            return int(conn.execute("SELECT count(*) FROM batches").fetchone()[0])
    except sqlite3.Error:
        return 0


def test_a_run_killed_after_create_polls_the_same_batch_on_rerun(
        anthropic_api: tuple[AnthropicAPI, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, url = anthropic_api
    judge = FakeBackend(ModelSpec(name="j", backend="fake", model="claude"))
    server.responder = lambda body: judge._one(ChatRequest(  # UltraFeedback-format ratings
        "k", body["model"], [{"role": "system", "content": body["system"]},
                             *body["messages"]])).text or ""
    path = write_config(tmp_path, _judge_config(tmp_path, url))
    server.hold_retrieve = True  # the run submits, then hangs polling: kill it there
    code = ("import sys, prefsynth.testing; from prefsynth.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.Popen([sys.executable, "-c", code, "run", str(path), "--limit", "5",
                             "--wait"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    db = tmp_path / "out" / ".prefsynth" / "store.sqlite"
    deadline = time.monotonic() + 60
    try:
        while server.retrieves == 0:  # polling: the batch is created and recorded
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the run never polled"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert server.created == 1 and _batches_in(db) == 1
    server.hold_retrieve = False

    assert main(["run", str(path), "--limit", "5"]) in (0, EXIT_PENDING)
    assert main(["run", str(path), "--limit", "5", "--wait"]) == 0
    assert server.created == 1  # the rerun polled the recorded batch; nothing new was bought
    out = capsys.readouterr().out
    assert main(["status", str(path), "--limit", "5"]) == 0
    status = capsys.readouterr().out
    assert status.count("batch msgbatch_") == 1 and "ended" in status, out
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            assert SENTINEL.encode() not in f.read_bytes(), f
