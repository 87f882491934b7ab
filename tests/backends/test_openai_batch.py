"""The ``openai-batch`` backend against a loopback Files + Batches API (tests/servers).

What matters is money and crash safety: a recorded batch is polled, never paid for twice;
whatever a batch did not answer (expired, failed, error file) is submitted again; the API key
never reaches disk or errors. What both batch backends share (a restarted process polls, results
matched by ``custom_id``, no double create) is tested on both in test_batch_common.py.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest

from prefsynth.backends import create_backend
from prefsynth.backends.openai_batch import OpenAIBatchBackend, batch_status
from prefsynth.backends.openai_common import chat_body
from prefsynth.config import ModelSpec
from prefsynth.core.store import Store
from prefsynth.errors import BackendError, ConfigError, MissingExtraError
from prefsynth.records import ChatRequest, ChatResult
from tests.servers.batch_api import BatchAPI, expected_text, serve
from tests.servers.batch_api import run_batch as run

pytestmark = pytest.mark.timeout(60)

KEY_ENV = "PREFSYNTH_TEST_BATCH_KEY"
SENTINEL = "sk-sentinel-NEVER-STORE-7f3a9c1e5b"


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[BatchAPI, str]]:
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    server = BatchAPI(api_key=SENTINEL)
    with serve(server) as url:
        yield server, url


def spec(url: str, **options: Any) -> ModelSpec:
    retries = options.pop("max_retries", 3)
    opts = {"poll_interval": 0.02, "http_retries": 0, **options}
    return ModelSpec(name="judge", backend="openai-batch", model="gpt-4o-test", base_url=url,
                     api_key_env=KEY_ENV, max_retries=retries, options=opts)


def requests(n: int, start: int = 0) -> list[ChatRequest]:
    return [ChatRequest(key=f"key{i:04d}", model="gpt-4o-test", params={"temperature": 0.1},
                        messages=[{"role": "user", "content": f"rate response number {i}"}])
            for i in range(start, start + n)]



def assert_answered(reqs: Sequence[ChatRequest], results: Sequence[ChatResult]) -> None:
    assert [r.key for r in results] == [q.key for q in reqs]
    for q, r in zip(reqs, results, strict=True):
        assert r.ok, r.error
        assert r.text == expected_text(q.messages)
        assert r.finish_reason == "stop"
        assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 2


def test_expired_batch_resubmits_only_the_missing_items(
        api: tuple[BatchAPI, str], store: Store) -> None:
    server, url = api
    server.plans = [{"status": "expired", "keep": 0.5}]
    reqs = requests(10)
    results = run(spec(url), store, reqs, wait=True)
    assert_answered(reqs, results)
    first, second = store.batches(model="judge")
    assert server.created == 2
    assert first["info"]["failed_keys"] == second["keys"] and len(second["keys"]) == 5
    assert [r.attempts for r in results] == [1] * 5 + [2] * 5


def test_expired_items_in_the_error_file_and_missing_ones_are_errors_without_wait(
        api: tuple[BatchAPI, str], store: Store) -> None:
    server, url = api
    server.plans = [{"status": "expired", "keep": 0.3, "error_file": True},
                    {"status": "cancelled", "keep": 0.5}]
    reqs = requests(10)
    results = run(spec(url), store, reqs, wait=False, calls=4)  # four polls: final
    assert [r.ok for r in results] == [True] * 3 + [False] * 7
    assert all("batch_expired" in (r.error or "") for r in results[3:])
    # next run (the executor asks for the failed ones again): a new batch, then cancelled
    results = run(spec(url), store, reqs[3:], wait=False, calls=4)
    assert server.created == 2
    assert [r.ok for r in results] == [True] * 3 + [False] * 4
    assert all("batch cancelled before this request ran" in (r.error or "") for r in results[3:])


def test_error_file_items_are_errors_and_resubmitted_by_the_next_call(
        api: tuple[BatchAPI, str], store: Store) -> None:
    server, url = api
    reqs = requests(8)
    server.error_once = {"key0002", "key0005"}
    results = run(spec(url), store, reqs, wait=False, calls=4)
    failed = {r.key: r.error for r in results if not r.ok}
    assert set(failed) == {"key0002", "key0005"}
    assert all(e and e.startswith("HTTP 400: injected item failure") for e in failed.values())
    assert server.created == 1
    # a crash before the executor committed: the next run asks for all 8 again; the answers
    # are read again from the collected batch (paid once), the two failures are resubmitted
    again = run(spec(url), store, reqs, wait=False)
    assert [r.text for r in again if r.ok] == [r.text for r in results if r.ok]
    assert server.created == 2 and store.batches(model="judge")[1]["keys"] == sorted(failed)
    # the executor stored the answers and asks again for the two failures only
    retry = [q for q in reqs if q.key in failed]
    pending = run(spec(url), store, retry, wait=False)
    assert all(r.error and r.error.startswith("pending: batch ") for r in pending)
    assert_answered(retry, run(spec(url), store, retry, wait=True))
    assert server.created == 2


def test_failed_batch_is_resubmitted_then_gives_up_after_max_retries(
        api: tuple[BatchAPI, str], store: Store) -> None:
    server, url = api
    server.plans = [{"status": "failed"}]
    reqs = requests(4)
    assert_answered(reqs, run(spec(url), store, reqs, wait=True))
    assert server.created == 2
    assert batch_status(store, "judge")[0]["errors"] == [
        "invalid_request: injected failure (line 1)"]

    server.plans = [{"status": "failed"}] * 2
    more = requests(3, start=10)
    results = run(spec(url, max_retries=1), store, more, wait=True)
    assert server.created == 4
    assert all(r.error and r.error.startswith("batch failed: invalid_request") for r in results)
    assert all(r.attempts == 2 for r in results)


def test_sharding_writes_valid_files_within_the_limits(
        api: tuple[BatchAPI, str], store: Store, tmp_path: Path) -> None:
    server, url = api
    reqs = requests(10)
    shards = tmp_path / "shards"
    results = run(spec(url, max_requests_per_file=4, shard_dir=str(shards)), store, reqs,
                  wait=True)
    assert_answered(reqs, results)
    assert server.created == 3 and server.uploads == 3
    files = sorted(shards.glob("*.jsonl"))
    lines = [[orjson.loads(x) for x in f.read_bytes().splitlines()] for f in files]
    assert [len(x) for x in lines] == [4, 4, 2]
    by_key = {q.key: q for q in reqs}
    for line in (x for shard in lines for x in shard):
        # the OpenAI batch input format, which `vllm run-batch` reads as well
        assert set(line) == {"custom_id", "method", "url", "body"}
        assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
        assert line["body"] == chat_body(by_key[line["custom_id"]])
    assert [b["keys"] for b in store.batches(model="judge")] == [
        [q.key for q in reqs[i:i + 4]] for i in (0, 4, 8)]


def test_byte_limit_and_batches_in_flight_limit(
        api: tuple[BatchAPI, str], store: Store) -> None:
    server, url = api
    reqs = requests(6)
    line_size = len(orjson.dumps({"custom_id": "key0000", "method": "POST",
                                  "url": "/v1/chat/completions", "body": chat_body(reqs[0])}))
    s = spec(url, max_bytes_per_file=2 * line_size + 10, max_batches_in_flight=2)
    first = run(s, store, reqs, wait=False)
    assert server.created == 2
    assert [r.error.split()[1] for r in first if r.error] == ["batch"] * 4 + ["queued"] * 2
    assert_answered(reqs, run(s, store, reqs, wait=True))
    assert server.created == 3
    assert [len(b["keys"]) for b in store.batches(model="judge")] == [2, 2, 2]


def test_api_key_never_reaches_store_shards_or_errors(
        api: tuple[BatchAPI, str], store: Store, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    server, url = api
    shards = tmp_path / "shards"
    server.error_once = {"key0001"}
    server.plans = [{"status": "expired", "keep": 0.5, "error_file": True}]
    results = run(spec(url, shard_dir=str(shards), max_retries=0), store, requests(4),
                  wait=True)
    server.fail_retrieve = 1  # its message echoes the caller's key
    results += run(spec(url, shard_dir=str(shards)), store, requests(2, start=9), wait=False,
                   calls=2)
    assert any(r.error and "poll failed" in r.error and "[redacted]" in r.error for r in results)
    # a wrong key: OpenAI's 401 quotes the key it got; the error names the variable only
    monkeypatch.setenv(KEY_ENV, SENTINEL + "-wrong")
    with pytest.raises(BackendError, match=KEY_ENV) as err:
        run(spec(url, shard_dir=str(shards)), store, requests(1, start=20), wait=False)
    store.close()
    leaked = [str(err.value), *(r.error or "" for r in results)]
    leaked += [p.read_bytes().decode("utf-8", "replace") for p in [*shards.iterdir(),
               *tmp_path.glob("store.sqlite*")]]
    assert SENTINEL.encode() not in b"".join(x.encode() for x in leaked)
    assert any("HTTP 400" in x for x in leaked) and len(list(shards.iterdir())) == 3


def test_forbidden_stops_with_a_backend_error(api: tuple[BatchAPI, str], store: Store) -> None:
    server, url = api
    server.forbidden = True  # HTTP 403: this key may not use the Batch API
    with pytest.raises(BackendError, match=r"HTTP 403, PermissionDeniedError"):
        run(spec(url), store, requests(2), wait=False)
    assert server.created == 0 and store.batches() == []


def test_missing_openai_extra_and_unknown_option(
        monkeypatch: pytest.MonkeyPatch, store: Store) -> None:
    s = ModelSpec(name="judge", backend="openai-batch", model="m", options={"poll": 1})
    with pytest.raises(ConfigError, match=r"models\.judge\.options\.poll: unknown option for the "
                                          r"openai-batch backend \(known: http_retries, "):
        create_backend(s, store=store)
    monkeypatch.setitem(sys.modules, "openai", None)
    with pytest.raises(MissingExtraError, match=r"prefsynth\[openai\]"):
        create_backend(s.model_copy(update={"options": {}}), store=store)


def test_result_lines_of_the_wrong_shape_fail_alone(
        api: tuple[BatchAPI, str], store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    """Content an object or an integer, a count of 1e30, ``usage: "abc"`` in a batch's output
    file: each is that request's error; the batch's other answers are kept."""
    from tests.servers import batch_api

    real = batch_api._completion
    odd: dict[str, Any] = {
        "rate response number 1": {"content": {"text": "hi"}},
        "rate response number 2": {"content": 7},
        "rate response number 3": {"usage": {"prompt_tokens": 1e30, "completion_tokens": 1}},
        "rate response number 4": {"usage": "abc"},
    }

    def completion(body: dict[str, Any], rid: str, responder: Any = None) -> dict[str, Any]:
        out = real(body, rid, responder)
        change = odd.get(body["messages"][-1]["content"], {})
        if "content" in change:
            out["choices"][0]["message"]["content"] = change["content"]
        if "usage" in change:
            out["usage"] = change["usage"]
        return out

    monkeypatch.setattr(batch_api, "_completion", completion)
    _, url = api
    reqs = requests(6)
    results = run(spec(url, max_retries=0), store, reqs, wait=True)
    assert [r.ok for r in results] == [True, False, False, False, False, True]
    assert results[0].text == expected_text(reqs[0].messages)
    for r in results[1:5]:
        assert r.error is not None and r.error.startswith("malformed completion payload"), r
    [rec] = store.batches(model="judge")
    assert rec["info"]["failed_keys"] == [q.key for q in reqs[1:5]]


def test_line_result_of_any_shape_is_a_result(api: tuple[BatchAPI, str], store: Store) -> None:
    _, url = api
    backend = create_backend(spec(url), store=store)
    assert isinstance(backend, OpenAIBatchBackend)
    for line in [{"response": "abc"}, {"response": ["x"]}, {"response": None},
                 {"response": {"status_code": 200, "body": "abc"}},
                 {"response": {"status_code": 200, "body": {"choices": {"a": 1}}}}]:
        r = backend._line_result("k", line)
        assert r.error is not None and r.error.startswith("malformed completion payload"), line
    r = backend._line_result("k", {"response": {"status_code": 500, "body": "Internal"}})
    assert r.error == "HTTP 500: Internal"
    asyncio.run(backend.aclose())
