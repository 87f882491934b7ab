"""What the ``openai`` and ``openai-batch`` backends share: request bodies, responses, keys,
and the URL and headers of the live API.

Pure helpers (no SDK import), so the Batch API JSONL and the live API send byte-identical
request bodies, and a body written for OpenAI also works with ``vllm run-batch``;
``wire_target`` gives the aiohttp transport what ``openai.AsyncOpenAI`` would send, without
the SDK's 0.3-0.5 s of import.
"""

from __future__ import annotations

import os
from typing import Any

from prefsynth.backends.http_common import stainless_headers
from prefsynth.config import ModelSpec
from prefsynth.errors import BackendError
from prefsynth.records import ChatRequest, ChatResult, Usage

#: finish reasons recorded as they are; ``length`` and ``content_filter`` stay visible downstream
RECORDED_FINISH = {"stop", "length", "content_filter", "tool_calls", "function_call"}
#: where ``openai.AsyncOpenAI`` sends when neither ``base_url`` nor ``OPENAI_BASE_URL`` says
DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: the largest token count believed (no context is two billion tokens); above it, malformed
MAX_TOKENS = 2**31 - 1


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
            f"{spec.where}: environment variable {spec.api_key_env} is not set "
            f"(api_key_env); export it or change api_key_env"
        )
    return value


def wire_target(spec: ModelSpec, key: str, path: str) -> tuple[str, dict[str, str]]:
    """The URL of ``path`` and the headers ``openai.AsyncOpenAI(base_url=spec.base_url,
    api_key=key)`` sends with every request (less its per-attempt ``X-Stainless-Retry-Count``
    and ``-Read-Timeout``), resolved as the SDK resolves them: ``base_url``, else
    ``OPENAI_BASE_URL``, else OpenAI's; ``Authorization: Bearer``; ``OpenAI-Organization`` /
    ``OpenAI-Project`` from ``OPENAI_ORG_ID`` / ``OPENAI_PROJECT_ID`` when set. A test sends
    one request through each transport and compares what the server saw."""
    base = spec.base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(stainless_headers("openai", "AsyncOpenAI"))
    for header, env in (("OpenAI-Organization", "OPENAI_ORG_ID"),
                        ("OpenAI-Project", "OPENAI_PROJECT_ID")):
        value = os.environ.get(env)
        if value is not None:
            headers[header] = value
    return base.rstrip("/") + path, headers


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


def _tokens(usage: dict[str, Any], field: str) -> int | None:
    """A token count as an int, or ``None`` when it is not a plausible count."""
    n = usage.get(field)
    if n is None:
        return 0
    if isinstance(n, float) and n.is_integer():
        n = int(n)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_TOKENS:
        return None
    return n


def result_from_completion(key: str, payload: Any) -> ChatResult:
    """A ``ChatResult`` from a chat-completion JSON payload (live response or batch line).

    Whatever a server sends, the answer is a result: a payload of the wrong shape (content an
    object, ``usage`` a string, a count of 10**30) is that request's ``malformed completion
    payload`` error, never an exception that would take the answers buffered with it down."""
    try:
        choice = payload["choices"][0]
        text = choice["message"].get("content")
        finish = choice.get("finish_reason")
        usage = payload.get("usage") or {}
    except (KeyError, IndexError, TypeError, AttributeError):
        return ChatResult(key, error=f"malformed completion payload: {str(payload)[:200]}")
    if text is not None and not isinstance(text, str):
        return ChatResult(key, error=f"malformed completion payload: content is a "
                                     f"{type(text).__name__}, not a string")
    if finish is not None and not isinstance(finish, str):
        return ChatResult(key, error=f"malformed completion payload: finish_reason "
                                     f"{str(finish)[:50]}")
    counts = (_tokens(usage, "prompt_tokens"), _tokens(usage, "completion_tokens")) if (
        isinstance(usage, dict)) else (None, None)
    if counts[0] is None or counts[1] is None:
        return ChatResult(key, error=f"malformed completion payload: usage {str(usage)[:100]}")
    u = Usage(counts[0], counts[1])
    if text is None:
        return ChatResult(key, finish_reason=finish, usage=u,
                          error=f"no content (finish_reason={finish})")
    return ChatResult(key, text=text, finish_reason=finish, usage=u)
