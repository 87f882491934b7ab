"""Request keys: the hash of everything that determines a model's answer, and nothing else.

A key covers the backend's key family (backends that answer a request the same way share
one: ``openai`` live and ``openai-batch``), the model, the messages (a model's system prompt
included), the sampling parameters with the per-request seed, the response format, and the backend
options that change answers (``n_ctx``, a quantization: the fields its ``Options`` model marks
with ``key_option``, and only when set to something other than their default, so a config
that sets none keeps the keys it always had). Endpoints, API keys, concurrency, rate limits,
threads and timeouts are deliberately left out: the same model behind another URL gives the
same answer, and a key must never reach the store. Parsing and
pairing are outside the key, so re-parsing or re-pairing never calls a model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefsynth.config import ModelSpec
from prefsynth.records import ChatRequest, Message, RequestTag, stable_hash


def identity(backend: str, model: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """What of a backend's settings determines its answers (part of every request key).
    ``options`` appear only when there are some, so keys without them never changed."""
    ident: dict[str, Any] = {"backend": backend, "model": model}
    if options:
        ident["options"] = options
    return ident


def identity_of(spec: ModelSpec) -> dict[str, Any]:
    """The identity of one configured model: its backend's key family, the model, and its
    answer-changing options. Validates the spec first (``ConfigError`` before any work)."""
    from prefsynth.backends import backend_class, key_options

    options = key_options(spec)
    family = backend_class(spec.backend).key_family or spec.backend
    return identity(family, spec.model, options)


def request_key(identity: dict[str, Any], messages: Any, params: dict[str, Any],
                **extra: Any) -> str:
    """The store key of one request: a hash of what determines its answer, nothing else."""
    return stable_hash({"id": identity, "messages": messages, "params": params, **extra}, 32)


def params_of(spec: ModelSpec, seed: int) -> dict[str, object]:
    p = spec.params
    return {"temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens,
            "stop": p.stop, "seed": seed}


def build_request(spec: ModelSpec, messages: list[Message], seed: int,
                  response_format: dict[str, object] | None = None,
                  build: Callable[[], list[Message]] | None = None,
                  tag: RequestTag | None = None, keep: bool = False) -> ChatRequest:
    """A request keyed by what determines its answer. With ``build``, the request is lazy:
    ``messages`` are used for the key only and not kept (see ``ChatRequest``), unless
    ``keep`` holds them until the request is sent and released (rendered once)."""
    params = params_of(spec, seed)
    extra = {"response_format": response_format} if response_format is not None else {}
    key = request_key(identity_of(spec), messages, params, **extra)
    return ChatRequest(key=key, model=spec.model, messages=[] if build and not keep else messages,
                       params=params, response_format=response_format, tag=tag, build=build)
