"""What the batch backends share (``batch_common``): the lifecycle, run against both providers'
loopback APIs; batches cut within the limits; and a store whose one batches table holds both
providers' batches, each backend seeing only its own."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from prefsynth.backends import backend_class, create_backend
from prefsynth.backends.batch_common import batch_rows, pack
from prefsynth.config import ModelSpec, parse_config
from prefsynth.core.store import Store
from prefsynth.errors import BackendError
from prefsynth.records import ChatRequest, ChatResult
from prefsynth.tools.status import compute_status
from tests.conftest import fake_config
from tests.servers import anthropic_api, batch_api
from tests.servers.batch_api import expected_text, run_batch

pytestmark = pytest.mark.timeout(60)

KEY_ENV = "PREFSYNTH_TEST_BATCH_COMMON_KEY"


@dataclass
class Provider:
    """One provider's loopback batch API and how to ask it."""

    backend: str
    server: Any  # batch_api.BatchAPI or anthropic_api.AnthropicAPI
    url: str
    created: str  # the API status of a batch just created
    final: str  # ... of a batch whose results can be read
    succeeded: str  # the request count of the answered requests

    def spec(self, **options: Any) -> ModelSpec:
        return ModelSpec(name="judge", backend=self.backend, model="model-x", base_url=self.url,
                         api_key_env=KEY_ENV, max_retries=3,
                         options={"poll_interval": 0.02, "http_retries": 0, **options})

    def orders(self) -> list[list[str]]:
        """The order of the custom ids in each batch's results."""
        return list(getattr(self.server, "output_orders", None) or self.server.result_orders)


@pytest.fixture(params=["openai-batch", "anthropic-batch"])
def provider(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
             ) -> Iterator[Provider]:
    monkeypatch.setenv(KEY_ENV, "sk-common-batch-key-1234")
    if request.param == "openai-batch":
        server: Any = batch_api.BatchAPI(api_key="sk-common-batch-key-1234")
        serve, statuses = batch_api.serve, ("validating", "completed", "completed")
    else:
        server = anthropic_api.AnthropicAPI(api_key="sk-common-batch-key-1234")
        serve, statuses = anthropic_api.serve, ("in_progress", "ended", "succeeded")
    with serve(server) as url:
        yield Provider(request.param, server, url, *statuses)


def requests(n: int) -> list[ChatRequest]:
    return [ChatRequest(f"key{i:04d}", "model-x", [{"role": "user", "content": f"rate {i}"}],
                        params={"temperature": 0.1, "max_tokens": 64}) for i in range(n)]


def assert_answered(reqs: list[ChatRequest], results: list[ChatResult]) -> None:
    assert [r.key for r in results] == [q.key for q in reqs]
    for q, r in zip(reqs, results, strict=True):
        assert r.ok and r.text == expected_text(q.messages), r.error


def test_submit_returns_pending_then_a_restarted_process_polls_instead_of_resubmitting(
        provider: Provider, tmp_path: Path) -> None:
    server, path = provider.server, tmp_path / "store.sqlite"
    reqs = requests(6)
    with Store(path) as store:
        first = run_batch(provider.spec(), store, reqs, wait=False)
        [rec] = store.batches(model="judge")
        assert rec["keys"] == [q.key for q in reqs] and server.created == 1
        assert all(r.error == f"pending: batch {rec['batch_id']} {provider.created}"
                   for r in first)
        # a second run before the batch is done: still pending, nothing submitted again
        again = run_batch(provider.spec(), store, reqs, wait=False)
        assert all(r.error == f"pending: batch {rec['batch_id']} in_progress" for r in again)
    with Store(path) as reopened:  # "crash and restart": a new store and backend, with --wait
        results = run_batch(provider.spec(), reopened, reqs, wait=True)
        assert server.created == 1
        assert_answered(reqs, results)
        [rec] = reopened.batches(model="judge")
        assert rec["status"] == "collected" and rec["info"]["failed_keys"] == []
        [row] = backend_class(provider.backend).store_status(reopened)
        assert row["api_status"] == provider.final and row["requests"] == 6
        assert row["request_counts"][provider.succeeded] == 6


def test_with_wait_each_batch_s_answers_are_handed_over_when_it_is_collected(
        provider: Provider, store: Store) -> None:
    """A --wait run can last hours: the answers of a batch that is done reach the executor
    (``on_result``) at once, not when the last resubmitted batch is done."""
    server = provider.server
    if provider.backend == "openai-batch":
        server.plans = [{"status": "expired", "keep": 0.5}]
    else:
        server.expire = 0.5  # the last half of the first batch expire: resubmitted
    reqs = requests(10)
    handed: list[tuple[str, int]] = []  # (key, batches created when it was handed over)

    async def go() -> list[ChatResult]:
        backend = create_backend(provider.spec(wait=True), store=store)
        try:
            return await backend.complete(
                reqs, on_result=lambda r: handed.append((r.key, server.created)))
        finally:
            await backend.aclose()

    results = asyncio.run(go())
    assert_answered(reqs, results)
    assert sorted(k for k, _ in handed) == [q.key for q in reqs]  # each once
    assert [n for _, n in handed] == [1] * 5 + [2] * 5  # the first five before the resubmit


