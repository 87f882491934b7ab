"""Output-folder files: atomic writes, the ``.prefsynth`` marker, stale-file removal, and the
60-line limit on functions in ``prefsynth.output``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import prefsynth.output
from prefsynth.errors import InputError
from prefsynth.output.files import MARKER, atomic_write, claim_output_dir, remove_stale, write_text


def test_claim_output_dir(tmp_path: Path) -> None:
    new = tmp_path / "new"
    claim_output_dir(new)
    assert (new / MARKER).is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_output_dir(empty)
    assert (empty / MARKER).is_dir()
    claim_output_dir(empty)  # a prefsynth output: written into again
    users = tmp_path / "users"
    users.mkdir()
    (users / "README.md").write_text("mine")
    with pytest.raises(InputError) as err:
        claim_output_dir(users)
    assert str(err.value).startswith(str(users)) and "--force" in str(err.value)
    assert "\n" not in str(err.value) and not (users / MARKER).exists()
    claim_output_dir(users, force=True)
    assert (users / MARKER).is_dir() and (users / "README.md").read_text() == "mine"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        claim_output_dir(a_file, force=True)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "x.txt"
    write_text(path, "old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_text() == "old" and sorted(p.name for p in path.parent.iterdir()) == ["x.txt"]


def test_remove_stale(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("train.parquet", "old.parquet", ".hidden", "sub/x.parquet"):
        (tmp_path / name).write_text("x")
    remove_stale(tmp_path, {"train.parquet"})
    assert [p.name for p in tmp_path.iterdir()] == ["train.parquet"]
    remove_stale(tmp_path / "absent", {"train.parquet"})  # nothing to do


def test_no_function_over_60_lines_in_output() -> None:
    root = Path(prefsynth.output.__file__).parent
    long = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None
                n = node.end_lineno - node.lineno + 1
                if n > 60:
                    long.append(f"{path.name}:{node.name} ({n} lines)")
    assert long == []
