"""``prefsynth estimate``: exact request counts, honest token counts, exact cost arithmetic."""

from __future__ import annotations

import asyncio
import importlib.machinery
import math
import re
import sys
import time
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import prefsynth.tools.token_count as tc
from prefsynth.config import ASPECTS, Config, JudgeSpec, ModelSpec, PromptSource, parse_config
from prefsynth.stages.assign import assign
from prefsynth.stages.judge.rubrics import render_judge_messages
from prefsynth.stages.prompts import load_prompts
from prefsynth.tools.estimate import cost, cost_of, estimate, format_estimate
from prefsynth.tools.token_count import APPROX, CharCounter, count_tokens, offline_tiktoken
from tests.conftest import ROOT, fake_config

EXAMPLES = ROOT / "examples"


@pytest.fixture(autouse=True)
def fresh_counters(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tc, "_COUNTERS", {})


def llamacpp_config(tmp_path: Path, **over: Any) -> Config:
    smol = {"backend": "llamacpp", "model": "embedded:smollm2", "license": "apache-2.0",
            "params": {"max_tokens": 100}}
    cfg = fake_config(tmp_path, models=[{"name": "s1", **smol}, {"name": "s2", **smol},
                                        {"name": "s3", **smol, "system_prompt": "Be brief."}],
                      responses_per_prompt=2,
                      judge={"name": "j", **smol, "mode": "structured",
                             "params": {"max_tokens": 300}}, **over)
    return parse_config(cfg)


def test_request_counts_are_exact(tmp_path: Path) -> None:
    cfg = parse_config(fake_config(tmp_path, judge={"name": "judge", "backend": "fake",
                                                    "model": "fj", "permutations": 2}))
    est = estimate(cfg, limit=30)
    prompts, _ = load_prompts(cfg.prompts, 30)
    assignment = assign(prompts, [m.name for m in cfg.models], 4, cfg.seed)
    want = Counter(m for ms in assignment.values() for m in ms)
    gen = {s.model: s.requests for s in est.stages if s.stage == "generate"}
    assert gen == dict(want) and sum(gen.values()) == 30 * 4
    judge = est.stages[-1]
    assert (judge.stage, judge.requests) == ("judge", 30 * len(ASPECTS) * 2)
    assert est.requests == 30 * 4 + 30 * 4 * 2
    assert est.prompts == est.counted_prompts == 30


def test_panel_judges_each_judge_every_comparison(tmp_path: Path) -> None:
    panel = [{"name": "judge2", "backend": "fake", "model": "fj2"}]
    est = estimate(parse_config(fake_config(tmp_path, panel=panel)), limit=6)
    judges = [s for s in est.stages if s.stage == "judge"]
    assert [s.model for s in judges] == ["judge", "judge2"]
    assert [s.requests for s in judges] == [6 * 4, 6 * 4] and est.judges == 2
    assert "for each of 2 judges" in format_estimate(est)


def test_on_policy_requests(tmp_path: Path) -> None:
    cfg = parse_config(fake_config(tmp_path, on_policy="a", responses_per_prompt=2))
    est = estimate(cfg)
    gen = {s.model: s.requests for s in est.stages if s.stage == "generate"}
    n = est.prompts
    assert gen["a"] == n and sum(gen.values()) == 2 * n and est.responses_per_prompt == 2
    assert est.stages[-1].requests == n * 4


def test_chars4_tokens_are_exact_for_generation_and_judge(tmp_path: Path) -> None:
    cfg = parse_config(fake_config(tmp_path))
    est = estimate(cfg, limit=10, output_fraction=0.25)
    prompts, _ = load_prompts(cfg.prompts, 10)
    assignment = assign(prompts, [m.name for m in cfg.models], 4, cfg.seed)
    chars4 = CharCounter()
    for s in est.stages[:-1]:
        want = sum(chars4.count(p.messages) for p in prompts if s.model in assignment[p.id])
        assert s.input_tokens == want and s.tokens_by == APPROX
        assert s.output_tokens == s.requests * 512  # 0.25 × 2048
        assert s.max_output_tokens == s.requests * 2048
    each = 512  # every pool model's expected answer
    judge_in = sum(chars4.count(render_judge_messages(a, p.text, [""] * 4, p.reference)) + 4 * each
                   for p in prompts for a in ASPECTS)
    assert est.stages[-1].input_tokens == judge_in
    assert est.stages[-1].output_tokens == est.stages[-1].requests * 256  # 0.25 × 1024


def test_expected_output_tokens_override(tmp_path: Path) -> None:
    est = estimate(parse_config(fake_config(tmp_path)), limit=5,
                   expected_output_tokens={"a": 10})
    a = next(s for s in est.stages if s.model == "a")
    assert a.output_tokens == a.requests * 10


def test_sampled_token_counts_scale_and_requests_stay_exact(tmp_path: Path) -> None:
    cfg = parse_config(fake_config(tmp_path))
    full, sampled = estimate(cfg), estimate(cfg, sample=20)
    assert sampled.counted_prompts == 20 and full.counted_prompts == full.prompts == 57
    assert [s.requests for s in sampled.stages] == [s.requests for s in full.stages]
    for a, b in zip(full.stages, sampled.stages, strict=True):
        assert 0.5 < b.input_tokens / a.input_tokens < 2
    assert "seeded sample of 20 of 57" in format_estimate(sampled)


