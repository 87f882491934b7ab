from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefsynth.config import PromptSource
from prefsynth.errors import InputError
from prefsynth.records import stable_hash
from prefsynth.stages.prompts import load_prompts
from tests.conftest import EXAMPLE_PROMPTS


def _jsonl(tmp_path: Path, rows: list, name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_example_prompts_load() -> None:
    prompts, stats = load_prompts(PromptSource(path=str(EXAMPLE_PROMPTS)))
    assert stats.kept == len(prompts) >= 40 and stats.duplicates == 0
    constrained = [p for p in prompts if p.instruction_ids]
    assert len(constrained) >= len(prompts) / 3
    assert all(len(p.instruction_ids) == len(p.constraint_kwargs) for p in constrained)
    assert any(p.reference for p in prompts)


def test_ids_dedup_and_source(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [
        {"prompt": "What is 2+2?", "source": "math"},
        {"prompt": "What is 2+2?", "source": "other"},  # exact duplicate content
        {"prompt": "Name a colour.", "id": "given-id"},
    ])
    prompts, stats = load_prompts(PromptSource(path=str(path), source_name="default-src"))
    assert stats.read == 3 and stats.duplicates == 1 and stats.kept == 2
    assert prompts[0].id == stable_hash([{"role": "user", "content": "What is 2+2?"}])
    assert prompts[0].source == "math"
    assert prompts[1].id == "given-id" and prompts[1].source == "default-src"
    again, _ = load_prompts(PromptSource(path=str(path)))
    assert again[0].id == prompts[0].id  # stable across runs


def test_multi_turn_messages_keep_turns_and_drop_final_answer(tmp_path: Path) -> None:
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a fruit."},
            {"role": "assistant", "content": "Apple."}]
    path = _jsonl(tmp_path, [{"messages": conv}])
    (p,), _ = load_prompts(PromptSource(path=str(path), messages_field="messages"))
    assert [m["role"] for m in p.messages] == ["system", "user", "assistant", "user"]
    assert p.text == "Name a fruit."


def test_parquet_and_folder(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": "a?"}, {"prompt": "b?"}]), folder / "x.parquet")
    _jsonl(folder, [{"prompt": "c?"}], "y.jsonl")
    prompts, _ = load_prompts(PromptSource(path=str(folder)))
    assert [p.text for p in prompts] == ["a?", "b?", "c?"]
    limited, _ = load_prompts(PromptSource(path=str(folder)), limit=2)
    assert len(limited) == 2


def test_datasets_loader_reads_a_local_dataset(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"instruction": "Say hi."}, {"instruction": "Say bye."}])
    src = PromptSource(dataset="json", split="train", text_field="instruction")
    # datasets' packaged "json" builder with data_files: anything load_dataset reads works
    import datasets

    ds = datasets.load_dataset("json", data_files=str(path), split="train")
    assert len(ds) == 2
    src = PromptSource(dataset=str(tmp_path), split="train", text_field="instruction")
    prompts, _ = load_prompts(src)
    assert sorted(p.text for p in prompts) == ["Say bye.", "Say hi."]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"prompt": "ok"}\n{"prompt": "broken"\n', r"p.jsonl:2: malformed JSON"),
        (b'{"prompt": "ok"}\n{"text": "wrong field"}\n', r"p.jsonl:2: missing field 'prompt'"),
        (b'{"prompt": "   "}\n', r"p.jsonl:1: field 'prompt' is empty"),
        (b'{"prompt": 42}\n', r"p.jsonl:1: field 'prompt' must be a string, got int"),
        (b'{"prompt": "caf\xe9"}\n', r"p.jsonl:1: invalid UTF-8"),
        (b"[1, 2]\n", r"p.jsonl:1: expected a JSON object, got list"),
        (b"\n\n", r"no prompts found"),
        (b'{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', r"p.jsonl:2: id 'x' already used"),
        (b'{"prompt": "a", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}\n',
         r"p.jsonl:1: instruction_id_list and kwargs must be lists of the same length"),
    ],
)
def test_bad_input_one_line_with_file_and_line(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as e:
        load_prompts(PromptSource(path=str(path)))
    assert "\n" not in str(e.value)


def test_missing_file_and_bad_messages(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="prompt file not found"):
        load_prompts(PromptSource(path=str(tmp_path / "nope.jsonl")))
    path = _jsonl(tmp_path, [{"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(InputError, match=r"p.jsonl:1: messages\[0\] must be"):
        load_prompts(PromptSource(path=str(path), messages_field="messages"))
    path = _jsonl(tmp_path, [{"messages": [{"role": "user", "content": ""}]}])
    with pytest.raises(InputError, match="must end with a non-empty user turn"):
        load_prompts(PromptSource(path=str(path), messages_field="messages"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(InputError, match="not a readable Parquet file"):
        load_prompts(PromptSource(path=str(bad)))
