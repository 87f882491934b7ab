"""What the ``anthropic`` and ``anthropic-batch`` backends share: Messages API bodies, answers
and errors (``MESSAGES``, the senders' ``Api``), the key, what they declare
(``AnthropicFamily``) and what they refuse of a spec (``check_spec``).

Pure helpers (the SDK is imported only by ``import_sdk``), so a Message Batches request's
``params`` and a live request's body are the same bytes, and both backends share request keys
(``key_family = "anthropic"``) while never sharing one with an OpenAI model.

How a ``ChatRequest`` maps onto ``POST /v1/messages``:

* ``system`` turns go to the top-level ``system`` field (joined by a blank line when there are
  several); the other turns keep their order and roles, so multi-turn prompts stay multi-turn.
* ``max_tokens`` is required by Anthropic: the request's own (every configured model has one,
  ``params.max_tokens``: 2048, the judge 1024), else ``DEFAULT_MAX_TOKENS``.
* ``temperature`` is sent; ``top_p`` only when it is not 1.0 (the API default, so nothing
  changes; newer Claude models refuse ``temperature`` and ``top_p`` together); ``stop`` becomes
  ``stop_sequences``. Anthropic has no ``seed``: it is never sent (it stays in the request key,
  as for every backend), and these backends declare ``reproducible = False``.
* Structured output (``ChatRequest.response_format``) is one tool whose ``input_schema`` is the
  JSON schema, forced with ``tool_choice``: the SDK's documented way to get JSON. The answer's
  ``tool_use`` input becomes the result text, serialized as JSON.

Stop reasons are recorded in the OpenAI vocabulary the rest of prefsynth reads: ``end_turn``,
``stop_sequence`` and ``tool_use`` → ``stop``; ``max_tokens`` → ``length``; ``refusal`` →
``content_filter``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

from prefsynth.backends.openai_http import (
    Api,
    Failure,
    body_parser,
    server_message,
    short,
    status_failure,
)
from prefsynth.config import ModelSpec
from prefsynth.errors import BackendError, ConfigError, MissingExtraError
from prefsynth.records import ChatRequest, ChatResult, Usage

#: the variable read when a model sets no ``api_key_env`` (the SDK's own default)
DEFAULT_KEY_ENV = "ANTHROPIC_API_KEY"
#: ``max_tokens`` for a request that carries none (Anthropic requires the field)
DEFAULT_MAX_TOKENS = 2048
#: Anthropic's stop reasons in the vocabulary the pipeline and the data use
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}
_TOOL_NAME = re.compile(r"[^A-Za-z0-9_-]")
class AnthropicFamily:
    """What both Anthropic backends declare (mixed in before their base class)."""

    #: live and batch send the same body: they share request keys, never with OpenAI's
    key_family: ClassVar[str | None] = "anthropic"
    #: the Messages API takes no seed: a rerun cannot replay the answers
    reproducible: ClassVar[bool] = False

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        check_spec(spec)


def import_sdk(backend: str) -> Any:
    """The ``anthropic`` SDK, or ``MissingExtraError`` naming the extra that installs it."""
    try:
        import anthropic
    except ImportError:
        raise MissingExtraError(f"the {backend} backend", "anthropic") from None
    return anthropic


def api_key(spec: ModelSpec) -> str:
    """The key from ``api_key_env`` (default ``ANTHROPIC_API_KEY``). Fails before any work.

    Returned only to hand to the SDK: never logged, stored, or put in an error message
    (messages name the variable, not its value).
    """
    env = spec.api_key_env or DEFAULT_KEY_ENV
    value = os.environ.get(env)
    if not value:
        where = "api_key_env" if spec.api_key_env else f"api_key_env unset, so {DEFAULT_KEY_ENV}"
        raise BackendError(f"{spec.where}: environment variable {env} is not set ({where});"
                           f" export it or change api_key_env")
    return value


def check_spec(spec: ModelSpec) -> None:
    """What Anthropic would refuse for every request, refused at config load instead."""
    t = spec.params.temperature
    if not 0.0 <= t <= 1.0:
        raise ConfigError(f"{spec.where}.params.temperature: {t} is outside Anthropic's "
                          f"range 0..1")
    if spec.base_url and spec.base_url.rstrip("/").endswith("/v1"):
        raise ConfigError(f"{spec.where}.base_url: give the server root (like "
                          f"https://api.anthropic.com), without /v1: the API paths add it")


def tool_name(response_format: dict[str, Any]) -> str:
    """A tool name Anthropic accepts (``^[a-zA-Z0-9_-]{1,64}$``) from the format's name."""
    return _TOOL_NAME.sub("_", str(response_format.get("name") or "output"))[:64] or "output"