@pytest.mark.slow
def test_llamacpp_counts_with_the_gguf_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    cfg = llamacpp_config(tmp_path)
    est = estimate(cfg, limit=12)
    assert {s.tokens_by for s in est.stages} == {"gguf tokenizer"}
    assert all(s.input_tokens > 0 for s in est.stages)
    msg = [{"role": "user", "content": "Explain in two sentences why the sky is blue during "
                                       "the day and red at sunset."}]
    n, how = count_tokens(msg, cfg.models[0])
    approx = math.ceil(len(msg[0]["content"]) / 4)
    assert how == "gguf tokenizer"
    # the chat template adds SmolLM2's default system prompt and role markers
    assert approx < n < approx + 60
    # the same count llama.cpp reports when it answers the request
    from prefsynth.backends import create_backend
    from prefsynth.records import ChatRequest

    backend = create_backend(cfg.models[0])
    try:
        res = asyncio.run(backend.complete([ChatRequest("k", "m", msg, {"max_tokens": 1})]))
    finally:
        asyncio.run(backend.aclose())
    assert res[0].usage.prompt_tokens == n


def test_hf_tokenizer_from_a_local_folder(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "user": 2, "assistant": 3, "hello": 4, "world": 5}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} "
                          "{% endfor %}{% if add_generation_prompt %}<s> assistant{% endif %}")
    fast.save_pretrained(tmp_path / "tok")
    spec = ModelSpec(name="x", backend="vllm", model=str(tmp_path / "tok"))
    assert count_tokens([{"role": "user", "content": "hello world"}], spec) == (6, "hf tokenizer")


def fake_tiktoken(monkeypatch: pytest.MonkeyPatch, cached: bool) -> None:
    """A tiktoken whose encodings live behind ``tiktoken.load.read_file``, like the real one."""
    load = types.ModuleType("tiktoken.load")
    load.read_file = lambda path: b"ranks"  # type: ignore[attr-defined]
    mod = types.ModuleType("tiktoken")
    mod.__spec__ = importlib.machinery.ModuleSpec("tiktoken", None)
    mod.load = load  # type: ignore[attr-defined]

    class Encoding:
        name = "o200k_base"

        def encode_ordinary(self, text: str) -> list[int]:
            return [0] * len(text.split())

    def encoding_for_model(model: str) -> Encoding:
        if not model.startswith("gpt-4o"):
            raise KeyError(model)
        if not cached:  # what the real tiktoken does for a file not in its cache
            load.read_file("https://openaipublic.blob.core.windows.net/encodings/o200k_base")
        return Encoding()

    mod.encoding_for_model = encoding_for_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tiktoken", mod)
    monkeypatch.setitem(sys.modules, "tiktoken.load", load)


def test_tiktoken_only_from_its_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = ModelSpec(name="j", backend="openai-batch", model="gpt-4o-2024-08-06")
    msgs = [{"role": "system", "content": "be fair"}, {"role": "user", "content": "rate a b c"}]
    fake_tiktoken(monkeypatch, cached=False)
    real_read = sys.modules["tiktoken.load"].read_file
    assert offline_tiktoken("gpt-4o-2024-08-06") is None  # the download was refused
    assert sys.modules["tiktoken.load"].read_file is real_read  # and the hook put back
    n, how = count_tokens(msgs, spec)
    assert how == APPROX and n == math.ceil(len("be fairrate a b c") / 4)
    assert "no tiktoken encoding cached" in tc._COUNTERS[("openai-batch", spec.model)].why

    monkeypatch.setattr(tc, "_COUNTERS", {})
    fake_tiktoken(monkeypatch, cached=True)
    # OpenAI's recipe: 3 per message + role + content, 3 to prime the reply
    assert count_tokens(msgs, spec) == (3 + (3 + 1 + 2) + (3 + 1 + 4), "tiktoken o200k_base")
    assert offline_tiktoken("Qwen/Qwen2.5-72B-Instruct") is None


