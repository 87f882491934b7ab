"""Generate: one chat request per (prompt, picked model), and Generation records back.

The request key covers what determines the answer (backend identity, model, messages, sampling
parameters, the per-request seed); a model's ``system_prompt`` is part of the messages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from prefsynth.backends.base import identity
from prefsynth.config import ModelSpec
from prefsynth.records import ChatRequest, ChatResult, Generation, Prompt
from prefsynth.seeding import seed_for
from prefsynth.store import request_key

#: backends that answer the same request the same way share cache keys
KEY_FAMILY = {"openai-batch": "openai"}


def params_of(spec: ModelSpec, seed: int) -> dict[str, object]:
    p = spec.params
    return {"temperature": p.temperature, "top_p": p.top_p, "max_tokens": p.max_tokens,
            "stop": p.stop, "seed": seed}


def build_request(spec: ModelSpec, messages: list[dict[str, str]], seed: int,
                  response_format: dict[str, object] | None = None,
                  build: Callable[[], list[dict[str, str]]] | None = None,
                  **tag: object) -> ChatRequest:
    """A request keyed by what determines its answer. With ``build``, the request is lazy:
    ``messages`` are used for the key only and not kept (see ``ChatRequest``)."""
    params = params_of(spec, seed)
    ident = identity(KEY_FAMILY.get(spec.backend, spec.backend), spec.model)
    extra = {"response_format": response_format} if response_format is not None else {}
    key = request_key(ident, messages, params, **extra)
    return ChatRequest(key=key, model=spec.model, messages=[] if build else messages,
                       params=params, response_format=response_format, tag=dict(tag),
                       build=build)


def generation_requests(prompts: Sequence[Prompt], assignment: Mapping[str, list[str]],
                        specs: Mapping[str, ModelSpec], seed: int) -> list[ChatRequest]:
    reqs = []
    for p in prompts:
        for name in assignment[p.id]:
            spec = specs[name]
            messages = list(p.messages)
            if spec.system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": spec.system_prompt}, *messages]
            reqs.append(build_request(spec, messages, seed_for(seed, "gen", p.id, name),
                                      prompt_id=p.id, model=name))
    return reqs


def to_generations(requests: Sequence[ChatRequest],
                   results: Mapping[str, ChatResult]) -> list[Generation]:
    """Generation records; a request with no stored result is reported as pending."""
    out = []
    for r in requests:
        res = results.get(r.key)
        pid, model = str(r.tag["prompt_id"]), str(r.tag["model"])
        if res is None:
            out.append(Generation(pid, model, None, error="pending"))
        elif not res.ok:
            out.append(Generation(pid, model, None, res.finish_reason, res.usage, res.error))
        else:
            out.append(Generation(pid, model, res.text, res.finish_reason, res.usage))
    return out
