"""What ``prefsynth curate`` writes: the kept prompts, a removal table, the facts and the
card section (rendered from ``templates/curation.md.jinja``, every value escaped)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from prefsynth.output.card import render_curation
from prefsynth.output.files import atomic_write, write_bytes, write_text
from prefsynth.records import Prompt

if TYPE_CHECKING:
    from prefsynth.stages.curate import CurationResult


def prompt_row(p: Prompt) -> dict[str, Any]:
    """A kept prompt as a row ``load_prompts`` reads back with ``messages_field: messages``
    (the same id, messages and source, so the same request keys)."""
    return {"id": p.id, "messages": p.messages, "prompt": p.text, "source": p.source,
            "reference": p.reference, "instruction_id_list": p.instruction_ids,
            "kwargs": p.constraint_kwargs}


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            for r in rows:
                f.write(orjson.dumps(r) + b"\n")

    atomic_write(path, write)


def write_curation(result: CurationResult, out_dir: str | Path) -> list[Path]:
    """OUT/prompts.jsonl (kept), OUT/removed.jsonl (one row per removal), OUT/curation.json
    (the facts) and OUT/curation.md (the card section). Returns the paths written."""
    out = Path(out_dir)
    paths = [out / "prompts.jsonl", out / "removed.jsonl", out / "curation.json",
             out / "curation.md"]
    _write_jsonl(paths[0], (prompt_row(p) for p in result.prompts))
    _write_jsonl(paths[1], (asdict(r) for r in result.removals))  # type: ignore[call-overload]
    write_bytes(paths[2], orjson.dumps(result.facts, option=orjson.OPT_INDENT_2))
    write_text(paths[3], render_curation(result.facts))
    return paths
