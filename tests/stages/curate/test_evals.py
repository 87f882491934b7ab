"""Eval sets: JSONL, Parquet, a local datasets folder; bad ones are one line naming the file,
the row and the dotted config field."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prefsynth.config import EvalSource
from prefsynth.errors import InputError
from prefsynth.stages.curate.evals import load_eval_set, load_eval_sets
from tests.conftest import ROOT

MINI = ROOT / "tests" / "data" / "evals" / "mini_eval.jsonl"


def test_jsonl_fixture_with_ids() -> None:
    (s,) = load_eval_sets([EvalSource(path=str(MINI), field="question", id_field="id")],
                          Path.cwd())
    assert s.name == "mini_eval" and len(s.ids) == 11 and s.ids[0] == "gsm8k-test-0"
    assert s.texts[1] == ["A robe takes 2 bolts of blue fiber and half that much white fiber. "
                          "How many bolts in total does it take?"]


def test_parquet_messages_and_default_ids(tmp_path: Path) -> None:
    path = tmp_path / "mt.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"conv": [{"role": "system", "content": "s"}, {"role": "user", "content": "one"},
                  {"role": "assistant", "content": "a"}, {"role": "user", "content": "two"}]},
        {"conv": [{"role": "user", "content": "three"}]}]), path)
    s = load_eval_set(EvalSource(path=str(path), field="conv", name="mt"), tmp_path, "w")
    assert s.ids == ["mt:0", "mt:1"] and s.texts == [["one", "two"], ["three"]]


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    (tmp_path / "e.jsonl").write_text('{"q": "a question"}\n')
    s = load_eval_set(EvalSource(path="e.jsonl", field="q"), tmp_path, "w")
    assert s.texts == [["a question"]]


BAD = [
    ("missing field", b'{"q": "a"}\n{"question": "b"}\n', "e.jsonl:2: missing field 'q' "
     "(curate.decontaminate.evals.0.field)"),
    ("not text", b'{"q": 3}\n', "e.jsonl:1: field 'q' must be a string or a list of "
     "{role, content} messages (curate.decontaminate.evals.0.field)"),
    ("empty set", b"", "no eval instances with text (curate.decontaminate.evals.0)"),
    ("only blank", b'{"q": "  "}\n', "no eval instances with text"),
    ("malformed", b'{"q": "a"}\n{oops\n', "e.jsonl:2: malformed JSON"),
    ("not an object", b'["a"]\n', "e.jsonl:1: expected an object, got list"),
]


@pytest.mark.parametrize(("what", "content", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_eval_file(tmp_path: Path, what: str, content: bytes, message: str) -> None:
    (tmp_path / "e.jsonl").write_bytes(content)
    with pytest.raises(InputError) as e:
        load_eval_sets([EvalSource(path="e.jsonl", field="q")], tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"nope.jsonl: eval file not found "
                                         r"\(curate.decontaminate.evals.0.path\)"):
        load_eval_sets([EvalSource(path="nope.jsonl", field="q")], tmp_path)


def test_a_local_datasets_folder(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "suite"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([{"prompt": "what is two plus two", "key": 7}]),
                   folder / "test.parquet")
    s = load_eval_set(EvalSource(dataset=str(folder), field="prompt", id_field="key",
                                 name="suite"), tmp_path, "w")
    assert s.ids == ["7"] and s.texts == [["what is two plus two"]]