def test_a_refused_key_stops_the_run(provider: Provider, store: Store) -> None:
    provider.server.forbidden = True  # HTTP 403: this key may not use the batch API
    with pytest.raises(BackendError, match=r"refused the key from .* \(HTTP 403, "
                                           r"PermissionDeniedError\)"):
        run_batch(provider.spec(), store, requests(2), wait=False)
    assert provider.server.created == 0 and store.batches() == []


def test_results_matched_by_custom_id_in_any_order(provider: Provider, store: Store) -> None:
    reqs = requests(40)
    dup = [*reqs, reqs[3]]  # a key asked twice goes in the batch once, answered in both places
    results = run_batch(provider.spec(), store, dup, wait=True)
    [order] = provider.orders()
    assert order != [q.key for q in reqs] and sorted(order) == [q.key for q in reqs]
    assert_answered(dup, results)


def test_transient_retrieve_and_create_errors_never_double_submit(
        provider: Provider, store: Store) -> None:
    server = provider.server
    server.fail_retrieve = 1
    server.fail_create_after = 1  # the batch exists, but the client sees a 500
    reqs = requests(5)
    results = run_batch(provider.spec(), store, reqs, wait=True)  # no SDK retry hides it
    assert_answered(reqs, results)
    assert server.created == 1
    assert [b["batch_id"] for b in store.batches(model="judge")] == list(server.batches)


@pytest.fixture
def mixed(tmp_path: Path) -> Iterator[Store]:
    """A store holding both providers' batches, and one from before ``info.provider``."""
    with Store(tmp_path / "store.sqlite") as s:
        s.record_batch("batch_old", "judge", "file-1", ["k1"], "collected",
                       {"api_status": "completed"})  # written before info.provider existed
        s.record_batch("batch_new", "judge", "file-2", ["k2"], "in_progress",
                       {"provider": "openai", "output_file_id": "file-out"})
        s.record_batch("msgbatch_1", "claude", None, ["k3", "k4"], "in_progress",
                       {"provider": "anthropic", "expires_at": "2030-01-01T00:00:00+00:00"})
        yield s


def reqs(n: int) -> list[ChatRequest]:
    return [ChatRequest(f"k{i}", "m", [{"role": "user", "content": "x" * 10}])
            for i in range(n)]


def test_pack_cuts_within_both_limits_and_names_what_it_left_out() -> None:
    def encode(r: ChatRequest) -> bytes:
        if r.key == "k3":
            raise ValueError("role 'tool' has no equivalent")
        return r.key.encode() * (10 if r.key == "k5" else 1)

    rejected: dict[str, str] = {}
    parts = list(pack(reqs(7), encode, 2, 12, rejected, limit_name="max_bytes_per_x",
                      head=b"[", sep=b",", tail=b"]"))
    assert parts == [(["k0", "k1"], b"[k0,k1]"), (["k2", "k4"], b"[k2,k4]"), (["k6"], b"[k6]")]
    assert rejected == {
        "k3": "bad_request: cannot encode request: role 'tool' has no equivalent",
        "k5": "request larger than max_bytes_per_x (12 bytes) cannot go in a batch"}
    lines = list(pack(reqs(3), lambda r: r.key.encode() + b"\n", 10, 6, {}, limit_name="x"))
    assert lines == [(["k0", "k1"], b"k0\nk1\n"), (["k2"], b"k2\n")]


def test_each_batch_backend_lists_only_its_own_providers_batches(mixed: Store) -> None:
    openai, anthropic = backend_class("openai-batch"), backend_class("anthropic-batch")
    assert [r["batch_id"] for r in openai.store_status(mixed)] == ["batch_old", "batch_new"]
    [row] = anthropic.store_status(mixed)
    assert row["batch_id"] == "msgbatch_1" and row["expires_at"].startswith("2030")
    assert row["requests"] == 2 and row["input_file_id"] is None
    new = batch_rows(mixed, "openai", "judge", ("output_file_id",))[1]
    assert new["output_file_id"] == "file-out" and new["input_file_id"] == "file-2"


def test_a_backend_loads_only_its_own_providers_batches(
        mixed: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-x-1234")
    for backend, model, mine in (("openai-batch", "claude", set()),
                                 ("anthropic-batch", "judge", set()),
                                 ("anthropic-batch", "claude", {"msgbatch_1"})):
        b = create_backend(ModelSpec(name=model, backend=backend, model="m",
                                     api_key_env=KEY_ENV, base_url="http://127.0.0.1:9"),
                           store=mixed)
        b._load(["k1", "k2", "k3"])  # type: ignore[attr-defined]
        assert set(b._batches) == mine, (backend, model)  # type: ignore[attr-defined]


def test_status_with_both_batch_backends_prints_each_batch_once(
        mixed: Store, tmp_path: Path) -> None:
    raw = fake_config(tmp_path, store=str(tmp_path / "store.sqlite"))
    raw["models"][0].update(name="claude", backend="anthropic-batch", model="claude-3-5-haiku")
    raw["judge"] = {"name": "judge", "backend": "openai-batch", "model": "gpt-4o"}
    st = compute_status(parse_config(raw), limit=2)
    assert sorted(b["batch_id"] for b in st.batches) == ["batch_new", "batch_old", "msgbatch_1"]
