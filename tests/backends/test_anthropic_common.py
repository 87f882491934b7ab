"""How a ``ChatRequest`` becomes a Messages API body and an answer a ``ChatResult`` (pure), and
that Anthropic request keys never collide with OpenAI's."""

from __future__ import annotations

from pathlib import Path

import pytest

from prefsynth.backends.anthropic_common import (
    DEFAULT_MAX_TOKENS,
    check_spec,
    message_body,
    parse_message,
    result_from_message,
)
from prefsynth.backends.http_common import redact
from prefsynth.backends.openai_http import Failure
from prefsynth.config import GenParams, ModelSpec, parse_config
from prefsynth.core.keys import build_request, identity_of
from prefsynth.errors import ConfigError
from prefsynth.records import ChatRequest
from prefsynth.stages.judge.rubrics import judgment_schema
from tests.conftest import fake_config

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "7"},
    {"role": "user", "content": "Another?"},
]


def spec(backend: str = "anthropic", **kw: object) -> ModelSpec:
    return ModelSpec(name="claude", backend=backend, model="claude-3-5-sonnet-20241022", **kw)


def test_system_goes_top_level_and_turns_keep_their_order() -> None:
    req = build_request(spec(), CONVERSATION, seed=11)
    body = message_body(req)
    assert body["system"] == "You are terse."
    assert body["messages"] == CONVERSATION[1:]
    assert body["model"] == "claude-3-5-sonnet-20241022"
    # max_tokens is required by Anthropic: the model's own, never left out
    assert body["max_tokens"] == 2048 and body["temperature"] == 1.0
    # no seed (Anthropic has none), no top_p at its default 1.0, nothing else
    assert set(body) == {"model", "max_tokens", "messages", "system", "temperature"}


def test_sampling_parameters_map_and_default_max_tokens() -> None:
    req = ChatRequest("k", "claude-x", [{"role": "system", "content": "a"},
                                        {"role": "system", "content": "b"},
                                        {"role": "user", "content": "hi"}],
                      params={"temperature": 0.2, "top_p": 0.9, "stop": ["\n\n"], "seed": 3})
    body = message_body(req)
    assert body["system"] == "a\n\nb"
    assert body["top_p"] == 0.9 and body["stop_sequences"] == ["\n\n"]
    assert body["max_tokens"] == DEFAULT_MAX_TOKENS and "seed" not in body


def test_structured_output_is_one_forced_tool_with_the_schema() -> None:
    fmt = judgment_schema(2, allow_na=False)
    req = ChatRequest("k", "claude-x", [{"role": "user", "content": "rate"}],
                      params={"max_tokens": 64}, response_format=fmt)
    body = message_body(req)
    [tool] = body["tools"]
    assert tool["name"] == "judgment" and tool["input_schema"] == fmt["schema"]
    assert body["tool_choice"] == {"type": "tool", "name": "judgment"}
    odd = ChatRequest("k", "m", [], response_format={"name": "my format!", "schema": {}})
    assert message_body(odd)["tools"][0]["name"] == "my_format_"


def test_answers_become_results() -> None:
    text = {"content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 3}}
    r = result_from_message("k", text)
    assert r.ok and r.text == "Hello there" and r.finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (15, 3)
    tool = {"content": [{"type": "tool_use", "id": "t", "name": "judgment",
                         "input": {"ratings": [{"text": 1, "rating": 4}]}}],
            "stop_reason": "tool_use", "usage": {}}
    r = result_from_message("k", tool)
    assert r.ok and r.text == '{"ratings":[{"text":1,"rating":4}]}' and r.finish_reason == "stop"
    cut = {**text, "stop_reason": "max_tokens"}
    assert result_from_message("k", cut).finish_reason == "length"
    refused = {"content": [], "stop_reason": "refusal", "usage": {"output_tokens": 0}}
    r = result_from_message("k", refused)
    assert not r.ok and r.finish_reason == "content_filter" and "no content" in (r.error or "")


def test_malformed_answers_are_retryable_failures() -> None:
    assert isinstance(parse_message("k", b"not json"), Failure)
    bad = parse_message("k", b'{"type": "message"}')
    assert isinstance(bad, Failure) and bad.retryable and bad.reason == "malformed_response"


def test_spec_checks_and_redaction() -> None:
    with pytest.raises(ConfigError, match=r"models\.claude\.params\.temperature: 1\.5"):
        check_spec(spec(params=GenParams(temperature=1.5)))
    with pytest.raises(ConfigError, match=r"models\.claude\.base_url: .*without /v1"):
        check_spec(spec(base_url="https://api.anthropic.com/v1"))
    check_spec(spec(base_url="https://api.anthropic.com"))
    assert redact("bad key sk-ant-123456; x-api-key: sk-other", "sk-ant-123456") == (
        "bad key [redacted]; x-api-key: [redacted]")


def test_keys_are_shared_live_and_batch_but_never_with_openai() -> None:
    live, batch = spec("anthropic"), spec("anthropic-batch")
    openai = spec("openai-batch")
    assert identity_of(live) == identity_of(batch) != identity_of(openai)
    keys = {build_request(s, CONVERSATION, seed=1).key for s in (live, batch, openai)}
    assert len(keys) == 2


def test_what_anthropic_refuses_of_every_request_fails_at_config_load(tmp_path: Path) -> None:
    """Not when the judge stage starts, hours of generation later."""
    raw = fake_config(tmp_path)
    raw["judge"] = {"name": "claude", "backend": "anthropic-batch", "model": "claude-x",
                    "params": {"temperature": 1.5}}
    with pytest.raises(ConfigError, match=r"^config: judge\.params\.temperature: 1\.5 is "
                                          r"outside Anthropic's range 0\.\.1$"):
        parse_config(raw)
    raw["judge"] = {"name": "claude", "backend": "anthropic", "model": "claude-x",
                    "base_url": "https://api.anthropic.com/v1/"}
    with pytest.raises(ConfigError, match=r"^config: judge\.base_url: give the server root"):
        parse_config(raw)
