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


DEEP = b"[" * 200_000 + b"]" * 200_000
NO_COMMA = b'"instruction_id_list": ["punctuation:no_comma"]'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (DEEP + b"\n", r"p.jsonl:1: JSON nested too deeply"),
        (b'{"prompt": "a", "x": ' + DEEP + b"}\n", r"p.jsonl:1: JSON nested too deeply"),
        (b'{"prompt": "a\\ud800"}\n', r"p.jsonl:1: field 'prompt' holds a lone surrogate"),
        (b'{"prompt": "a", "id": "\\udfff"}\n', r"p.jsonl:1: field 'id' holds a lone surrogate"),
        (b'{"prompt": "a", "source": "\\ud800"}\n', r"field 'source' holds a lone surrogate"),
        (b'{"prompt": "a", "id": ' + b"9" * 5000 + b"}\n", r"p.jsonl:1: unreadable JSON value"),
        (b'{"prompt": "a", "id": {"x": 1}}\n', r"field 'id' must be a string or an integer, got dict"),
        (b'{"prompt": "a", "id": 1.5}\n', r"field 'id' must be a string or an integer, got float"),
        (b'{"prompt": "a", "source": ["x"]}\n', r"field 'source' must be a string or a number"),
        (b'\x00\x01\x02\n', r"p.jsonl:1: binary data \(a NUL byte\)"),
        (b'{"prompt": "ok"}\n\x00\x00', r"p.jsonl:2: binary data"),
        (b'{"prompt": "a", ' + NO_COMMA + b', "kwargs": ["notadict"]}\n',
         r"p.jsonl:1: instruction_id_list\[0\]: constraint 'punctuation:no_comma': kwargs must "
         r"be a dict, got 'notadict'"),
        (b'{"prompt": "a", "instruction_id_list": "punctuation:no_comma"}\n',
         r"p.jsonl:1: field 'instruction_id_list' must be a list of instruction ids, got str"),
        (b'{"prompt": "a", "instruction_id_list": ["nope:nope"]}\n',
         r"p.jsonl:1: instruction_id_list\[0\]: unknown constraint instruction id: 'nope:nope'"),
        (b'{"prompt": "a", "instruction_id_list": [7]}\n', r"unknown constraint instruction id: 7"),
        (b'{"prompt": "a", "instruction_id_list": ["length_constraints:number_words"], '
         b'"kwargs": [{"num_words": "many", "relation": "at least"}]}\n',
         r"p.jsonl:1: instruction_id_list\[0\]: .*kwarg 'num_words' must be an integer"),
        (b'{"prompt": "a", "instruction_id_list": ["keywords:existence"], '
         b'"kwargs": [{"keywords": [["deep"]]}]}\n',
         r"p.jsonl:1: kwargs\[0\].keywords: must be a string, number, boolean or a flat list"),
        (b'{"prompt": "a", "instruction_id_list": ["keywords:existence"], '
         b'"kwargs": [{"keywords": ["\\ud800"]}]}\n',
         r"field 'kwargs\[0\].keywords' holds a lone surrogate"),
    ],
)
def test_hostile_input_is_one_line_with_file_and_line(tmp_path: Path, content: bytes,
                                                      message: str) -> None:
    """Each of these raised a traceback (RecursionError, TypeError from orjson, ValueError,
    AttributeError) or, for an unknown IFEval id, passed loading and failed after judging."""
    path = tmp_path / "p.jsonl"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as e:
        load_prompts(PromptSource(path=str(path)))
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (DEEP, r"p.json: JSON nested too deeply"),
        (b'[{"prompt": "a", "id": ' + b"9" * 5000 + b"}]", r"p.json: unreadable JSON value"),
        (b'{"prompt": "a"}\n{"prompt": "b"}\n', r"p.json:2: malformed JSON \(Extra data\) "
                                                r"\(one object per line\? name the file .jsonl\)"),
        (b"", r"p.json:1: malformed JSON"),
        (b'[{"prompt": "\\ud800"}]', r"p.json\[0\]: field 'prompt' holds a lone surrogate"),
    ],
)
def test_hostile_json_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "p.json"
    path.write_bytes(content)
    with pytest.raises(InputError, match=message) as e:
        load_prompts(PromptSource(path=str(path)))
    assert "\n" not in str(e.value)


def test_bom_and_crlf_are_read(tmp_path: Path) -> None:
    """A UTF-8 BOM (Windows editors, Excel exports) and CRLF line ends are ordinary text."""
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"prompt": "one"}\r\n{"prompt": "two"}\r\n')
    (tmp_path / "b.json").write_bytes(b'\xef\xbb\xbf[{"prompt": "three"}]')
    prompts, _ = load_prompts(PromptSource(path=str(tmp_path)))
    assert [p.text for p in prompts] == ["one", "two", "three"]


