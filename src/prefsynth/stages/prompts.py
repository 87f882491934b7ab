"""Load prompts: JSONL, JSON, Parquet, or anything ``datasets.load_dataset`` reads.

Each row becomes a ``Prompt`` with a stable id (a content hash unless the row has one), its
messages (a text field becomes one user turn; a messages field keeps multi-turn prompts, the
final assistant turn of an SFT conversation dropped), its ``source``, and optional reference
answer and IFEval-style constraints. Exact duplicates (same messages) are removed and counted.
Every problem is reported as one line naming the file and line (or row) and the field.

What a careless or hostile file can hold is refused here, before any model is paid for:
malformed or binary lines, lines over ``MAX_LINE_BYTES``, JSON nested past the stack or
with integers too long to convert, lone surrogates (``"\\ud800"``) in any kept string, fields
of the wrong type, unknown IFEval instruction ids and bad kwargs (checked by the verifier at
load, not after judging). A UTF-8 BOM and CRLF line ends are read as ordinary text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from prefsynth.config import PromptSource
from prefsynth.errors import InputError, MissingExtraError
from prefsynth.records import Message, Prompt, stable_hash
from prefsynth.stages.constraints.checks import short_repr
from prefsynth.stages.constraints.verifier import check_constraint

log = logging.getLogger(__name__)

_ROLES = {"system", "user", "assistant"}
_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
#: the longest JSONL line read: far above any real prompt (a million-token context is ~4 MB),
#: low enough that a binary file with no newline, or a runaway line, cannot exhaust memory
MAX_LINE_BYTES = 32 * 1024 * 1024
_SCALARS = (str, int, float, bool)


@dataclass(slots=True)
class PromptStats:
    read: int = 0
    duplicates: int = 0
    kept: int = 0


def _decode_json(where: str, text: str) -> Any:
    """``json.loads`` with every way it can fail turned into one ``InputError`` line:
    malformed text, nesting deep enough to exhaust the stack, an integer too long to convert."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # e.g. an integer literal longer than Python converts (4300 digits)
        raise InputError(f"{where}: unreadable JSON value ({str(e).split(':')[0]})") from None


