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

import hashlib
import json
import logging
import re
from array import array
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


class HashSet:
    """A set of 64-bit hashes in one ``array('Q')`` (open addressing, linear probing, at most
    3/4 full): 11-21 bytes per member, where a ``set`` of ``int`` costs 60-140. Exact
    deduplication of a whole input must remember every prompt it kept; at a million prompts
    this is 11-21 MB, not 60-140 MB. Zero marks an empty slot, so a zero hash is stored as 1."""

    __slots__ = ("_mask", "_slots", "size")

    def __init__(self, capacity: int = 1024) -> None:
        self._slots = array("Q", bytes(8 * capacity))  # capacity: a power of two
        self._mask = capacity - 1
        self.size = 0

    def _find(self, h: int) -> int:
        """The slot holding ``h``, or the empty one where it would go (linear probing)."""
        slots, mask = self._slots, self._mask
        i = h & mask
        while (v := slots[i]) != 0 and v != h:
            i = (i + 1) & mask
        return i

    def add(self, h: int) -> bool:
        """Add ``h``; ``False`` when it was already there."""
        h = h or 1
        i = self._find(h)
        if self._slots[i]:
            return False
        self._slots[i] = h
        self.size += 1
        if 4 * self.size > 3 * (self._mask + 1):
            self._grow()
        return True

    def __contains__(self, h: int) -> bool:
        return self._slots[self._find(h or 1)] != 0

    def _grow(self) -> None:
        old = self._slots
        self._slots = array("Q", bytes(16 * len(old)))
        self._mask = 2 * len(old) - 1
        self.size = 0
        for v in old:
            if v:
                self.add(v)


_HEX16 = re.compile(r"[0-9a-f]{16}")


def _id_hash(prompt_id: str) -> int:
    """A given id's 64-bit key, comparable with content hashes: an id shaped like one (16 hex
    digits, what ``stable_hash`` gives a prompt without an id) is read as one."""
    if _HEX16.fullmatch(prompt_id):
        return int(prompt_id, 16)
    return int.from_bytes(hashlib.blake2b(prompt_id.encode("utf-8", "surrogatepass"),
                                          digest_size=8).digest(), "big")


def iter_prompts(src: PromptSource, limit: int | None = None,
                 stats: PromptStats | None = None) -> Iterator[Prompt]:
    """The prompts of the source one by one, exact duplicates removed, counted in ``stats``
    (``kept`` once the source is exhausted). Raises ``InputError``.

    Holds one prompt at a time and two ``HashSet``: the kept contents' hashes, and the ids a
    row gave (an id the row does not give is its content hash, so the first set covers it).
    Reading the same source twice yields the same prompts, which is how ``core.plan`` streams a
    run's shards without holding its prompt list."""
    stats = stats if stats is not None else PromptStats()
    contents, given = HashSet(), HashSet()
    kept = 0
    cap = min(x for x in (limit, src.limit, 10**12) if x is not None)
    for where, row in _rows(src):
        if kept >= cap:
            break
        prompt = parse_row(where, row, src)
        stats.read += 1
        content = stable_hash(prompt.messages)
        key = int(content, 16)
        if key in contents:
            stats.duplicates += 1
            continue
        if prompt.id != content:  # the row gave its id
            id_key = _id_hash(prompt.id)
            clash = (not given.add(id_key)) or id_key in contents
        else:
            clash = key in given
        if clash:
            _id_clash(src, where, prompt, stats.read)
        contents.add(key)
        kept += 1
        yield prompt
    stats.kept = kept
    if not kept:
        raise InputError(f"{src.path or src.dataset}: no prompts found")
    if stats.duplicates:
        log.info("removed %d exact duplicate prompts", stats.duplicates)


def _id_clash(src: PromptSource, where: str, prompt: Prompt, row: int) -> None:
    """Raise the ``InputError`` of a kept prompt whose id an earlier kept prompt has, after
    reading the source again up to ``row`` to name that prompt (the hashes alone cannot). A
    clash of 64-bit hashes with no such prompt (a given id shaped like another prompt's
    content hash) is no error: the prompt is kept."""
    seen: set[str] = set()
    for i, (first, data) in enumerate(_rows(src), start=1):
        if i >= row:
            return
        earlier = parse_row(first, data, src)
        content = stable_hash(earlier.messages)
        if content in seen:
            continue
        seen.add(content)
        if earlier.id == prompt.id:
            raise InputError(f"{where}: id {short_repr(prompt.id)} already used by {first} "
                             "for a different prompt")


def load_prompts(src: PromptSource, limit: int | None = None) -> tuple[list[Prompt], PromptStats]:
    """All prompts from the source, exact duplicates removed. Raises ``InputError``."""
    stats = PromptStats()
    return list(iter_prompts(src, limit, stats)), stats
