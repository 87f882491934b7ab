"""Read the eval sets decontamination compares prompts against.

Each ``EvalSource`` is a local JSONL / JSON / Parquet file, or a ``datasets`` name (read only
when a config names one; tests never do). Every problem is one ``InputError`` line naming the
file and row and the dotted config field (``curate.decontaminate.evals.0.field``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from prefsynth.config import EvalSource
from prefsynth.errors import InputError, MissingExtraError


@dataclass(slots=True)
class EvalSet:
    """One eval set's instances: ``ids[i]`` names the instance whose text is ``texts[i]``."""

    name: str
    origin: str  # the file or dataset, for the card
    field: str
    ids: list[str]
    texts: list[list[str]]  # each instance's user turns (one string for a plain text field)


def _jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield f"{path}:{n}", orjson.loads(raw)
            except orjson.JSONDecodeError as e:
                raise InputError(f"{path}:{n}: malformed JSON ({e})") from None


def _json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise InputError(f"{path}: malformed JSON ({e})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of eval instances")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _parquet(path: Path, columns: list[str]) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
        table = pq.read_table(path, columns=[c for c in columns if c in schema.names])
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise InputError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


def _datasets(src: EvalSource) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise MissingExtraError("decontaminating against a datasets eval set", "hf") from None
    try:
        ds = datasets.load_dataset(src.dataset, src.subset, split=src.split)
    except Exception as e:  # datasets raises many types; keep it one line
        raise InputError(f"dataset {src.dataset!r} split {src.split!r}: "
                         f"{str(e).splitlines()[0]}") from None
    for i, row in enumerate(ds):
        yield f"{src.dataset}[{src.split}] row {i}", row


def _rows(src: EvalSource, base_dir: Path, where: str) -> Iterator[tuple[str, Any]]:
    if src.dataset is not None:
        yield from _datasets(src)
        return
    assert src.path is not None
    path = Path(src.path)
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise InputError(f"{path}: eval file not found ({where}.path)")
    fmt = src.format if src.format != "auto" else {
        ".parquet": "parquet", ".json": "json"}.get(path.suffix, "jsonl")
    if fmt == "parquet":
        yield from _parquet(path, [src.field, *([src.id_field] if src.id_field else [])])
    elif fmt == "json":
        yield from _json(path)
    else:
        yield from _jsonl(path)


def _turns(value: Any) -> list[str] | None:
    """An instance's text: a string, or the user turns of a list of messages."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(m, dict) for m in value):
        turns = [m.get("content") for m in value if m.get("role") == "user"]
        if all(isinstance(t, str) for t in turns):
            return turns  # type: ignore[return-value]
    return None


def load_eval_set(src: EvalSource, base_dir: Path, where: str) -> EvalSet:
    """Every instance of one eval set. ``where`` is its dotted config path."""
    ids: list[str] = []
    texts: list[list[str]] = []
    name = src.label
    for i, (loc, row) in enumerate(_rows(src, base_dir, where)):
        if not isinstance(row, dict):
            raise InputError(f"{loc}: expected an object, got {type(row).__name__} ({where})")
        if src.field not in row:
            raise InputError(f"{loc}: missing field {src.field!r} ({where}.field)")
        turns = _turns(row[src.field])
        if turns is None:
            raise InputError(f"{loc}: field {src.field!r} must be a string or a list of "
                             f"{{role, content}} messages ({where}.field)")
        given = row.get(src.id_field) if src.id_field else None
        ids.append(str(given) if given not in (None, "") else f"{name}:{i}")
        texts.append(turns)
    if not any("".join(t).strip() for t in texts):
        raise InputError(f"{src.path or src.dataset}: no eval instances with text ({where})")
    origin = str(src.path) if src.path else f"{src.dataset} ({src.subset or 'default'}, {src.split})"
    return EvalSet(name=name, origin=origin, field=src.field, ids=ids, texts=texts)


def load_eval_sets(evals: list[EvalSource], base_dir: Path,
                   where: str = "curate.decontaminate.evals") -> list[EvalSet]:
    return [load_eval_set(src, base_dir, f"{where}.{i}") for i, src in enumerate(evals)]
