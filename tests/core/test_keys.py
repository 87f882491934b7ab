"""Request keys: what goes in (answer-changing options) and what stays out, and that every
store written before options were keyed keeps its keys."""

from __future__ import annotations

from typing import Any

import pytest

from prefsynth.config import JudgeSpec, ModelSpec
from prefsynth.core.keys import build_request, identity_of
from prefsynth.errors import ConfigError

HELLO = [{"role": "user", "content": "Hello"}]

#: keys computed before backend options were part of them (commit 25b7f72): a store written
#: then must still answer the same config
BEFORE = {
    "openai": "9de3a120ec48d356ccb9dbf69c6f2503",
    "openai-batch": "9de3a120ec48d356ccb9dbf69c6f2503",
    "llamacpp": "fbc35a02802a34ac062805f498a7ce1f",
    "vllm": "391ce55284e5174e42e21e8ad671e66d",
    "fake": "f3df899d5a95ef8117f5169072a7bd7a",
}


def key(backend: str, options: dict[str, Any] | None = None, **over: Any) -> str:
    spec = ModelSpec(name="m", backend=backend, model="smollm2", options=options or {}, **over)
    return build_request(spec, HELLO, 7).key


@pytest.mark.parametrize("backend", sorted(BEFORE))
def test_keys_without_options_are_unchanged(backend: str) -> None:
    assert key(backend) == BEFORE[backend]


def test_judge_key_is_unchanged() -> None:
    spec = JudgeSpec(name="j", backend="openai", model="gpt-4o-mini", base_url="http://x/v1",
                     max_concurrency=3)
    fmt = {"name": "r", "schema": {"type": "object"}}
    assert build_request(spec, [{"role": "user", "content": "Rate"}], 11, fmt).key == (
        "ce86013f13ee51d3f79df3f776bda54c")


@pytest.mark.parametrize(("backend", "options"), [
    ("llamacpp", {"n_threads": 2, "n_batch": 64, "use_mmap": False}),
    ("llamacpp", {"n_ctx": 2048, "max_string_length": 160}),  # the defaults, set explicitly
    ("openai", {"transport": "sdk", "response_format_style": "json_object",
                "max_response_bytes": 5000}),
    ("openai-batch", {"poll_interval": 5, "wait": True, "max_batches_in_flight": 2}),
    ("vllm", {"batch_size": 64, "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5,
              "enforce_eager": True, "enable_prefix_caching": True}),
    ("vllm", {"engine_args": "{}"}),
    ("fake", {"fail_rate": 0.5, "garble_first": True, "rating": "hash"}),
])  # fmt: skip
def test_options_that_do_not_change_answers_stay_out(backend: str,
                                                     options: dict[str, Any]) -> None:
    assert key(backend, options) == BEFORE[backend]


def test_endpoints_stay_out() -> None:
    assert key("openai", base_url="http://a/v1", timeout=5, max_retries=1, max_concurrency=99,
               requests_per_minute=10, tokens_per_minute=1000) == BEFORE["openai"]


@pytest.mark.parametrize(("backend", "options"), [
    ("llamacpp", {"n_ctx": 4096}),
    ("llamacpp", {"max_string_length": 80}),
    ("llamacpp", {"chat_format": "chatml"}),
    ("vllm", {"max_model_len": 4096}),
    ("vllm", {"quantization": "awq"}),
    ("vllm", {"dtype": "float16"}),
    ("vllm", {"engine_args": "{\"rope_scaling\": {\"type\": \"yarn\"}}"}),
    ("fake", {"rating": "length"}),
])  # fmt: skip
def test_options_that_change_answers_go_in(backend: str, options: dict[str, Any]) -> None:
    changed = key(backend, options)
    assert changed != BEFORE[backend]
    # what does not change answers still stays out next to them
    assert key(backend, {**options, **_harmless(backend)}) == changed


def _harmless(backend: str) -> dict[str, Any]:
    return {"llamacpp": {"n_threads": 3}, "vllm": {"batch_size": 8},
            "fake": {"fail_rate": 0.1}}[backend]


def test_each_value_its_own_key() -> None:
    keys = {key("llamacpp", {"n_ctx": n}) for n in (1024, 4096, 8192)}
    assert len(keys) == 3 and BEFORE["llamacpp"] not in keys
    assert identity_of(ModelSpec(name="m", backend="llamacpp", model="x",
                                 options={"n_ctx": 4096, "n_threads": 2})) == {
        "backend": "llamacpp", "model": "x", "options": {"n_ctx": 4096}}


def test_openai_and_openai_batch_keep_sharing_keys() -> None:
    live = key("openai", {"transport": "sdk"}, base_url="http://a/v1", max_concurrency=64)
    batch = key("openai-batch", {"poll_interval": 60}, api_key_env="OPENAI_API_KEY")
    assert live == batch == BEFORE["openai"]


def test_keys_check_the_spec_first() -> None:
    """``status`` and ``estimate`` compute keys without creating backends: a bad option or
    an endpoint key the backend does not use still stops them, naming the field."""
    with pytest.raises(ConfigError, match=r"models\.m\.options\.n_ctx: .*valid integer"):
        key("llamacpp", {"n_ctx": "big"})
    with pytest.raises(ConfigError, match=r"models\.m\.options\.n_gpu: unknown option"):
        key("llamacpp", {"n_gpu": 10})
    with pytest.raises(ConfigError, match=r"^models\.m\.base_url: not used by the llamacpp "):
        key("llamacpp", base_url="http://a/v1")
