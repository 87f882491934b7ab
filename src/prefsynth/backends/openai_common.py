"""What the ``openai`` and ``openai-batch`` backends share: request bodies, responses, keys.

Pure helpers (no SDK import), so the Batch API JSONL and the live API send byte-identical
request bodies, and a body written for OpenAI also works with ``vllm run-batch``.
"""

from __future__ import annotations

import os
from typing import Any

from prefsynth.config import ModelSpec
from prefsynth.errors import BackendError
from prefsynth.records import ChatRequest, ChatResult, Usage

#: finish reasons recorded as they are; ``length`` and ``content_filter`` stay visible downstream
RECORDED_FINISH = {"stop", "length", "content_filter", "tool_calls", "function_call"}


def api_key(spec: ModelSpec) -> str:
    """The key from the environment variable the config names. Fails before any work.

    The key is returned to the caller only to hand to the SDK; it is never logged, stored, or
    put in an error message (messages name the variable, not its value).
    """
    if spec.api_key_env is None:
        return "EMPTY"  # local servers (vLLM, llama.cpp) accept any key
    value = os.environ.get(spec.api_key_env)
    if not value:
        raise BackendError(
            f"models.{spec.name}: environment variable {spec.api_key_env} is not set "
            f"(api_key_env); export it or change api_key_env"
        )
    return value


def chat_body(req: ChatRequest) -> dict[str, Any]:
    """The JSON body of ``POST /v1/chat/completions`` for one request."""
    body: dict[str, Any] = {"model": req.model, "messages": req.messages}
    for k in ("temperature", "top_p", "max_tokens", "seed", "stop"):
        v = req.params.get(k)
        if v is not None:
            body[k] = v
    if req.response_format is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": req.response_format.get("name", "output"),
                "schema": req.response_format["schema"],
                "strict": True,
            },
        }
    return body


def result_from_completion(key: str, payload: dict[str, Any]) -> ChatResult:
    """A ``ChatResult`` from a chat-completion JSON payload (live response or batch line)."""
    try:
        choice = payload["choices"][0]
        text = choice["message"].get("content")
        finish = choice.get("finish_reason")
    except (KeyError, IndexError, TypeError, AttributeError):
        return ChatResult(key, error=f"malformed completion payload: {str(payload)[:200]}")
    usage = payload.get("usage") or {}
    u = Usage(int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0))
    if text is None:
        return ChatResult(key, finish_reason=finish, usage=u, error=f"no content (finish_reason={finish})")
    return ChatResult(key, text=text, finish_reason=finish, usage=u)
