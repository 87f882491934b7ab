"""The streamed writer on real files: it never writes over a user's folder, leaves nothing
stale behind, and an empty result still reads as zero rows with the full schema."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from prefsynth.cli import main
from prefsynth.config import parse_config
from prefsynth.core.pipeline import run
from prefsynth.errors import InputError
from prefsynth.output.facts import RunFacts
from prefsynth.output.mixture import merge_outputs
from prefsynth.output.writer import JUDGMENT_SCHEMA, PAIR_SCHEMA, annotation_schema
from prefsynth.testing import FakeBackend
from tests.conftest import fake_config, write_config


def test_refuses_a_users_folder_before_any_model_call(tmp_path: Path) -> None:
    """``--output`` once silently replaced a user's README.md."""
    cfg = fake_config(tmp_path)
    out = Path(cfg["output"])
    out.mkdir()
    (out / "README.md").write_text("my notes", encoding="utf-8")
    calls = sum(FakeBackend.calls.values())
    with pytest.raises(InputError, match="not a prefsynth output"):
        run(parse_config(cfg), limit=3)
    assert sum(FakeBackend.calls.values()) == calls
    assert [p.name for p in out.iterdir()] == ["README.md"]
    assert (out / "README.md").read_text(encoding="utf-8") == "my notes"
    run(parse_config(cfg), limit=3, force=True)
    assert (out / "run.json").is_file() and (out / ".prefsynth").is_dir()
    run(parse_config(cfg), limit=3)  # now a prefsynth output: no --force needed


def test_store_elsewhere_still_marks_the_output(tmp_path: Path) -> None:
    cfg = fake_config(tmp_path, store=str(tmp_path / "store.sqlite"))
    run(parse_config(cfg), limit=2)
    assert (Path(cfg["output"]) / ".prefsynth").is_dir()
    run(parse_config(cfg), limit=2)  # the rerun is not refused


