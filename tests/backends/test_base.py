"""What backends declare: an options model each (unknown options rejected, answer-changing
ones marked) and the endpoint keys each reads; ``validate`` checks a spec against both,
naming the dotted field, before any work (``run``, ``status``, ``estimate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from prefsynth.backends import BUILTIN, backend_class, create_backend, validate
from prefsynth.backends.base import BackendOptions, BaseBackend
from prefsynth.cli import main
from prefsynth.config import ModelSpec, parse_config
from prefsynth.errors import ConfigError
from tests.conftest import fake_config, write_config

BACKENDS = [*sorted(BUILTIN), "fake"]


def spec(backend: str, options: dict[str, Any] | None = None, **over: Any) -> ModelSpec:
    return ModelSpec(name="m", backend=backend, model="x", options=options or {}, **over)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_declares_its_options_and_endpoints(backend: str) -> None:
    cls = backend_class(backend)
    assert issubclass(cls, BaseBackend)
    assert issubclass(cls.Options, BackendOptions) and cls.Options is not BackendOptions
    assert cls.endpoint_fields <= set(ModelSpec.ENDPOINT_FIELDS)
    assert cls.Options.key_fields() <= set(cls.Options.model_fields)
    assert validate(spec(backend)) == cls.Options()


def test_which_options_are_keyed() -> None:
    assert {"n_ctx", "max_string_length", "chat_format"} <= backend_class(
        "llamacpp").Options.key_fields()
    assert "n_threads" not in backend_class("llamacpp").Options.key_fields()
    assert {"max_model_len", "quantization", "dtype", "engine_args"} <= backend_class(
        "vllm").Options.key_fields()
    assert "tensor_parallel_size" not in backend_class("vllm").Options.key_fields()
    assert backend_class("openai").Options.key_fields() == frozenset()  # keys shared with
    assert backend_class("openai-batch").Options.key_fields() == frozenset()  # each other


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_rejects_unknown_options(backend: str) -> None:
    """openai used to ignore them, llamacpp to pass them into ``Llama(**opts)``."""
    with pytest.raises(ConfigError, match=rf"^models\.m\.options\.colour: unknown option for "
                                          rf"the {backend} backend \(known: "):
        validate(spec(backend, {"colour": "blue"}))


def test_unknown_options_fail_before_the_backend_loads_anything() -> None:
    with pytest.raises(ConfigError, match=r"options\.n_gpu: unknown option"):
        create_backend(ModelSpec(name="m", backend="llamacpp", model="/nope.gguf",
                                 options={"n_gpu": 1}))  # not "model file not found"
    with pytest.raises(ConfigError, match=r"options\.max_response_bytes: .*\(got 'big'\)"):
        create_backend(spec("openai", {"max_response_bytes": "big"}))


@pytest.mark.parametrize(("backend", "field", "value"), [
    ("llamacpp", "base_url", "http://a/v1"),
    ("llamacpp", "max_concurrency", 4),
    ("llamacpp", "timeout", 5.0),
    ("vllm", "api_key_env", "KEY"),
    ("vllm", "max_retries", 2),
    ("openai-batch", "requests_per_minute", 60.0),
    ("openai-batch", "max_concurrency", 4),
])  # fmt: skip
def test_unused_endpoint_keys_are_rejected(backend: str, field: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^models\.m\.{field}: not used by the {backend} "):
        validate(spec(backend, **{field: value}))


def test_used_endpoint_keys_and_defaults_pass() -> None:
    everything = dict(base_url="http://a/v1", api_key_env="K", max_concurrency=2,
                      requests_per_minute=1.0, tokens_per_minute=1.0, timeout=1.0,
                      max_retries=1)  # fmt: skip
    validate(spec("openai", **everything))
    validate(spec("openai-batch", base_url="http://a/v1", api_key_env="K", timeout=9.0,
                  max_retries=2))
    validate(spec("llamacpp"))  # defaults are not "set"


def test_config_errors_name_the_field_by_its_place_in_the_file(tmp_path: Path) -> None:
    raw = fake_config(tmp_path)
    raw["models"][2] = {"name": "c", "backend": "llamacpp", "model": "embedded:smollm2",
                        "base_url": "http://127.0.0.1:8000/v1"}
    with pytest.raises(ConfigError, match=r"^cfg\.yaml: models\.2\.base_url: not used by the "
                                          r"llamacpp backend$"):
        parse_config(raw, "cfg.yaml")
    raw = fake_config(tmp_path)
    raw["judge"] = {"name": "j", "backend": "openai-batch", "model": "gpt",
                    "requests_per_minute": 10}
    with pytest.raises(ConfigError, match=r"^config: judge\.requests_per_minute: not used"):
        parse_config(raw)
    raw = fake_config(tmp_path)
    raw["panel"] = [{"name": "p", "backend": "llamacpp", "model": "x", "options": {"ctx": 1}}]
    with pytest.raises(ConfigError, match=r"^config: panel\.0\.options\.ctx: unknown option"):
        parse_config(raw)
    raw = fake_config(tmp_path)
    raw["models"][1]["backend"] = "carrier-pigeon"
    with pytest.raises(ConfigError, match=r"^config: models\.1\.backend: unknown backend"):
        parse_config(raw)


@pytest.mark.parametrize("command", ["run", "status", "estimate"])
def test_commands_stop_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       command: str) -> None:
    raw = fake_config(tmp_path)
    raw["judge"]["options"] = {"ratings": "tie"}  # a typo of `rating`
    path = write_config(tmp_path, raw)
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "judge.options.ratings: unknown option for the fake backend" in err[0]
    assert not (tmp_path / "out").exists()  # no store, no output
