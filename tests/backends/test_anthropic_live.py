"""The ``anthropic`` backend against a loopback Messages API (tests/servers/anthropic_api.py):
bodies as Anthropic wants them, retries on 429/529/5xx honouring retry-after, separate rate
buckets, a key that never leaks and stops the run when refused, strict options, and a structured-mode judge end to end."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from prefsynth.backends import backend_class, create_backend
from prefsynth.backends.anthropic_batch import AnthropicBatchBackend
from prefsynth.backends.anthropic_live import AnthropicBackend
from prefsynth.backends.base import BaseBackend
from prefsynth.config import ModelSpec, parse_config
from prefsynth.core.pipeline import run as run_pipeline
from prefsynth.errors import BackendError, ConfigError, MissingExtraError
from prefsynth.records import ChatRequest, ChatResult
from prefsynth.testing import FakeBackend
from tests.backends.tls import count_ssl_contexts
from tests.conftest import fake_config
from tests.servers.anthropic_api import KEY_ENV, SENTINEL, AnthropicAPI, expected_text

pytestmark = pytest.mark.timeout(60)




def spec(url: str | None, **kw: Any) -> ModelSpec:
    base: dict[str, Any] = {"name": "claude", "backend": "anthropic",
                            "model": "claude-3-5-sonnet-20241022", "base_url": url,
                            "api_key_env": KEY_ENV, "max_retries": 4}
    return ModelSpec(**{**base, **kw})


def requests(n: int, **params: Any) -> list[ChatRequest]:
    p = {"temperature": 0.7, "top_p": 1.0, "max_tokens": 64, "seed": 5, **params}
    return [ChatRequest(f"key{i:03d}", "claude-3-5-sonnet-20241022", [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"question {i}"},
        {"role": "assistant", "content": "Which one?"},
        {"role": "user", "content": f"number {i}, please"}], params=p) for i in range(n)]


def complete(s: ModelSpec, reqs: Sequence[ChatRequest]) -> list[ChatResult]:
    async def go() -> list[ChatResult]:
        backend = create_backend(s)
        assert isinstance(backend, AnthropicBackend)
        try:
            return await backend.complete(reqs)
        finally:
            await backend.aclose()
    return asyncio.run(go())


@pytest.mark.parametrize("transport", ["aiohttp", "sdk"])
def test_answers_with_system_top_level_turns_kept_and_no_seed(
        anthropic_api: tuple[AnthropicAPI, str], transport: str) -> None:
    server, url = anthropic_api
    reqs = requests(6)
    results = complete(spec(url, options={"transport": transport}), reqs)
    for q, r in zip(reqs, results, strict=True):
        assert r.ok and r.text == expected_text(q.messages[1:]), r.error
        assert r.finish_reason == "stop" and r.attempts == 1
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (9, 2)
    body = server.bodies[0]
    assert body["system"] == "Answer briefly." and len(body["messages"]) == 3
    assert "seed" not in body and "top_p" not in body and body["max_tokens"] == 64
    assert server.headers[0]["anthropic-version"]  # the SDK's headers, on either transport


def test_cut_off_answer_is_recorded_as_length(anthropic_api: tuple[AnthropicAPI, str]) -> None:
    _, url = anthropic_api
    [r] = complete(spec(url), requests(1, max_tokens=1))
    assert r.ok and r.finish_reason == "length"


@pytest.mark.parametrize("transport", ["aiohttp", "sdk"])
def test_429_529_and_500_are_retried_honouring_retry_after(
        anthropic_api: tuple[AnthropicAPI, str], transport: str) -> None:
    server, url = anthropic_api
    server.faults = [(429, {"retry-after": "0.3"}), (529, {}), (500, {})]
    t0 = time.monotonic()
    [r] = complete(spec(url, options={"transport": transport}), requests(1))
    assert r.ok and r.attempts == 4 and server.message_calls == 4
    assert time.monotonic() - t0 >= 0.3  # the 429's retry-after was waited out


def test_out_of_retries_or_not_retryable_is_an_error_never_an_exception(
        anthropic_api: tuple[AnthropicAPI, str]) -> None:
    server, url = anthropic_api
    server.faults = [(529, {}), (529, {})]
    [r] = complete(spec(url, max_retries=1), requests(1))
    assert r.error == "overloaded: HTTP 529: injected 529 (gave up after 2 attempts)"
    assert r.attempts == 2
    server.faults = [(400, {})]
    calls = server.message_calls
    [r] = complete(spec(url), requests(1))
    assert r.error == "bad_request: HTTP 400: injected 400" and server.message_calls == calls + 1
    server.faults = [(429, {"retry-after": "3600"})]  # a quota, not a blip: give up at once
    [r] = complete(spec(url), requests(1))
    assert r.error and r.error.startswith("rate_limited") and "exceeds" in r.error
    [r] = complete(spec(url), [ChatRequest("k", "m", [{"role": "tool", "content": "x"}])])
    assert r.error == "bad_request: cannot encode request: role 'tool' has no Anthropic equivalent"
    assert r.attempts == 0


def test_key_never_leaks_and_a_missing_key_names_the_variable(
        anthropic_api: tuple[AnthropicAPI, str], monkeypatch: pytest.MonkeyPatch) -> None:
    server, url = anthropic_api
    monkeypatch.setenv(KEY_ENV, SENTINEL + "-wrong")
    with pytest.raises(BackendError) as err:  # a dead key stops the run, as for openai
        complete(spec(url), requests(3))
    assert str(err.value).startswith(f"models.claude: HTTP 401: the key in ${KEY_ENV} was "
                                     "rejected") and SENTINEL not in str(err.value)
    server.faults = [(500, {}), (500, {})]
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(BackendError, match=KEY_ENV):
        create_backend(spec(url))
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(BackendError, match="ANTHROPIC_API_KEY is not set"):
        create_backend(spec(url, api_key_env=None))


def test_output_bucket_paces_by_max_tokens_then_refunds_the_unused(
        anthropic_api: tuple[AnthropicAPI, str]) -> None:
    _, url = anthropic_api
    # OTPM 600 = 10 tokens/s; each request reserves max_tokens=10 (1 s) and uses 2 (0.2 s)
    s = spec(url, max_concurrency=1, options={"output_tokens_per_minute": 600})
    t0 = time.monotonic()
    results = complete(s, requests(5, max_tokens=10))
    took = time.monotonic() - t0
    assert all(r.ok for r in results)
    assert 0.6 <= took < 3.0, took  # 4 gaps of 0.2 s; without the refund 4 s
    # RPM and ITPM are buckets of their own
    s = spec(url, max_concurrency=4, requests_per_minute=600,
             options={"input_tokens_per_minute": 10**9})
    t0 = time.monotonic()
    assert all(r.ok for r in complete(s, requests(4)))
    assert time.monotonic() - t0 >= 0.25  # 4 requests at 10/s: 3 gaps of 0.1 s


def test_options_are_strict_and_the_missing_extra_is_named(
        anthropic_api: tuple[AnthropicAPI, str], monkeypatch: pytest.MonkeyPatch) -> None:
    _, url = anthropic_api
    with pytest.raises(ConfigError, match=r"models\.claude\.options\.transprt: unknown option"):
        create_backend(spec(url, options={"transprt": "sdk"}))
    with pytest.raises(ConfigError, match=r"models\.claude\.options\.transport: "):
        create_backend(spec(url, options={"transport": "http2"}))
    with pytest.raises(ConfigError, match=r"options\.output_tokens_per_minute: "):
        create_backend(spec(url, options={"output_tokens_per_minute": 0}))
    monkeypatch.setitem(sys.modules, "anthropic", None)
    with pytest.raises(MissingExtraError, match=r"prefsynth\[anthropic\]"):
        create_backend(spec(url))


def test_declared_capabilities() -> None:
    live, batch = backend_class("anthropic"), backend_class("anthropic-batch")
    assert live is AnthropicBackend and batch is AnthropicBatchBackend
    assert live.key_family == batch.key_family == "anthropic"
    assert not live.reproducible and not batch.reproducible and BaseBackend.reproducible
    assert batch.batch_pricing and not live.batch_pricing


def test_judge_on_anthropic_in_structured_mode_gives_parsed_ratings(
        anthropic_api: tuple[AnthropicAPI, str], tmp_path: Path) -> None:
    server, url = anthropic_api
    fake = FakeBackend(ModelSpec(name="j", backend="fake", model="claude"))

    def rate(body: dict[str, Any]) -> Any:
        """What a judge puts in the tool call: the fake judge's JSON for these messages."""
        msgs = [{"role": "system", "content": body["system"]}, *body["messages"]]
        fmt = {"name": body["tool_choice"]["name"], "schema": body["tools"][0]["input_schema"]}
        import orjson
        return orjson.loads(fake._one(ChatRequest("k", "m", msgs, response_format=fmt)).text
                            or "null")

    server.tool_responder = rate
    cfg = fake_config(tmp_path)
    cfg["judge"] = {"name": "claude-judge", "backend": "anthropic",
                    "model": "claude-3-5-sonnet-20241022", "license": "anthropic",
                    "base_url": url, "api_key_env": KEY_ENV, "mode": "structured"}
    result = run_pipeline(parse_config(cfg), limit=3).records
    assert len(result.judgments) == 3 * 4 and server.message_calls == 12
    assert all(j.error is None and None not in j.ratings for j in result.judgments)
    assert len(result.pairs) + len(result.dropped) == 3 and result.pairs
    assert all(b["tool_choice"] == {"type": "tool", "name": "judgment"} for b in server.bodies)


def test_aiohttp_transport_builds_no_unused_tls_context(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """As for ``openai``: the SDK client only lends URL and headers to the aiohttp sender, so
    it gets an HTTP client that never sends and loads no certificate store."""
    import anthropic

    monkeypatch.setenv(KEY_ENV, SENTINEL)
    made = count_ssl_contexts(monkeypatch)
    backend = AnthropicBackend(spec("https://api.anthropic.com",
                                    options={"transport": "aiohttp"}))
    assert made == [] and backend.transport == "aiohttp"
    assert str(backend._sender.url) == "https://api.anthropic.com/v1/messages"
    with pytest.raises(anthropic.APIConnectionError) as err:  # the SDK wraps what we raise
        asyncio.run(backend._client.get("/v1/models", cast_to=object))
    assert "never the SDK client" in str(err.value.__cause__)
