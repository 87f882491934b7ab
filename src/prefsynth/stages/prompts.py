"""Load prompts: JSONL, JSON, Parquet, or anything ``datasets.load_dataset`` reads.

Each row becomes a ``Prompt`` with a stable id (a content hash unless the row has one), its
messages (a text field becomes one user turn; a messages field keeps multi-turn prompts, the
final assistant turn of an SFT conversation dropped), its ``source``, and optional reference
answer and IFEval-style constraints. Exact duplicates (same messages) are removed and counted.
Every problem is reported as one line naming the file and line (or row) and the field.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefsynth.config import PromptSource
from prefsynth.errors import InputError, MissingExtraError
from prefsynth.records import Message, Prompt, stable_hash

log = logging.getLogger(__name__)

_ROLES = {"system", "user", "assistant"}


@dataclass(slots=True)
class PromptStats:
    read: int = 0
    duplicates: int = 0
    kept: int = 0


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open("rb") as f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(f"{where}: invalid UTF-8") from None
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path}: invalid UTF-8") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of prompt objects")
    for i, row in enumerate(data):
        yield f"{path}[{i}]", row


def _iter_parquet(path: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several unrelated types for corrupt files
        raise InputError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i}", row


def _iter_datasets(name: str, split: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise MissingExtraError("loading prompts with datasets", "hf") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # datasets raises many types; keep it one line
        raise InputError(f"dataset {name!r} split {split!r}: {str(e).splitlines()[0]}") from None
    for i, row in enumerate(ds):
        yield f"{name}[{split}] row {i}", row


def _rows(src: PromptSource) -> Iterator[tuple[str, Any]]:
    if src.dataset is not None:
        yield from _iter_datasets(src.dataset, src.split)
        return
    assert src.path is not None
    path = Path(src.path)
    if not path.exists():
        raise InputError(f"{path}: prompt file not found")
    files = sorted(p for p in path.iterdir() if p.suffix in {".jsonl", ".json", ".parquet"}) \
        if path.is_dir() else [path]
    if not files:
        raise InputError(f"{path}: no .jsonl, .json or .parquet files in this folder")
    for f in files:
        fmt = src.format if src.format != "auto" else {
            ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}.get(f.suffix, "jsonl")
        if fmt == "parquet":
            yield from _iter_parquet(f)
        elif fmt == "json":
            yield from _iter_json(f)
        else:
            yield from _iter_jsonl(f)


def _messages(where: str, row: dict[str, Any], src: PromptSource) -> list[Message]:
    if src.messages_field:
        msgs = row.get(src.messages_field)
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{where}: field {src.messages_field!r} must be a non-empty list of messages")
        out: list[Message] = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise InputError(f"{where}: {src.messages_field}[{j}] must be {{role, content}} "
                                 f"with role in {sorted(_ROLES)}")
            out.append({"role": m["role"], "content": m["content"]})
        while out and out[-1]["role"] == "assistant":  # an SFT conversation: drop its answer
            out.pop()
        if not out or out[-1]["role"] != "user" or not out[-1]["content"].strip():
            raise InputError(f"{where}: {src.messages_field} must end with a non-empty user turn")
        return out
    text = row.get(src.text_field)
    if src.text_field not in row:
        raise InputError(f"{where}: missing field {src.text_field!r} (prompts.text_field)")
    if not isinstance(text, str):
        raise InputError(f"{where}: field {src.text_field!r} must be a string, got {type(text).__name__}")
    if not text.strip():
        raise InputError(f"{where}: field {src.text_field!r} is empty")
    return [{"role": "user", "content": text}]


def _constraints(where: str, row: dict[str, Any], src: PromptSource) -> tuple[list[str], list[dict[str, Any]]]:
    ids = row.get(src.instruction_ids_field) if src.instruction_ids_field else None
    if not ids:
        return [], []
    kwargs = row.get(src.kwargs_field) if src.kwargs_field else None
    kwargs = kwargs if kwargs is not None else [{} for _ in ids]
    if not isinstance(ids, list) or not isinstance(kwargs, list) or len(ids) != len(kwargs):
        raise InputError(f"{where}: {src.instruction_ids_field} and {src.kwargs_field} must be "
                         "lists of the same length")
    clean = [{k: v for k, v in (kw or {}).items() if v is not None} for kw in kwargs]
    return [str(i) for i in ids], clean


def parse_row(where: str, row: Any, src: PromptSource) -> Prompt:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    messages = _messages(where, row, src)
    given = row.get(src.id_field) if src.id_field else None
    pid = str(given) if given not in (None, "") else stable_hash(messages)
    source = row.get(src.source_field) if src.source_field else None
    reference = row.get(src.reference_field) if src.reference_field else None
    ids, kwargs = _constraints(where, row, src)
    return Prompt(
        id=pid,
        messages=messages,
        source=str(source) if source else (src.source_name or ""),
        reference=str(reference) if reference else None,
        instruction_ids=ids,
        constraint_kwargs=kwargs,
    )


def load_prompts(src: PromptSource, limit: int | None = None) -> tuple[list[Prompt], PromptStats]:
    """All prompts from the source, exact duplicates removed. Raises ``InputError``."""
    stats = PromptStats()
    seen_content: set[str] = set()
    seen_ids: dict[str, str] = {}
    out: list[Prompt] = []
    cap = min(x for x in (limit, src.limit, 10**12) if x is not None)
    for where, row in _rows(src):
        if len(out) >= cap:
            break
        prompt = parse_row(where, row, src)
        stats.read += 1
        content = stable_hash(prompt.messages)
        if content in seen_content:
            stats.duplicates += 1
            continue
        if prompt.id in seen_ids:
            raise InputError(f"{where}: id {prompt.id!r} already used by {seen_ids[prompt.id]} "
                             "for a different prompt")
        seen_content.add(content)
        seen_ids[prompt.id] = where
        out.append(prompt)
    if not out:
        raise InputError(f"{src.path or src.dataset}: no prompts found")
    stats.kept = len(out)
    if stats.duplicates:
        log.info("removed %d exact duplicate prompts", stats.duplicates)
    return out, stats