def message_body(req: ChatRequest) -> dict[str, Any]:
    """The JSON body of ``POST /v1/messages`` (and a batch request's ``params``).

    Raises ``ValueError`` for a turn whose role Anthropic has no place for (``tool``...)."""
    system: list[str] = []
    turns: list[Any] = []
    for m in req.messages:
        role = m["role"]
        if role == "user" or role == "assistant":
            turns.append(m)
        elif role == "system":
            system.append(m["content"])
        else:
            raise ValueError(f"role {role!r} has no Anthropic equivalent")
    p = req.params
    body: dict[str, Any] = {
        "model": req.model,
        "max_tokens": int(p.get("max_tokens") or DEFAULT_MAX_TOKENS),
        "messages": turns,
    }
    if system:
        body["system"] = "\n\n".join(system)
    temperature, top_p, stop = p.get("temperature"), p.get("top_p"), p.get("stop")
    if temperature is not None:
        body["temperature"] = temperature
    if top_p is not None and top_p != 1.0:
        body["top_p"] = top_p
    if stop:
        body["stop_sequences"] = list(stop)
    fmt = req.response_format
    if fmt is not None:
        name = tool_name(fmt)
        body["tools"] = [{"name": name, "input_schema": fmt["schema"],
                          "description": "Record the answer: call this tool with the JSON "
                                         "object the instructions ask for."}]
        body["tool_choice"] = {"type": "tool", "name": name}
    return body


def result_from_message(key: str, payload: Any) -> ChatResult:
    """A ``ChatResult`` from a Messages API answer (live response or batch result): the text
    blocks joined, or the first ``tool_use`` input as JSON."""
    text: str | None = None
    tool: Any = None
    try:
        reason = payload.get("stop_reason")
        for block in payload["content"]:
            kind = block.get("type")
            if kind == "text":
                text = block["text"] if text is None else text + block["text"]
            elif kind == "tool_use" and tool is None:
                tool = block["input"]
    except (KeyError, TypeError, AttributeError):
        return ChatResult(key, error=f"malformed message payload: {str(payload)[:200]}")
    usage = payload.get("usage") or {}
    prompt = int(usage.get("input_tokens") or 0)
    for cached in ("cache_creation_input_tokens", "cache_read_input_tokens"):
        if usage.get(cached):
            prompt += int(usage[cached])
    u = Usage(prompt, int(usage.get("output_tokens") or 0))
    finish = STOP_REASONS.get(reason, reason)
    if tool is not None:
        return ChatResult(key, text=orjson.dumps(tool).decode(), finish_reason=finish, usage=u)
    if text is None:
        return ChatResult(key, finish_reason=finish, usage=u,
                          error=f"no content (stop_reason={reason})")
    return ChatResult(key, text=text, finish_reason=finish, usage=u)


#: a Messages API 2xx body: the result, or a retryable ``malformed_response``
parse_message = body_parser(result_from_message)


def messages_failure(status: int, headers: Mapping[str, str], body: object,
                     spec: ModelSpec) -> Failure:
    """``openai_http.status_failure`` (retry 408/409/429/5xx, ``retry-after``), with a 401
    naming the variable the key came from and Anthropic's 529 called what it is."""
    if status == 401:
        env = spec.api_key_env or DEFAULT_KEY_ENV
        why = short(server_message(body))
        return Failure("unauthorized", f"HTTP 401: the key in ${env} was rejected ({why})", False)
    failure = status_failure(status, headers, body, spec)
    return failure._replace(reason="overloaded") if status == 529 else failure


#: ``POST {base_url}/v1/messages`` for the ``openai_http`` senders
MESSAGES = Api("/v1/messages", parse_message, messages_failure)


__all__ = [
    "DEFAULT_KEY_ENV",
    "DEFAULT_MAX_TOKENS",
    "MESSAGES",
    "STOP_REASONS",
    "AnthropicFamily",
    "api_key",
    "check_spec",
    "import_sdk",
    "message_body",
    "messages_failure",
    "parse_message",
    "result_from_message",
]
