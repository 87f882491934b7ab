"""The retry loop, pacers and redaction the live HTTP backends share (``http_common``), on
scripted senders: what one loop must do for both ``openai`` and ``anthropic``."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from unittest.mock import AsyncMock, Mock, call

import pytest

from prefsynth.backends.anthropic_live import AnthropicBackend
from prefsynth.backends.http_common import HttpBackend, Pacer, estimate_tokens, input_estimate
from prefsynth.backends.openai_compat import OpenAIBackend
from prefsynth.backends.openai_http import Failure, Outcome
from prefsynth.config import ModelSpec
from prefsynth.errors import BackendError
from prefsynth.records import ChatRequest, ChatResult, Usage
from prefsynth.stages.judge.rubrics import judgment_schema

KEY_ENV = "PREFSYNTH_TEST_HTTP_COMMON_KEY"


class Script:
    """A sender that answers from a list of outcomes and records the bodies it was given."""

    def __init__(self, outcomes: Sequence[Outcome]) -> None:
        self.outcomes = list(outcomes)
        self.bodies: list[bytes] = []

    async def send(self, key: str, content: bytes) -> Outcome:
        self.bodies.append(content)
        return self.outcomes.pop(0) if self.outcomes else ChatResult(key, text="ok")

    async def aclose(self) -> None:
        return None


def backend(cls: type[HttpBackend], script: Script, **kw: object) -> HttpBackend:
    base = "http://127.0.0.1:9/v1" if cls is OpenAIBackend else "http://127.0.0.1:9"
    b = cls(ModelSpec(name="m", backend=cls.name, model="claude-x", base_url=base,
                      api_key_env=KEY_ENV, max_retries=2, **kw))
    b._sender = script
    b.base_delay, b.max_delay = 0.001, 0.001
    return b


def run(b: HttpBackend, reqs: Sequence[ChatRequest],
        on_result: Callable[[ChatResult], None] | None = None) -> list[ChatResult]:
    async def go() -> list[ChatResult]:
        try:
            return await b.complete(reqs, on_result)
        finally:
            await b.aclose()
    return asyncio.run(go())


REQ = ChatRequest("k", "claude-x", [{"role": "user", "content": "x" * 40}], {"max_tokens": 8})


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-common-SECRET-1234")


@pytest.mark.parametrize("cls", [OpenAIBackend, AnthropicBackend])
def test_one_loop_retries_then_records_and_a_rejected_key_raises(
        cls: type[HttpBackend]) -> None:
    flaky = Script([Failure("server_error", "HTTP 500", True)] * 2)
    [r] = run(backend(cls, flaky), [REQ])
    assert r.ok and r.attempts == 3 and len(flaky.bodies) == 3
    gone = Script([Failure("server_error", "HTTP 500 sk-common-SECRET-1234", True)] * 3)
    [r] = run(backend(cls, gone), [REQ])
    assert r.error == "server_error: HTTP 500 [redacted] (gave up after 3 attempts)"
    dead = Script([Failure("unauthorized", "HTTP 401: key sk-common-SECRET-1234", False)])
    with pytest.raises(BackendError, match=r"^models\.m: HTTP 401: key \[redacted\]$"):
        run(backend(cls, dead), [REQ])


@pytest.mark.parametrize("cls", [OpenAIBackend, AnthropicBackend])
def test_answers_are_handed_over_and_a_refused_key_sends_nothing_more(
        cls: type[HttpBackend]) -> None:
    reqs = [ChatRequest(f"k{i}", "claude-x", [{"role": "user", "content": "hi"}])
            for i in range(3)]
    handed: list[str] = []
    results = run(backend(cls, Script([])), reqs, lambda r: handed.append(r.key))
    assert [r.key for r in results] == ["k0", "k1", "k2"] == sorted(handed)
    dead = Script([Failure("forbidden", "HTTP 403: no access", False)])
    with pytest.raises(BackendError, match="HTTP 403"):
        run(backend(cls, dead, max_concurrency=1), reqs)
    assert len(dead.bodies) == 1  # the others were never sent


@pytest.mark.parametrize("cls", [OpenAIBackend, AnthropicBackend])
def test_copies_of_a_model_pace_through_one_shared_gate(cls: type[HttpBackend]) -> None:
    """Under ``executor: ray`` every copy's sends go through the model's one budget, and a
    429 seen by one copy is reported to it."""
    b = backend(cls, Script([Failure("rate_limited", "HTTP 429", True, retry_after=0.01)]),
                requests_per_minute=600.0, tokens_per_minute=6000.0)
    gate = SimpleNamespace(acquire=AsyncMock(), cooldown=Mock())  # a SendGate
    b.share_limits(gate)
    [r] = run(b, [REQ])
    assert r.ok and r.attempts == 2
    assert gate.acquire.await_args_list == [call(14 + 8)] * 2
    gate.cooldown.assert_called_once_with(0.01)


def test_a_format_refused_in_both_forms_is_sent_twice_not_forever() -> None:
    """``openai``'s ``auto`` style resends at once in the ``json_object`` form; refused again
    in that form, the request fails instead of looping."""
    refused = Failure("bad_request", "response_format json_object json_schema", False,
                      format_rejected=True)
    script = Script([refused] * 5)
    req = ChatRequest("k", "m", [{"role": "user", "content": "rate"}],
                      response_format=judgment_schema(2, allow_na=False))
    [r] = run(backend(OpenAIBackend, script), [req])
    assert len(script.bodies) == 2 and b"json_schema" in script.bodies[0]
    assert b'"json_object"' in script.bodies[1] and r.error and r.error.startswith("bad_request")


def test_only_anthropic_refunds_the_unused_token_budget() -> None:
    used = ChatResult("k", text="ok", usage=Usage(10, 1))
    for cls, refunds in ((OpenAIBackend, False), (AnthropicBackend, True)):
        b = backend(cls, Script([used]), tokens_per_minute=60.0)  # one token a second
        run(b, [REQ])
        assert b._tpm is not None
        later = b._tpm.reserve(1.0)  # the first reserved 14 + 8 tokens, used 11
        assert later == pytest.approx(11.0 if refunds else 22.0, abs=0.5), cls


def test_pacer_reserves_then_gives_back_what_was_not_used() -> None:
    p = Pacer(60.0)  # one unit per second
    assert p.reserve(1.0) == 0.0
    assert p.reserve(2.0) == pytest.approx(1.0, abs=0.05)  # waits for the first unit
    p.adjust(-2.0)  # the second used nothing: its time is given back
    assert p.reserve(1.0) == pytest.approx(1.0, abs=0.05)
    p.adjust(-100.0)  # never into the past: no banked burst
    assert p.reserve(1.0) == pytest.approx(0.0, abs=0.05)


def test_token_estimates() -> None:
    assert input_estimate(REQ) == 10 + 4
    assert estimate_tokens(REQ, 2048) == 14 + 8
    assert estimate_tokens(ChatRequest("k", "m", [{"role": "user", "content": ""}]), 64) == 68
