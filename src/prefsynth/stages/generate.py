"""Generate: one chat request per (prompt, picked model), and Generation records back.

The key covers what determines the answer (``core.keys``); a model's ``system_prompt`` is part
of the messages.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prefsynth.config import ModelSpec
from prefsynth.core.keys import build_request
from prefsynth.records import (
    ChatRequest,
    ChatResult,
    Generation,
    GenerationTag,
    Prompt,
    RequestState,
)
from prefsynth.seeding import seed_for


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
                                      tag=GenerationTag(p.id, name)))
    return reqs


def to_generations(requests: Sequence[ChatRequest],
                   results: Mapping[str, ChatResult]) -> list[Generation]:
    """Generation records; a request with no stored result is reported as pending."""
    out = []
    for r in requests:
        res = results.get(r.key)
        assert isinstance(r.tag, GenerationTag)
        pid, model = r.tag.prompt_id, r.tag.model
        if res is None or res.pending:
            out.append(Generation.waiting(pid, model))
        elif not res.ok:
            out.append(Generation(pid, model, None, res.finish_reason, res.usage, res.error,
                                  RequestState.FAILED))
        else:
            out.append(Generation(pid, model, res.text, res.finish_reason, res.usage))
    return out