def _open(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a prompt file (folders inside "
                         "prompts.path are not read)") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with _open(path) as f:
        n = 0
        while raw := f.readline(MAX_LINE_BYTES + 1):
            n += 1
            where = f"{path}:{n}"
            if len(raw) > MAX_LINE_BYTES:
                raise InputError(f"{where}: line longer than {MAX_LINE_BYTES:,} bytes "
                                 "(not a JSON Lines file?)")
            if b"\0" in raw:
                raise InputError(f"{where}: binary data (a NUL byte); expected JSON Lines")
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a BOM is tolerated
            except UnicodeDecodeError:
                raise InputError(f"{where}: invalid UTF-8") from None
            if line.strip():
                yield where, _decode_json(where, line)


def _iter_json(path: Path) -> Iterator[tuple[str, Any]]:
    with _open(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path}: invalid UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        hint = " (one object per line? name the file .jsonl)" if e.msg == "Extra data" else ""
        raise InputError(f"{path}:{e.lineno}: malformed JSON ({e.msg}){hint}") from None
    except (RecursionError, ValueError):
        data = _decode_json(str(path), text)  # raises its one-line message
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
    files = sorted(p for p in path.iterdir() if p.suffix in _SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise InputError(f"{path}: no .jsonl, .json or .parquet files in this folder")
    for f in files:
        fmt = src.format if src.format != "auto" else _SUFFIXES.get(f.suffix, "jsonl")
        if f.is_dir():
            raise InputError(f"{f}: is a folder, not a prompt file (folders inside "
                             "prompts.path are not read)")
        if fmt == "parquet":
            yield from _iter_parquet(f)
        elif fmt == "json":
            yield from _iter_json(f)
        else:
            yield from _iter_jsonl(f)


def _text(where: str, name: str, value: Any) -> str:
    """A string field, checked to be valid Unicode: JSON's ``\\ud800`` escape decodes to a
    lone surrogate that no encoder (UTF-8 files, hashing, HTTP) accepts later."""
    if not isinstance(value, str):
        raise InputError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{where}: field {name!r} holds a lone surrogate (an unpaired "
                         "\\ud800-\\udfff escape), which is not valid Unicode") from None
    return value


def _scalar(where: str, name: str, value: Any) -> str | None:
    """An optional field kept as text: a string, or a number shown as one; never a container."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, _SCALARS):
        raise InputError(f"{where}: field {name!r} must be a string or a number, "
                         f"got {type(value).__name__}")
    return _text(where, name, value if isinstance(value, str) else str(value))


def _messages(where: str, row: dict[str, Any], src: PromptSource) -> list[Message]:
    if src.messages_field:
        field = src.messages_field
        msgs = row.get(field)
        if not isinstance(msgs, list) or not msgs:
            raise InputError(f"{where}: field {field!r} must be a non-empty list of messages")
        out: list[Message] = []
        for j, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES:
                raise InputError(f"{where}: {field}[{j}] must be {{role, content}} "
                                 f"with role in {sorted(_ROLES)}")
            if m["role"] == "system" and j > 0:
                raise InputError(f"{where}: {field}[{j}]: a system turn must come first")
            content = _text(where, f"{field}[{j}].content", m.get("content"))
            out.append({"role": m["role"], "content": content})
        while out and out[-1]["role"] == "assistant":  # an SFT conversation: drop its answer
            out.pop()
        if not out or out[-1]["role"] != "user" or not out[-1]["content"].strip():
            raise InputError(f"{where}: {field} must end with a non-empty user turn")
        return out
    if src.text_field not in row:
        raise InputError(f"{where}: missing field {src.text_field!r} (prompts.text_field)")
    text = _text(where, src.text_field, row[src.text_field])
    if not text.strip():
        raise InputError(f"{where}: field {src.text_field!r} is empty")
    return [{"role": "user", "content": text}]


def _kwarg_value(value: Any) -> bool:
    """IFEval kwargs are scalars or flat lists of strings; nothing deeper is ever read."""
    if isinstance(value, list):
        return all(v is None or isinstance(v, _SCALARS) for v in value)
    return value is None or isinstance(value, _SCALARS)


def _constraints(where: str, row: dict[str, Any], src: PromptSource
                 ) -> tuple[list[str], list[dict[str, Any]]]:
    """IFEval ids and kwargs, each checked against the verifier now, before any model runs."""
    ids_field, kw_field = src.instruction_ids_field, src.kwargs_field
    ids = row.get(ids_field) if ids_field else None
    if not ids:
        return [], []
    if not isinstance(ids, list):
        raise InputError(f"{where}: field {ids_field!r} must be a list of instruction ids, "
                         f"got {type(ids).__name__}")
    kwargs = row.get(kw_field) if kw_field else None
    kwargs = kwargs if kwargs is not None else [None] * len(ids)
    if not isinstance(kwargs, list) or len(ids) != len(kwargs):
        raise InputError(f"{where}: {ids_field} and {kw_field} must be lists of the same length")
    clean = []
    for j, (iid, kw) in enumerate(zip(ids, kwargs, strict=True)):
        if isinstance(kw, dict):
            for k, v in kw.items():
                if not _kwarg_value(v):
                    raise InputError(f"{where}: {kw_field}[{j}].{k[:40]}: must be a string, "
                                     "number, boolean or a flat list of them")
                for t in v if isinstance(v, list) else [v]:
                    if isinstance(t, str):
                        _text(where, f"{kw_field}[{j}].{k[:40]}", t)
        try:
            clean.append(check_constraint(iid, kw))
        except InputError as e:
            raise InputError(f"{where}: {ids_field}[{j}]: {e}") from None
    return list(ids), clean  # every id is a known one now


def _prompt_id(where: str, row: dict[str, Any], src: PromptSource, messages: list[Message]) -> str:
    given = row.get(src.id_field) if src.id_field else None
    if given is None or given == "":
        return stable_hash(messages)
    if isinstance(given, bool) or not isinstance(given, str | int):
        raise InputError(f"{where}: field {src.id_field!r} must be a string or an integer, "
                         f"got {type(given).__name__}")
    return _text(where, str(src.id_field), str(given))


def parse_row(where: str, row: Any, src: PromptSource) -> Prompt:
    if not isinstance(row, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
    messages = _messages(where, row, src)
    source = _scalar(where, src.source_field, row.get(src.source_field)) if src.source_field else None
    reference = (_scalar(where, src.reference_field, row.get(src.reference_field))
                 if src.reference_field else None)
    ids, kwargs = _constraints(where, row, src)
    return Prompt(
        id=_prompt_id(where, row, src, messages),
        messages=messages,
        source=source or src.source_name or "",
        reference=reference,
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
            raise InputError(f"{where}: id {short_repr(prompt.id)} already used by {seen_ids[prompt.id]} "
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