def test_a_claude_model_is_approximate_because_it_has_no_offline_tokenizer(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Not "tiktoken not installed": installing it would not help."""
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # not installed
    monkeypatch.setattr(tc, "_COUNTERS", {})
    for backend, model in (("anthropic-batch", "claude-3-5-sonnet-20241022"),
                           ("openai", "anthropic.claude-3-5-sonnet-20240620-v1:0")):
        counter = tc.token_counter(ModelSpec(name="c", backend=backend, model=model))
        assert isinstance(counter, CharCounter) and counter.why == tc.NO_CLAUDE_TOKENIZER
    gpt = tc.token_counter(ModelSpec(name="g", backend="openai", model="gpt-4o"))
    assert isinstance(gpt, CharCounter) and gpt.why == "tiktoken not installed"
    cfg = fake_config(tmp_path, judge={"name": "judge", "backend": "anthropic-batch",
                                       "model": "claude-3-5-haiku-20241022"})
    text = format_estimate(estimate(parse_config(cfg), limit=2))
    assert (f"{APPROX} for judge: Claude has no offline tokenizer (Anthropic counts tokens "
            "only in its API)") in text


def test_real_tiktoken_never_downloads(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    tiktoken = pytest.importorskip("tiktoken")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    real = tiktoken.load.read_file
    t0 = time.monotonic()
    assert offline_tiktoken("gpt-4o-2024-08-06") is None
    assert time.monotonic() - t0 < 5 and tiktoken.load.read_file is real


def priced_config(tmp_path: Path) -> Config:
    cfg = fake_config(tmp_path, judge={"name": "judge", "backend": "openai-batch",
                                       "model": "gpt-4o-2024-08-06"})
    cfg["prices"] = {"gpt-4o-2024-08-06": {"input_per_mtok": 2.5, "output_per_mtok": 10.0,
                                           "batch_discount": 0.25},
                     "a": {"input_per_mtok": 1.0, "output_per_mtok": 4.0}}
    return parse_config(cfg)


def test_cost_arithmetic(tmp_path: Path) -> None:
    cfg = priced_config(tmp_path)
    # a: 2M in × $1 + 0.5M out × $4, no batch
    assert cost_of("a", 2_000_000, 500_000, cfg) == 4.0
    # the judge, by name or model id: (1M × $2.5 + 0.1M × $10) × (1 - 0.25)
    assert cost_of("judge", 1_000_000, 100_000, cfg) == pytest.approx(2.625, abs=1e-12)
    assert cost_of("gpt-4o-2024-08-06", 1_000_000, 100_000, cfg) == pytest.approx(2.625)
    assert cost_of("b", 1_000_000, 1_000_000, cfg) is None
    assert cost_of("not-in-config", 1, 1, cfg) is None
    est = estimate(cfg, limit=8)
    judge = est.stages[-1]
    price = cfg.prices["gpt-4o-2024-08-06"]
    assert judge.batch_discount == 0.25
    assert judge.cost == cost(price, judge.input_tokens, judge.output_tokens, batch=True)
    assert judge.max_cost == cost(price, judge.input_tokens, judge.max_output_tokens, True)
    a = next(s for s in est.stages if s.model == "a")
    assert a.batch_discount == 0 and a.cost == (a.input_tokens + 4 * a.output_tokens) / 1e6
    assert est.cost == pytest.approx(judge.cost + a.cost)
    assert set(est.unpriced) == {"b", "c", "d"}
    text = format_estimate(est)
    assert "(batch)" in text and "Batch API discount applied: judge (-25%)" in text
    assert "+ 3 unpriced" in text and "no price in `prices:` for b, c, d" in text


def test_no_price_is_unknown_not_zero(tmp_path: Path) -> None:
    est = estimate(parse_config(fake_config(tmp_path)), limit=4)
    assert est.cost is None and all(s.cost is None for s in est.stages)
    text = format_estimate(est)
    total = next(line for line in text.splitlines() if line.startswith("total"))
    assert total.endswith("no price") and "$" not in text


def test_report_states_its_assumptions(tmp_path: Path) -> None:
    text = format_estimate(estimate(parse_config(fake_config(tmp_path)), limit=4))
    assert re.search(r"^judge\s+judge\s+fake\s+16\s", text, re.M)
    for phrase in ("≈ chars/4", "0.5 × max_tokens", "re-asks", "not generated yet",
                   "assuming every generation succeeds"):
        assert phrase in text


def test_example_configs_estimate(tmp_path: Path) -> None:
    from prefsynth.config import load_config

    text = format_estimate(estimate(load_config(EXAMPLES / "openai-server.yaml"), limit=3))
    assert "$0" in text  # an all-zero price is free, not unknown
    tulu = load_config(EXAMPLES / "tulu3-on-policy.yaml",
                       {"prompts.path": str(EXAMPLES / "prompts.jsonl"),
                        "prompts.messages_field": None})
    est = estimate(tulu, limit=10)
    assert next(s for s in est.stages if s.model == "tulu-3-sft-70b").requests == 10
    assert est.stages[-1].batch_discount == 0.5 and est.stages[-1].cost is not None


def test_tulu3_example_documents_every_config_key() -> None:
    """Every field of the config schema appears in the reference example (set or commented)."""
    text = (EXAMPLES / "tulu3-on-policy.yaml").read_text(encoding="utf-8")
    keys = text.replace("{", "\n").replace(",", "\n")
    for model in (Config, PromptSource, ModelSpec, JudgeSpec):
        for name in model.model_fields:
            assert re.search(rf"^[\s#-]*{name}:", keys, re.M), f"{model.__name__}.{name}"
    for section in ("params", "pairs", "prices"):
        assert f"{section}:" in text
    for name in ("temperature", "top_p", "max_tokens", "stop", "rejected", "aggregate",
                 "min_margin", "weights", "constraints", "input_per_mtok", "output_per_mtok",
                 "batch_discount"):
        assert re.search(rf"^[\s#-]*{name}:", keys, re.M), name
