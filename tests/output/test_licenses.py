"""The output terms of OpenAI, Anthropic, Google and Meta models, found from a licence id or
from the model id alone (the reference pool's API models included)."""

from __future__ import annotations

import pytest

from prefsynth.output.licenses import TERMS, licence_for_model, licence_mismatch, output_terms


@pytest.mark.parametrize(("model", "licence"), [
    # the Tulu 3 pool's API models
    ("gpt-4-turbo-2024-04-09", "openai"),
    ("gpt-4o-2024-08-06", "openai"),
    ("claude-3-5-sonnet-20241022", "anthropic"),
    # provider prefixes and cloud decorations
    ("openai/gpt-4o-mini", "openai"),
    ("o3-mini", "openai"),
    ("anthropic.claude-3-5-sonnet-20240620-v1:0", "anthropic"),
    ("claude-sonnet-4-5@20250929", "anthropic"),
    ("gemini-1.5-pro-002", "gemini"),
    ("google/gemma-2-27b-it", "gemma"),
    ("meta-llama/Llama-2-70b-chat-hf", "llama2"),
    ("meta-llama/Meta-Llama-3-70B-Instruct", "llama3"),
    ("meta-llama/Llama-3.1-70B-Instruct", "llama3.1"),
    ("allenai/Llama-3.1-Tulu-3-70B-SFT", "llama3.1"),
    ("llama3.1:8b", "llama3.1"),
    ("meta-llama/Llama-3.2-3B-Instruct", "llama3.2"),
    ("llama-3.3-70b-versatile", "llama3.3"),
    ("meta-llama/Llama-4-Scout-17B-16E-Instruct", "llama4"),
    # OpenAI's open-weight models carry no output terms
    ("openai/gpt-oss-120b", "apache-2.0"),
    # unknown to prefsynth: no guess
    ("Qwen/Qwen2.5-72B-Instruct", None),
    ("mistralai/Mistral-Nemo-Instruct-2407", None),
    ("openai-community/gpt2", None),
])
def test_licence_for_model(model: str, licence: str | None) -> None:
    assert licence_for_model(model) == licence


def test_every_provider_of_the_reference_card_has_its_output_caveat() -> None:
    providers = {t.provider for t in TERMS.values()}
    assert providers == {"OpenAI", "Anthropic", "Google", "Meta"}
    for t in TERMS.values():
        assert t.caveat and t.url.startswith("https://") and t.restricts_training
    assert "compete with OpenAI" in TERMS["openai"].caveat
    assert "competing" in TERMS["anthropic"].caveat
    assert "'Llama'" in TERMS["llama3.1"].caveat


def test_output_terms_from_the_licence_else_the_model_id() -> None:
    claude = output_terms("claude-3-5-sonnet-20241022")  # license left at "unknown"
    assert claude is not None and claude.provider == "Anthropic"
    assert output_terms("my-finetune", "llama3.1") is TERMS["llama3.1"]
    assert output_terms("gpt-4o", "OpenAI") is TERMS["openai"]
    assert output_terms("Qwen/Qwen2.5-7B-Instruct", "qwen") is None
    assert output_terms("openai/gpt-oss-20b") is None


def test_a_licence_contradicting_the_model_is_flagged() -> None:
    warning = licence_mismatch("claude-3-5-sonnet-20241022", "apache-2.0")
    assert warning == ("claude-3-5-sonnet-20241022 is an Anthropic model (Anthropic Commercial "
                       "Terms of Service), but its license is set to 'apache-2.0'")
    assert "is a Google model" in (licence_mismatch("gemma-2-9b-it", "mit") or "")
    assert licence_mismatch("claude-3-5-sonnet-20241022", "anthropic") is None
    assert licence_mismatch("claude-3-5-sonnet-20241022", "unknown") is None
    assert licence_mismatch("meta-llama/Llama-3.1-8B-Instruct", "llama3") is None  # same provider
    assert licence_mismatch("Qwen/Qwen2.5-7B-Instruct", "mit") is None
