"""The ``vllm`` backend.

The pure parts run everywhere against a fake ``vllm`` module injected into ``sys.modules``:
request -> ``SamplingParams`` mapping, structured output on new and old vLLM, context-length
errors per request, batch failures isolated, lazy loading and freeing. The last test runs a
real tiny model and is skipped without CUDA, vLLM, and a locally cached model.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import importlib.util
import json
import os
import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

import prefsynth.backends.vllm as vb
from prefsynth.backends import create_backend
from prefsynth.config import ModelSpec
from prefsynth.errors import BackendError, MissingExtraError
from prefsynth.records import ChatRequest
from prefsynth.stages.judge.rubrics import judgment_schema


@dataclass
class State:
    """What the fake vLLM saw."""

    created: list[dict[str, Any]] = field(default_factory=list)
    chats: list[tuple[list[Any], list[Any], Any]] = field(default_factory=list)
    shutdowns: int = 0
    cleanups: int = 0
    empty_cache: int = 0
    max_model_len: int = 64


class EngineDeadError(RuntimeError):
    pass


class FakeTokenizer:
    """One token per word, plus 2 per message of chat-template overhead, plus 1 to prompt."""

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool,
                            tokenize: bool) -> list[int]:
        n = sum(2 + len(m["content"].split()) for m in messages) + int(add_generation_prompt)
        return list(range(n))


def make_fake_vllm(monkeypatch: pytest.MonkeyPatch, *, structured: bool = True) -> State:
    state = State()

    class SamplingParams:
        def __init__(self, **kw: Any) -> None:
            self.kw = kw

    class LLM:
        def __init__(self, model: str, **kw: Any) -> None:
            state.created.append({"model": model, **kw})
            self.llm_engine = types.SimpleNamespace(
                model_config=types.SimpleNamespace(max_model_len=state.max_model_len))

        def get_tokenizer(self) -> FakeTokenizer:
            return FakeTokenizer()

        def chat(self, messages: list[Any], sampling_params: list[Any],
                 use_tqdm: bool = True) -> list[Any]:
            state.chats.append((messages, sampling_params, use_tqdm))
            outs = []
            for msgs, sp in zip(messages, sampling_params, strict=True):
                text = msgs[-1]["content"]
                if "EXPLODE" in text:
                    raise ValueError("unsupported thing in one prompt")
                if "DIE" in text:
                    raise EngineDeadError("engine core died")
                reason = "abort" if "ABORT" in text else (
                    "length" if sp.kw["max_tokens"] < 4 else "stop")
                words = ["w"] * min(3, sp.kw["max_tokens"])
                comp = types.SimpleNamespace(text=f"echo {text} seed={sp.kw['seed']}",
                                             finish_reason=reason, token_ids=words)
                outs.append(types.SimpleNamespace(
                    prompt_token_ids=list(range(len(text.split()) + 3)), outputs=[comp]))
            return outs

        def shutdown(self) -> None:
            state.shutdowns += 1

    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.LLM = LLM  # type: ignore[attr-defined]
    vllm.SamplingParams = SamplingParams  # type: ignore[attr-defined]
    sp_mod = types.ModuleType("vllm.sampling_params")
    if structured:
        @dataclass
        class StructuredOutputsParams:
            json: Any = None
        sp_mod.StructuredOutputsParams = StructuredOutputsParams  # type: ignore[attr-defined]
    else:
        @dataclass
        class GuidedDecodingParams:
            json: Any = None
        sp_mod.GuidedDecodingParams = GuidedDecodingParams  # type: ignore[attr-defined]
    dist = types.ModuleType("vllm.distributed")

    def cleanup_dist_env_and_memory() -> None:
        state.cleanups += 1

    dist.cleanup_dist_env_and_memory = cleanup_dist_env_and_memory  # type: ignore[attr-defined]
    torch = types.ModuleType("torch")

    def empty_cache() -> None:
        state.empty_cache += 1

    torch.cuda = types.SimpleNamespace(is_available=lambda: True,  # type: ignore[attr-defined]
                                       empty_cache=empty_cache)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", sp_mod)
    monkeypatch.setitem(sys.modules, "vllm.distributed", dist)
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setattr(vb, "_resident", None)
    return state


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[State]:
    yield make_fake_vllm(monkeypatch)


def spec(name: str = "m", **options: Any) -> ModelSpec:
    return ModelSpec(name=name, backend="vllm", model=f"org/{name}", options=options)


def req(key: str, text: str, **params: Any) -> ChatRequest:
    p = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "seed": 7, "stop": None, **params}
    return ChatRequest(key=key, model="org/m", messages=[{"role": "user", "content": text}],
                       params=p)


def run(backend: Any, reqs: Sequence[ChatRequest]) -> list[Any]:
    return asyncio.run(backend.complete(reqs))


def test_missing_vllm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(MissingExtraError, match=r"pip install 'prefsynth\[vllm\]'"):
        create_backend(spec())


def test_constructing_loads_nothing(fake: State) -> None:
    b = create_backend(spec(tensor_parallel_size=2, batch_size=512))
    assert isinstance(b, vb.VLLMBackend)
    assert fake.created == [] and b.llm is None
    assert b.batch_size == 512 and b.max_concurrency == 1
    assert create_backend(spec("n")).batch_size == vb.DEFAULT_BATCH_SIZE


def test_engine_options_reach_vllm_llm_on_first_complete(fake: State) -> None:
    opts = {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.85, "max_model_len": 64,
            "dtype": "bfloat16", "enable_prefix_caching": True}
    b = create_backend(spec(**opts, batch_size=8))
    run(b, [req("k1", "hello")])
    run(b, [req("k2", "again")])
    assert fake.created == [{"model": "org/m", **opts}]  # loaded once, batch_size kept out


def test_request_to_sampling_params(fake: State) -> None:
    b = create_backend(spec())
    out = run(b, [req("a", "one two", temperature=0.7, top_p=0.9, seed=11, stop=["\n\n"]),
                  req("b", "three", seed=12, max_tokens=20)])
    messages, params, use_tqdm = fake.chats[0]
    assert use_tqdm is False
    assert messages == [[{"role": "user", "content": "one two"}],
                        [{"role": "user", "content": "three"}]]
    assert params[0].kw == {"temperature": 0.7, "top_p": 0.9, "max_tokens": 16, "seed": 11,
                            "stop": ["\n\n"]}
    assert params[1].kw["seed"] == 12 and params[1].kw["max_tokens"] == 20
    assert params[1].kw["stop"] is None
    assert [r.text for r in out] == ["echo one two seed=11", "echo three seed=12"]
    assert out[0].finish_reason == "stop"
    assert (out[0].usage.prompt_tokens, out[0].usage.completion_tokens) == (5, 3)


def test_structured_output_new_and_old_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = judgment_schema(2, allow_na=False)
    r = ChatRequest(key="s", model="org/m", messages=[{"role": "user", "content": "rate"}],
                    params={"max_tokens": 8, "seed": 1}, response_format=fmt)
    state = make_fake_vllm(monkeypatch, structured=True)
    run(create_backend(spec()), [r])
    kw = state.chats[0][1][0].kw
    assert kw["structured_outputs"].json == fmt["schema"] and "guided_decoding" not in kw

    state = make_fake_vllm(monkeypatch, structured=False)  # vLLM < 0.12
    run(create_backend(spec()), [r])
    kw = state.chats[0][1][0].kw
    assert kw["guided_decoding"].json == fmt["schema"] and "structured_outputs" not in kw


def test_too_long_prompt_is_that_requests_error(fake: State) -> None:
    fake.max_model_len = 64
    b = create_backend(spec())
    long = " ".join(["word"] * 80)
    near = " ".join(["word"] * 55)  # 55 + 2 + 1 = 58 tokens: 6 left of 64
    out = run(b, [req("ok", "short"), req("long", long), req("near", near, max_tokens=100)])
    assert out[0].ok and out[2].ok
    assert not out[1].ok and "prompt too long: 83 tokens, max_model_len=64" in out[1].error
    messages, params, _ = fake.chats[0]
    assert len(messages) == 2  # the long prompt was never submitted
    assert params[1].kw["max_tokens"] == 6  # clamped to the room left
    assert out[2].finish_reason == "stop"


def test_prompt_length_with_any_tokenizer_shape() -> None:
    class DictTokenizer:  # transformers 5 returns a BatchEncoding-like mapping
        def apply_chat_template(self, messages: Any, **kw: Any) -> dict[str, list[int]]:
            return {"input_ids": [1, 2, 3]}

    class NoTemplate:
        def apply_chat_template(self, messages: Any, **kw: Any) -> list[int]:
            raise ValueError("this tokenizer has no chat template")

    msgs = [{"role": "user", "content": "hi"}]
    assert vb._prompt_len(DictTokenizer(), msgs) == 3
    assert vb._prompt_len(NoTemplate(), msgs) is None  # vLLM decides; errors are isolated


def test_one_rejected_request_does_not_fail_the_batch(fake: State) -> None:
    b = create_backend(spec())
    reqs = [req(f"k{i}", f"prompt {i}") for i in range(7)]
    reqs[4] = req("bad", "EXPLODE here")
    out = run(b, reqs)
    assert [r.ok for r in out] == [True, True, True, True, False, True, True]
    assert out[4].error == "vllm: ValueError: unsupported thing in one prompt"
    assert [r.key for r in out] == [r.key for r in reqs]
    assert len(fake.chats) < 2 * len(reqs)  # bisection, not one call per request


def test_results_are_handed_over_per_chat_call_on_the_loop_thread(fake: State) -> None:
    """``on_result`` gets each result once, from the event loop's thread, as soon as the
    ``llm.chat`` call that made it returns (a too-long prompt's error first)."""
    import threading

    fake.max_model_len = 64
    b = create_backend(spec())
    reqs = [req(f"k{i}", f"prompt {i}") for i in range(6)]
    reqs[1] = req("long", " ".join(["word"] * 80))
    reqs[4] = req("bad", "EXPLODE here")
    handed: list[tuple[str, int]] = []  # (key, thread)

    async def go() -> list[Any]:
        return await b.complete(reqs, on_result=lambda r: handed.append(
            (r.key, threading.get_ident())))

    out = asyncio.run(go())
    assert sorted(k for k, _ in handed) == sorted(r.key for r in reqs)
    assert handed[0][0] == "long"
    assert {t for _, t in handed} == {threading.get_ident()}
    assert [r.key for r in out] == [r.key for r in reqs]


def test_dead_engine_raises_backend_error(fake: State) -> None:
    b = create_backend(spec())
    with pytest.raises(BackendError, match="vLLM engine failed: EngineDeadError"):
        run(b, [req("a", "fine"), req("b", "DIE")])


def test_aborted_request_is_an_error_and_length_is_kept(fake: State) -> None:
    out = run(create_backend(spec()), [req("a", "ABORT"), req("b", "x", max_tokens=2)])
    assert out[0].error == "vllm: request aborted"
    assert out[1].ok and out[1].finish_reason == "length"


def test_aclose_frees_and_a_later_call_reloads(fake: State) -> None:
    b = create_backend(spec())
    asyncio.run(b.aclose())  # never loaded: nothing to do
    assert fake.shutdowns == 0
    run(b, [req("a", "hi")])
    asyncio.run(b.aclose())
    assert b.llm is None and b.tokenizer is None and vb._resident is None
    assert (fake.shutdowns, fake.cleanups, fake.empty_cache) == (1, 1, 1)
    asyncio.run(b.aclose())  # idempotent
    assert fake.shutdowns == 1
    run(b, [req("b", "hi")])
    assert len(fake.created) == 2


def test_one_engine_on_the_gpu_at_a_time(fake: State) -> None:
    a, b = create_backend(spec("a")), create_backend(spec("b"))
    run(a, [req("1", "x")])
    run(b, [req("2", "y")])  # loading b unloads a first
    assert a.llm is None and b.llm is not None and vb._resident is b
    assert fake.shutdowns == 1
    asyncio.run(a.aclose())
    asyncio.run(b.aclose())
    assert fake.shutdowns == 2


# --- a real model on a real GPU ---------------------------------------------------------------

def _cuda() -> bool:
    if importlib.util.find_spec("vllm") is None or importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


def _local_tiny_model() -> str | None:
    """``PREFSYNTH_VLLM_TEST_MODEL`` (a name or path), or SmolLM2-135M-Instruct if it is in
    the local Hugging Face cache: the test never downloads."""
    given = os.environ.get("PREFSYNTH_VLLM_TEST_MODEL")
    if given:
        return given
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    name = "HuggingFaceTB/SmolLM2-135M-Instruct"
    found = try_to_load_from_cache(name, "config.json")
    return name if isinstance(found, str) else None


@pytest.mark.slow
@pytest.mark.skipif(not _cuda(), reason="needs CUDA and vllm")
def test_real_vllm_tiny_model() -> None:
    model = _local_tiny_model()
    if model is None:
        pytest.skip("no tiny model cached locally (set PREFSYNTH_VLLM_TEST_MODEL)")
    import torch

    s = ModelSpec(name="tiny", backend="vllm", model=model,
                  options={"max_model_len": 512, "gpu_memory_utilization": 0.3,
                           "enforce_eager": True})
    b = create_backend(s)
    fmt = judgment_schema(2, allow_na=False)
    structured = ChatRequest(key="s", model=model, params={"max_tokens": 200, "seed": 3,
                                                           "temperature": 0.1},
                             messages=[{"role": "user", "content": "Rate texts 1 and 2."}],
                             response_format=fmt)
    reqs = [req("a", "Say hello.", max_tokens=16), req("long", "word " * 2000), structured]
    out = run(b, reqs)
    again = run(b, [reqs[0]])
    assert out[0].ok and out[0].usage.completion_tokens > 0
    assert again[0].text == out[0].text  # per-request seed: same answer, other batch
    assert not out[1].ok and "prompt too long" in (out[1].error or "")
    assert len(json.loads(out[2].text or "")["ratings"]) == 2
    free_before = torch.cuda.mem_get_info()[0]
    asyncio.run(b.aclose())
    assert torch.cuda.mem_get_info()[0] > free_before