def test_cli_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = fake_config(tmp_path)
    out = Path(cfg["output"])
    out.mkdir()
    (out / "notes.txt").write_text("x")
    path = str(write_config(tmp_path, cfg))
    assert main(["run", path, "--limit", "2"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert main(["run", path, "--limit", "2", "--force"]) == 0
    mix = tmp_path / "mixdir"
    mix.mkdir()
    (mix / "README.md").write_text("mine")
    assert main(["mix", str(out), "--output", str(mix)]) == 3
    assert "not a prefsynth output" in capsys.readouterr().err
    assert (mix / "README.md").read_text() == "mine"
    assert main(["mix", str(out), "--output", str(mix), "--force"]) == 0
    assert RunFacts.load(mix / "run.json").pairs > 0


def test_rewrite_removes_stale_files(tmp_path: Path) -> None:
    """A stray parquet in pairs/ was mixed in by ``prefsynth mix`` and uploaded by push."""
    cfg = fake_config(tmp_path)
    out = Path(cfg["output"])
    run(parse_config(cfg), limit=4)
    stale = [out / "pairs" / "old.parquet", out / "annotations" / "part-1.parquet",
             out / "judgments" / "x.parquet", out / "pairs" / "sub" / "y.parquet"]
    for f in stale:
        f.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "pairs" / "train.parquet", f)
    run(parse_config(cfg), limit=4)
    for d in ("pairs", "annotations", "judgments"):
        assert [p.name for p in (out / d).iterdir()] == ["train.parquet"]
    facts = RunFacts.load(out / "run.json")
    assert pq.read_table(out / "pairs").num_rows == facts.pairs
    # a mixture written over an output folder keeps no judgments/ and no stray parts
    mixed = tmp_path / "mixed"
    shutil.copytree(out, mixed)
    shutil.copy(out / "pairs" / "train.parquet", mixed / "pairs" / "stray.parquet")
    merge_outputs([out], mixed)
    assert [p.name for p in (mixed / "pairs").iterdir()] == ["train.parquet"]
    assert not (mixed / "judgments").exists()
    assert pq.read_table(mixed / "pairs").num_rows == facts.pairs


def test_interrupted_write_keeps_the_old_output(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Stale files go only once the new file is in place: a run interrupted after its shards
    were streamed (not yet renamed into place) changes nothing a reader sees."""
    from prefsynth.output.writer import OutputWriter

    cfg = fake_config(tmp_path, shard_size=2)
    out = Path(cfg["output"])
    run(parse_config(cfg), limit=3)
    before = {p: p.read_bytes() for p in out.rglob("*.parquet")}
    shutil.copy(out / "pairs" / "train.parquet", out / "pairs" / "old.parquet")

    def interrupted(self: OutputWriter, *args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(OutputWriter, "close", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(parse_config(cfg), limit=5)
    assert (out / "pairs" / "old.parquet").is_file()
    assert all(p.read_bytes() == data for p, data in before.items())


@pytest.fixture(scope="module")
def empty_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every response rated the same: no pair at all."""
    tmp = tmp_path_factory.mktemp("empty")
    cfg = fake_config(tmp)
    cfg["judge"]["options"] = {"rating": "tie"}
    run(parse_config(cfg), limit=3)
    return Path(cfg["output"])


def test_empty_result_reads_as_zero_rows_with_the_full_schema(empty_out: Path) -> None:
    assert RunFacts.load(empty_out / "run.json").pairs == 0
    table = pq.read_table(empty_out / "pairs" / "train.parquet")
    assert table.num_rows == 0 and table.schema.equals(PAIR_SCHEMA)
    assert pq.read_metadata(empty_out / "pairs" / "train.parquet").num_row_groups == 0
    assert (empty_out / "pairs.jsonl").read_bytes() == b""


def test_empty_result_loads_with_datasets(empty_out: Path, tmp_path: Path) -> None:
    """A 0-pair run wrote a row group of 0 rows, which ``load_dataset("parquet",
    data_dir=...)`` failed on (DatasetGenerationError: batch size 0). With no row group it
    streams as 0 rows with the full schema. ``datasets`` itself (5.x) cannot build a
    non-streamed split of 0 rows ("corresponds to no data", huggingface/datasets#8401):
    that upstream refusal is the only failure allowed."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features.from_arrow_schema(PAIR_SCHEMA)
    streamed = datasets.load_dataset("parquet", data_dir=str(empty_out / "pairs"),
                                     streaming=True, cache_dir=str(tmp_path))["train"]
    assert streamed.features == features and list(streamed) == []
    try:
        loaded = datasets.load_dataset("parquet", data_dir=str(empty_out / "pairs"),
                                       cache_dir=str(tmp_path))["train"]
    except ValueError as e:
        assert "corresponds to no data" in str(e)  # not DatasetGenerationError
        assert not isinstance(e, datasets.exceptions.DatasetGenerationError)
    else:
        assert loaded.num_rows == 0 and loaded.features == features


def test_other_tables_keep_their_schema(empty_out: Path) -> None:
    aspects = RunFacts.load(empty_out / "run.json").judge.aspects
    assert pq.read_schema(empty_out / "annotations" / "train.parquet").equals(
        annotation_schema(aspects))
    assert pq.read_schema(empty_out / "judgments" / "train.parquet").equals(JUDGMENT_SCHEMA)


def test_mixture_of_an_empty_part_is_readable(empty_out: Path, tmp_path: Path) -> None:
    facts = merge_outputs([empty_out], tmp_path / "mixed")
    assert facts.pairs == 0
    assert pq.read_metadata(tmp_path / "mixed" / "pairs" / "train.parquet").num_row_groups == 0
    assert pq.read_table(tmp_path / "mixed" / "pairs").num_rows == 0


def test_rows_table_matches_from_pylist() -> None:
    """The JSON path into Arrow gives the table ``from_pylist`` gives: unicode, exact floats,
    missing and extra keys, nested lists, and a row longer than the reader's default block."""
    import random

    import orjson
    import pyarrow as pa

    from prefsynth.output.writer import rows_table

    rnd = random.Random(3)
    schema = annotation_schema(["helpfulness"])
    rows = [{"prompt_id": f"p{i}", "prompt": "é😀\u2028\"\\", "score": rnd.random() * 10 ** i,
             "positions": [i, 0], "constraints_passed": [True, False], "unknown": 1,
             "messages": [{"role": "user", "content": "x" * (3 << 20 if i == 1 else 5)}],
             "helpfulness_raw_ratings": ["5", None]} for i in range(4)]
    rows.append({})
    lines = b"".join(orjson.dumps(r) + b"\n" for r in rows)
    assert rows_table(lines, schema).equals(pa.Table.from_pylist(rows, schema=schema))
    assert rows_table(b"", schema).schema == schema


def test_writing_output_never_imports_pandas(tmp_path: Path) -> None:
    """pandas costs 0.45 s of import in a run's tail; nothing on the write path needs it."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path\n"
            "from prefsynth.output.writer import PAIR_SCHEMA, write_table\n"
            "write_table([], Path(sys.argv[1]) / 'a', PAIR_SCHEMA)\n"
            "write_table([{'id': 'x', 'chosen': [{'role': 'user', 'content': 'c'}]}],"
            " Path(sys.argv[1]) / 'b', PAIR_SCHEMA)\n"
            "assert 'pandas' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
    assert pq.read_table(tmp_path / "b" / "train.parquet").num_rows == 1
