"""The ``openai`` backend against a real llama.cpp server, with and without injected faults.

Everything goes over real HTTP on loopback: the real SDK, both transports (the backend's own
aiohttp session, the default, and the SDK's ``client.post``), the real ``llama_cpp.server``
running SmolLM2-135M, and a proxy that injects 429/5xx, stalls, resets, truncated and malformed
bodies. The tests that matter for failure handling run on both transports. Completions are
short (≤ 16 tokens, a few dozen requests) so the file runs in about a minute on two cores.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from typing import Any

import pytest

pytest.importorskip("openai")

from prefsynth.backends import create_backend, openai_http
from prefsynth.backends.openai_compat import (
    OpenAIBackend,
    Pacer,
    estimate_tokens,
    retry_after_seconds,
)
from prefsynth.config import ModelSpec
from prefsynth.errors import BackendError, ConfigError, MissingExtraError
from prefsynth.records import ChatRequest, ChatResult
from prefsynth.stages.judge.parse import parse_structured
from prefsynth.stages.judge.rubrics import judgment_schema, render_judge_messages
from tests.backends.tls import count_ssl_contexts
from tests.servers.fault_proxy import FAULTS, FaultProxy

MODEL = "smollm2-135m"
KEY_ENV = "PREFSYNTH_TEST_OPENAI_KEY"
SENTINEL = "sk-SENTINEL-9f8e7d6c5b4a-DO-NOT-LEAK"
PROMPTS = [
    "Name a fruit.",
    "Say hello to a friend.",
    "What colour is the sky?",
    "Give me one word that rhymes with cat.",
    "Describe a dog in five words.",
    "What is two plus two?",
]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def ask(i: int, *, max_tokens: int = 16, temperature: float = 0.7, **params: Any) -> ChatRequest:
    content = f"{PROMPTS[i % len(PROMPTS)]} (#{i})"
    return ChatRequest(
        key=f"r{i}",
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        params={"max_tokens": max_tokens, "temperature": temperature, "seed": 1000 + i, **params},
    )


def spec(url: str, **over: Any) -> ModelSpec:
    fields: dict[str, Any] = {
        "name": "pool-smol",
        "backend": "openai",
        "model": MODEL,
        "base_url": url,
        "timeout": 60.0,  # generous: other jobs may share the two cores
        "max_retries": 8,
        "max_concurrency": 4,
    }
    fields.update(over)
    return ModelSpec(**fields)


def complete(
    url: str, requests: Sequence[ChatRequest], **over: Any
) -> tuple[list[ChatResult], float, OpenAIBackend]:
    """Build a backend (inside the loop, as the executor does), run one batch, close it.
    Backoff is shrunk so that retries cost milliseconds; ``Retry-After`` still rules."""

    async def go() -> tuple[list[ChatResult], float, OpenAIBackend]:
        backend = create_backend(spec(url, **over))
        assert isinstance(backend, OpenAIBackend)
        backend.base_delay, backend.max_delay = 0.01, 0.2
        t0 = time.perf_counter()
        try:
            results = await backend.complete(requests)
        finally:
            await backend.aclose()
        return results, time.perf_counter() - t0, backend

    return asyncio.run(go())


@pytest.fixture(params=["aiohttp", "sdk"])
def transport(request: pytest.FixtureRequest) -> str:
    """Both transports: the backend's own aiohttp session (default) and the SDK's client.post."""
    return str(request.param)


@pytest.fixture
def key_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    return KEY_ENV


# --------------------------------------------------------------------- against the real server


def test_plain_completions(llama_server: str, transport: str) -> None:
    results, _, backend = complete(
        llama_server, [ask(i) for i in range(3)], options={"transport": transport}
    )
    assert backend.transport == transport
    assert backend.sdk_http == (None if transport == "aiohttp" else "aiohttp")
    assert [r.key for r in results] == ["r0", "r1", "r2"]
    for r in results:
        assert r.ok, r.error
        assert r.text and r.text.strip()
        assert r.attempts == 1
        assert r.usage.prompt_tokens > 0
        # not <= max_tokens: llama-cpp-python's server sometimes reports a token or two more
        assert r.usage.completion_tokens > 0
        assert r.finish_reason in {"stop", "length"}


def test_finish_reason_length_is_recorded(llama_server: str) -> None:
    req = ChatRequest("long", MODEL, [{"role": "user", "content": "Write a long essay on the sea."}],
                      {"max_tokens": 3, "temperature": 0.0})  # fmt: skip
    [r], _, _ = complete(llama_server, [req])
    assert r.ok, r.error
    assert r.finish_reason == "length"
    assert r.usage.completion_tokens >= 3


def test_empty_batch(llama_server: str) -> None:
    results, _, _ = complete(llama_server, [])
    assert results == []


def test_structured_output_json_object_style(llama_server: str) -> None:
    req = ChatRequest(
        "json",
        MODEL,
        [{"role": "user", "content": "Invent a person. Reply as JSON with a name and an age."}],
        {"max_tokens": 48, "temperature": 0.0},
        response_format={"name": "person", "schema": SCHEMA},
    )
    [r], _, _ = complete(llama_server, [req], options={"response_format_style": "json_object"})
    assert r.ok, r.error
    data = json.loads(r.text or "")
    assert isinstance(data["name"], str)
    assert isinstance(data["age"], int)


def test_llama_cpp_server_rejects_json_schema_style_once(llama_server: str) -> None:
    """llama-cpp-python's server validates ``response_format.type`` against
    ``text``/``json_object`` and answers HTTP 500 with a validation error: with the style
    fixed to ``json_schema`` that is a ``bad_request``, and it is not retried (it used to be,
    ``max_retries`` times)."""
    req = ChatRequest("js", MODEL, [{"role": "user", "content": "A person as JSON."}],
                      {"max_tokens": 8}, response_format={"name": "p", "schema": SCHEMA})  # fmt: skip
    [r], _, _ = complete(llama_server, [req], max_retries=6,
                         options={"response_format_style": "json_schema"})
    assert r.error is not None and r.error.startswith("bad_request: HTTP 500"), r.error
    assert "json_object" in r.error and "validation error" in r.error
    assert r.attempts == 1


def test_structured_judge_against_llama_cpp_server_with_default_options(
    llama_server: str,
) -> None:
    """The quickstart's structured judge pointed at ``python -m llama_cpp.server`` used to
    fail every judgment after 7 attempts each (the server rejects ``json_schema`` with a 500).
    With the default ``response_format_style: auto`` the backend learns the server's form
    from the first rejection, and ratings come back."""
    texts = ["It is 4.", "It is 5, surely."]
    msgs = render_judge_messages("honesty", "What is 2+2?", texts, structured=True)
    fmt = judgment_schema(2, allow_na=True)
    reqs = [ChatRequest(f"judge-{i}", MODEL, msgs,
                        {"temperature": 0.1, "max_tokens": 240, "seed": 3 + i},
                        response_format=fmt) for i in range(2)]  # fmt: skip
    # a long timeout: the server answers one at a time, and the two cores are shared
    results, _, backend = complete(llama_server, reqs, timeout=300.0)
    assert backend._style == "json_object"
    for r in results:
        assert r.ok, r.error
        assert r.attempts == 2  # the one rejection each (both were in flight), then answered
        ratings, _ = parse_structured(r.text or "", "honesty", 2, allow_na=True)
        assert all(x in {1, 2, 3, 4, 5, "N/A"} for x in ratings), (ratings, r.text)


def test_response_format_body_styles() -> None:
    req = ChatRequest("k", "m", [{"role": "user", "content": "x"}],
                      response_format={"name": "p", "schema": SCHEMA})  # fmt: skip
    default = OpenAIBackend(spec("http://127.0.0.1:9/v1"))  # auto: json_schema until rejected
    assert default.body(req)["response_format"]["type"] == "json_schema"
    assert default.body(req)["response_format"]["json_schema"]["schema"] == SCHEMA
    llama = OpenAIBackend(
        spec("http://127.0.0.1:9/v1", options={"response_format_style": "json_object"})
    )
    assert llama.body(req)["response_format"] == {"type": "json_object", "schema": SCHEMA}
    with pytest.raises(ConfigError, match="response_format_style"):
        OpenAIBackend(spec("http://127.0.0.1:9/v1", options={"response_format_style": "grammar"}))


def test_seeded_sampling_is_deterministic(llama_server: str) -> None:
    reqs = [ask(i, temperature=0.9) for i in range(2)]
    first, _, _ = complete(llama_server, reqs)
    second, _, _ = complete(llama_server, reqs)
    assert [r.text for r in first] == [r.text for r in second]
    assert all(r.ok for r in first)


def test_requests_per_minute_smooths_sends(llama_server: str) -> None:
    # 120/min = one send every 0.5 s, no burst: the 6th goes out 2.5 s after the 1st
    results, elapsed, _ = complete(
        llama_server,
        [ask(i, max_tokens=2) for i in range(6)],
        requests_per_minute=120,
        max_concurrency=8,
    )
    assert all(r.ok for r in results)
    assert elapsed >= 2.45, elapsed
    assert elapsed < 30, elapsed


def test_default_transport_is_aiohttp_and_results_match_the_sdk(llama_server: str) -> None:
    reqs = [ask(i, temperature=0.0) for i in range(3)]
    ours, _, backend = complete(llama_server, reqs)
    assert backend.transport == "aiohttp"
    sdk, _, _ = complete(llama_server, reqs, options={"transport": "sdk"})
    assert [(r.text, r.finish_reason, r.usage) for r in ours] == [
        (r.text, r.finish_reason, r.usage) for r in sdk
    ]


def test_sdk_transport_falls_back_to_httpx(
    fault_proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch, llama_server: str
) -> None:
    import openai

    monkeypatch.setattr(openai, "DefaultAioHttpClient", None)
    [expected], _, _ = complete(llama_server, [ask(0)])
    fault_proxy.configure(script=["disconnect", "truncate", "malformed"])
    [r], _, backend = complete(fault_proxy.base_url, [ask(0)], options={"transport": "sdk"})
    assert (backend.transport, backend.sdk_http) == ("sdk", "httpx")
    assert r.ok, r.error
    assert r.attempts == 4
    assert r.text == expected.text


# ----------------------------------------------------------------------------- through faults


def test_30_percent_faults_all_succeed_with_fault_free_texts(
    llama_server: str, fault_proxy: FaultProxy, transport: str
) -> None:
    reqs = [ask(i, max_tokens=8) for i in range(16)]
    expected, _, _ = complete(llama_server, reqs)
    # seed 8 serves 11 faults to these 16 bodies, every kind but a stall (the kind that costs
    # a timeout; test_every_fault_kind_is_retried has one), some requests needing 3 attempts
    fault_proxy.configure(rate=0.3, seed=8, retry_after="1", retry_after_ms="100")
    results, _, _ = complete(
        fault_proxy.base_url,
        reqs,
        max_concurrency=2,
        timeout=20.0,
        options={"transport": transport},
    )
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert [r.text for r in results] == [r.text for r in expected]
    counts = fault_proxy.counts
    # every HTTP attempt reached the proxy exactly once, and attempts counts them
    assert sum(r.attempts for r in results) == sum(counts.values())
    assert counts["ok"] >= len(reqs)  # more if a slow answer outlived the client's timeout
    assert fault_proxy.faults() >= 3, counts  # ~30% of ~23 attempts, whatever the bodies
    assert max(r.attempts for r in results) >= 2
    assert fault_proxy.peak_in_flight <= 2


def test_every_fault_kind_is_retried(
    llama_server: str, fault_proxy: FaultProxy, transport: str
) -> None:
    [expected], _, _ = complete(llama_server, [ask(3, max_tokens=8)])
    script = [*FAULTS, "no_choices"]
    fault_proxy.configure(script=script, retry_after="1", retry_after_ms="50")
    # spare retries: on a loaded machine a real answer may outlast the short timeout too
    [r], _, _ = complete(fault_proxy.base_url, [ask(3, max_tokens=8)], timeout=5.0,
                         max_retries=len(script) + 3, options={"transport": transport})  # fmt: skip
    assert r.ok, r.error
    assert r.text == expected.text
    assert r.attempts >= len(script) + 1
    counts = fault_proxy.counts
    assert counts.pop("ok") >= 1
    assert counts == dict.fromkeys(script, 1)


def test_bad_request_fails_at_once_without_leaking_the_key(
    fault_proxy: FaultProxy, key_env: str, transport: str
) -> None:
    fault_proxy.configure(rate=1.0, kinds=["400"])
    [r], _, _ = complete(
        fault_proxy.base_url, [ask(0)], api_key_env=key_env, options={"transport": transport}
    )
    assert r.attempts == 1
    assert r.text is None
    assert r.error is not None and r.error.startswith("bad_request: HTTP 400")
    assert SENTINEL not in r.error  # the proxy echoed "Authorization: Bearer <key>"
    assert "SENTINEL" not in r.error
    assert fault_proxy.counts == {"400": 1}


def test_unauthorized_stops_and_names_the_variable_not_the_key(
    fault_proxy: FaultProxy, key_env: str, transport: str
) -> None:
    """No request can succeed with a rejected key: the backend raises (the run stops, exit 5)
    after one attempt, instead of failing every request of the run one by one; the error
    names the variable, never its value."""
    fault_proxy.configure(rate=1.0, kinds=["401"])
    with pytest.raises(BackendError, match=r"models\.pool-smol: HTTP 401") as err:
        complete(fault_proxy.base_url, [ask(i) for i in range(3)], api_key_env=key_env,
                 max_concurrency=1, options={"transport": transport})
    assert f"${key_env}" in str(err.value)
    assert SENTINEL not in str(err.value)
    assert fault_proxy.counts == {"401": 1}  # the other requests were never sent


def test_exhausted_retries_are_recorded_not_raised(
    fault_proxy: FaultProxy, key_env: str, transport: str
) -> None:
    fault_proxy.configure(rate=1.0, kinds=["500", "503", "disconnect", "truncate"], seed=5)
    results, _, _ = complete(
        fault_proxy.base_url,
        [ask(i) for i in range(3)],
        max_retries=2,
        api_key_env=key_env,
        options={"transport": transport},
    )
    for r in results:
        assert not r.ok
        assert r.attempts == 3
        assert r.error is not None and "(gave up after 3 attempts)" in r.error
        assert r.error.split(":")[0] in {"server_error", "connection_error", "truncated_response"}
        assert SENTINEL not in r.error
    assert fault_proxy.faults() == 9


def test_retry_after_is_honoured(fault_proxy: FaultProxy, transport: str) -> None:
    fault_proxy.configure(script=["429"], retry_after="1")
    [r], elapsed, _ = complete(
        fault_proxy.base_url, [ask(1, max_tokens=4)], options={"transport": transport}
    )
    assert r.ok, r.error
    assert r.attempts == 2
    assert elapsed >= 1.0, elapsed  # backoff alone would be ~0.01 s here


def test_concurrency_is_bounded(fault_proxy: FaultProxy, transport: str) -> None:
    fault_proxy.configure()
    results, _, _ = complete(fault_proxy.base_url, [ask(i, max_tokens=4) for i in range(8)],
                             max_concurrency=2, options={"transport": transport})  # fmt: skip
    assert all(r.ok for r in results)
    assert fault_proxy.peak_in_flight == 2


#: the reason each fault is recorded under when no retry is allowed (the same on both transports)
FAULT_REASONS = {
    "429": "rate_limited: HTTP 429: Rate limit reached",
    "500": "server_error: HTTP 500",
    "503": "server_error: HTTP 503",
    "stall": "timeout: no complete response within 1s",
    "disconnect": "connection_error: ",
    "truncate": "truncated_response: ",
    "malformed": "malformed_response: response is not valid JSON",
    "no_choices": "malformed_response: malformed completion payload",
}


def test_each_fault_is_classified_the_same_on_both_transports(
    fault_proxy: FaultProxy, transport: str
) -> None:
    for kind, reason in FAULT_REASONS.items():
        fault_proxy.configure(script=[kind], retry_after="3", stall_s=10.0)
        # Only the stall is timed out; faults made from the llama.cpp server's real answer get
        # time to generate it (on a loaded 2-core machine 4 tokens can take over a second).
        timeout = 1.0 if kind == "stall" else 60.0
        [r], elapsed, _ = complete(fault_proxy.base_url, [ask(5, max_tokens=4)], timeout=timeout,
                                   max_retries=0, options={"transport": transport})  # fmt: skip
        assert r.attempts == 1 and r.text is None
        assert r.error is not None and r.error.endswith("(gave up after 1 attempt)"), r.error
        assert r.error.startswith(reason), (kind, r.error)
        if kind in ("stall", "429"):  # no retry, no Retry-After sleep; spec.timeout held
            assert elapsed < 2.9, (kind, elapsed)
    assert fault_proxy.counts == {"no_choices": 1}  # configure() reset it before the last one


def test_wire_request_matches_the_sdk(monkeypatch: pytest.MonkeyPatch, key_env: str) -> None:
    """Both transports send the same request line, body and headers (the SDK's User-Agent,
    ``X-Stainless-*``, ``Authorization: Bearer``, ``OpenAI-Organization`` from the env), except
    the SDK's per-attempt ``x-stainless-retry-count`` / ``-read-timeout`` hints and httpx's
    ``Connection: keep-alive``."""
    monkeypatch.setenv("OPENAI_ORG_ID", "org-prefsynth-test")
    answer = json.dumps({"choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}],
                         "usage": {"prompt_tokens": 3, "completion_tokens": 1}}).encode()  # fmt: skip
    seen: list[tuple[str, dict[str, str], bytes]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in head[1:] if line)
        headers = {k.lower(): v for k, v in headers.items()}
        body = await reader.readexactly(int(headers["content-length"]))
        seen.append((head[0], headers, body))
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                     b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(answer), answer))  # fmt: skip
        await writer.drain()
        writer.close()

    async def go() -> list[ChatResult]:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        results = []
        for transport in ("aiohttp", "sdk"):
            backend = OpenAIBackend(
                spec(url, api_key_env=key_env, options={"transport": transport})
            )
            results += await backend.complete([ask(0)])
            await backend.aclose()
        server.close()
        return results

    results = asyncio.run(go())
    assert all(r.ok and r.text == "hi" for r in results), results
    (line_a, head_a, body_a), (line_s, head_s, body_s) = seen
    assert line_a == line_s == "POST /v1/chat/completions HTTP/1.1"
    assert body_a == body_s
    assert head_a["authorization"] == f"Bearer {SENTINEL}"
    assert head_a["openai-organization"] == "org-prefsynth-test"
    assert head_a["user-agent"].startswith("AsyncOpenAI/Python")
    assert head_a["x-stainless-async"] == "async:asyncio"
    # the SDK's per-attempt hints, and httpx's explicit keep-alive (HTTP/1.1's default anyway)
    skip = {"x-stainless-retry-count", "x-stainless-read-timeout", "connection"}
    assert head_a == {k: v for k, v in head_s.items() if k not in skip}


# ------------------------------------------------------------------------ no server needed


def test_transport_option(monkeypatch: pytest.MonkeyPatch) -> None:
    url = "http://127.0.0.1:9/v1"
    assert OpenAIBackend(spec(url)).transport == "aiohttp"
    sdk = OpenAIBackend(spec(url, options={"transport": "sdk"}))
    assert (sdk.transport, sdk.sdk_http) == ("sdk", "aiohttp")
    with pytest.raises(ConfigError, match=r"options\.transport: .*\(got 'httpx'\)"):
        OpenAIBackend(spec(url, options={"transport": "httpx"}))
    monkeypatch.setattr(openai_http, "aiohttp", None)  # aiohttp not installed
    assert OpenAIBackend(spec(url)).transport == "sdk"
    with pytest.raises(MissingExtraError, match=r"prefsynth\[openai\]"):
        OpenAIBackend(spec(url, options={"transport": "aiohttp"}))


def test_aiohttp_session_is_lazy_and_closed() -> None:
    async def go() -> None:
        url = "http://127.0.0.1:9/v1"
        backend = OpenAIBackend(spec(url, max_concurrency=7, timeout=3.0, max_retries=0))
        sender = backend._sender
        assert isinstance(sender, openai_http.AiohttpSender)
        assert str(sender.url) == "http://127.0.0.1:9/v1/chat/completions"
        assert sender._session is None  # nothing opened before the first request
        [r] = await backend.complete([ask(0)])  # port 9: connection refused
        assert r.error is not None and r.error.startswith("connection_error: "), r.error
        session = sender._session
        assert session is not None and session.connector is not None
        assert session.connector.limit == 7
        assert session.timeout.total == 3.0
        await backend.aclose()
        assert session.closed and sender._session is None

    asyncio.run(go())


def test_missing_key_raises_backend_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PREFSYNTH_SURELY_UNSET_KEY", raising=False)
    with pytest.raises(BackendError, match="PREFSYNTH_SURELY_UNSET_KEY"):
        OpenAIBackend(spec("http://127.0.0.1:9/v1", api_key_env="PREFSYNTH_SURELY_UNSET_KEY"))


def test_missing_sdk_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openai", None)  # not installed
    for transport in ("aiohttp", "sdk"):
        with pytest.raises(MissingExtraError, match=r"prefsynth\[openai\]"):
            OpenAIBackend(spec("http://127.0.0.1:9/v1", options={"transport": transport}))


def test_redact_scrubs_keys_and_auth_headers(key_env: str) -> None:
    backend = OpenAIBackend(spec("http://127.0.0.1:9/v1", api_key_env=key_env))
    text = backend.redact(
        f"bad {SENTINEL}; headers {{'authorization': 'Bearer other-token-123'}} "
        "Authorization: Basic dXNlcjpwYXNz api_key=abc123 bearer xyz789"
    )
    for secret in (SENTINEL, "other-token-123", "dXNlcjpwYXNz", "abc123", "xyz789"):
        assert secret not in text
    assert "api_key_env" in backend.redact("set models.x.api_key_env")


def test_retry_after_parsing() -> None:
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after": "1.5", "retry-after-ms": "250"}) == 0.25
    assert retry_after_seconds({"retry-after": "-3"}) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None
    date = email.utils.formatdate(time.time() + 3, usegmt=True)
    value = retry_after_seconds({"retry-after": date})
    assert value is not None and 1.5 <= value <= 3.5


def test_pacer_and_token_estimate() -> None:
    pacer = Pacer(per_minute=120)  # 2 per second
    waits = [pacer.reserve() for _ in range(5)]
    assert waits[0] == pytest.approx(0.0, abs=0.01)
    assert waits[4] == pytest.approx(2.0, abs=0.05)
    tokens = Pacer(per_minute=600)  # 10 tokens/s: a 50-token request buys 5 s
    assert tokens.reserve(50) == pytest.approx(0.0, abs=0.01)
    assert tokens.reserve(10) == pytest.approx(5.0, abs=0.05)
    req = ChatRequest("k", "m", [{"role": "user", "content": "x" * 400}], {"max_tokens": 32})
    assert estimate_tokens(req, 2048) == 100 + 4 + 32
    assert estimate_tokens(ChatRequest("k", "m", [{"role": "user", "content": ""}]), 64) == 68


def test_executor_knobs_keep_the_semaphore_fed() -> None:
    small = OpenAIBackend(spec("http://127.0.0.1:9/v1", max_concurrency=8))
    assert (small.batch_size, small.max_concurrency) == (16, 4)
    big = OpenAIBackend(spec("http://127.0.0.1:9/v1", max_concurrency=256))
    assert (big.batch_size, big.max_concurrency) == (256, 4)
    huge = OpenAIBackend(spec("http://127.0.0.1:9/v1", max_concurrency=1024))
    assert huge.batch_size * huge.max_concurrency >= 4 * 1024


def test_aiohttp_transport_builds_no_unused_tls_context(monkeypatch: pytest.MonkeyPatch) -> None:
    """The aiohttp transport needs no SDK client: none is built, so no HTTP client loads the
    certificate store (20-120 ms per backend at start-up) for a plain-HTTP server."""
    made = count_ssl_contexts(monkeypatch)
    backend = OpenAIBackend(spec("http://127.0.0.1:9/v1", options={"transport": "aiohttp"}))
    assert made == [] and backend.transport == "aiohttp"
    assert backend._sender.url.path == "/v1/chat/completions"
    assert backend._client is None


def test_aiohttp_transport_never_imports_the_sdk(key_env: str) -> None:
    """The openai SDK costs 0.3-0.5 s of import: the aiohttp transport builds its URL and
    headers without it, through a whole request (a fresh process, so nothing imported it)."""
    code = textwrap.dedent(f"""
        import asyncio, sys
        from prefsynth.backends.openai_compat import OpenAIBackend
        from prefsynth.config import ModelSpec
        from prefsynth.records import ChatRequest
        b = OpenAIBackend(ModelSpec(name="m", backend="openai", model="x", max_retries=0,
                                    base_url="http://127.0.0.1:9/v1", api_key_env="{key_env}"))
        async def go():
            [r] = await b.complete([ChatRequest("k", "x", [{{"role": "user", "content": "q"}}],
                                               {{}})])
            await b.aclose()
            return r
        r = asyncio.run(go())
        assert r.error.startswith("connection_error"), r.error
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("openai", "httpx", "httpx2")))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_https_trust_comes_from_the_sdk_http_library(monkeypatch: pytest.MonkeyPatch) -> None:
    """An https URL gets the TLS context of the SDK's HTTP library (``SSL_CERT_FILE`` honoured
    there), made when the session opens."""
    import importlib

    backend = OpenAIBackend(spec("https://example.invalid/v1"))
    httpx = importlib.import_module("httpx2")
    made: list[object] = []
    monkeypatch.setattr(httpx, "create_ssl_context", lambda: made.append(1) or "ctx")
    assert backend._sender._ssl() == "ctx" and made == [1]