def test_a_line_too_long_stops_before_reading_it_all(tmp_path: Path, monkeypatch) -> None:
    import prefsynth.stages.prompts as mod

    monkeypatch.setattr(mod, "MAX_LINE_BYTES", 1024)
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n' + b"x" * 5000)  # a binary blob with no newline
    with pytest.raises(InputError, match=r"p.jsonl:2: line longer than 1,024 bytes"):
        load_prompts(PromptSource(path=str(path)))


def test_a_folder_named_like_a_prompt_file(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    (folder / "x.jsonl").mkdir(parents=True)
    _jsonl(folder, [{"prompt": "a"}], "a.jsonl")
    with pytest.raises(InputError, match=r"data/x.jsonl: is a folder, not a prompt file"):
        load_prompts(PromptSource(path=str(folder)))


def test_unreadable_file(tmp_path: Path) -> None:
    import os

    path = _jsonl(tmp_path, [{"prompt": "a"}])
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as root: permissions are not enforced")
    with pytest.raises(InputError, match=r"p.jsonl: cannot read \(Permission denied\)"):
        load_prompts(PromptSource(path=str(path)))


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "tool", "content": "x"}], r"messages\[0\] must be \{role, content\}"),
        ("hello", r"field 'messages' must be a non-empty list"),
        ([], r"field 'messages' must be a non-empty list"),
        (["hello"], r"messages\[0\] must be \{role, content\}"),
        ([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
         r"field 'messages\[0\].content' must be a string, got list"),
        ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
          {"role": "user", "content": "c"}], r"messages\[1\]: a system turn must come first"),
        ([{"role": "system", "content": "s"}], r"must end with a non-empty user turn"),
        ([{"role": "user", "content": "\ud800"}], r"messages\[0\].content' holds a lone surrogate"),
    ],
)
def test_bad_messages(tmp_path: Path, messages, message: str) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"messages": messages}) + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=rf"p.jsonl:1: .*{message}"):
        load_prompts(PromptSource(path=str(path), messages_field="messages"))


def test_constraints_are_cleaned_at_load(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{
        "prompt": "a", "id": 12,
        "instruction_id_list": ["punctuation:no_comma", "length_constraints:number_words"],
        "kwargs": [None, {"num_words": 50, "relation": "less than", "language": None}],
    }])
    (p,), _ = load_prompts(PromptSource(path=str(path)))
    assert p.id == "12"
    assert p.constraint_kwargs == [{}, {"num_words": 50, "relation": "less than"}]


def test_hash_set_is_a_set_of_64_bit_hashes() -> None:
    import random

    from prefsynth.stages.prompts import HashSet

    hs, ref = HashSet(4), set()
    rng = random.Random(3)
    values = [rng.getrandbits(64) for _ in range(5000)] + [0, 1, 2**64 - 1]
    for v in values + values[:100]:
        assert hs.add(v) == (max(v, 1) not in ref)  # zero is stored as one
        ref.add(max(v, 1))
    assert hs.size == len(ref) and all(v in hs for v in values) and 12345 not in hs
    assert len(hs._slots) * 8 <= 32 * len(ref)  # at most 3/4 full after growing: <= 32 B each


@pytest.mark.parametrize(("rows", "message"), [
    # a given id against a given id, a content-hash id and a content-shaped given id
    ([{"prompt": "a", "id": "x"}, {"prompt": "c"}, {"prompt": "b", "id": "x"}],
     "p.jsonl:3: id 'x' already used by {path}:1"),
    ([{"prompt": "a"}, {"prompt": "b", "id": stable_hash([{"role": "user", "content": "a"}])}],
     "p.jsonl:2: id '{h}' already used by {path}:1"),
    ([{"prompt": "b", "id": stable_hash([{"role": "user", "content": "a"}])}, {"prompt": "a"}],
     "p.jsonl:2: id '{h}' already used by {path}:1"),
])
def test_a_reused_id_names_the_line_that_had_it(tmp_path: Path, rows, message) -> None:
    path = _jsonl(tmp_path, rows)
    h = stable_hash([{"role": "user", "content": "a"}])
    with pytest.raises(InputError) as e:
        load_prompts(PromptSource(path=str(path)))
    assert message.format(path=path, h=h) in str(e.value)


def test_a_duplicate_row_does_not_claim_its_id(tmp_path: Path) -> None:
    """A duplicate is dropped before its id counts; a given id shaped like the content hash of
    a prompt that had its own id is no clash (the hashes meet, the ids do not)."""
    h = stable_hash([{"role": "user", "content": "q"}])
    rows = [{"prompt": "q", "id": "a"}, {"prompt": "q", "id": "b"}, {"prompt": "r", "id": "b"},
            {"prompt": "s", "id": h}]
    prompts, stats = load_prompts(PromptSource(path=str(_jsonl(tmp_path, rows))))
    assert [p.id for p in prompts] == ["a", "b", h] and stats.duplicates == 1
