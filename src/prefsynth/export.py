"""Export: the output folder a user hands to ``datasets`` and TRL.

    OUTDIR/pairs/train.parquet, OUTDIR/pairs.jsonl   the binarized dataset, Tulu 3 columns
    OUTDIR/annotations/train.parquet, ….jsonl         every response, every aspect's ratings
    OUTDIR/judgments/train.parquet               every judge answer, raw text and shown order
    OUTDIR/run.json                              counts, drops by reason, usage, the config
    OUTDIR/README.md                             the dataset card

The JSONL copies sit beside the folders, not inside: ``load_dataset("parquet", data_dir=…)``
reads every file in the folder. Row builders are pure; writers replace files atomically so an interrupted export never
leaves a half-written parquet behind.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from prefsynth.agreement import judge_agreement
from prefsynth.pairs import aspect_means, position_means, score
from prefsynth.pipeline import RunResult
from prefsynth.records import Judgment

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))

PAIR_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("chosen", MESSAGES), ("rejected", MESSAGES),
    ("chosen_rating", pa.float64()), ("rejected_rating", pa.float64()),
    ("chosen_model", pa.string()), ("rejected_model", pa.string()), ("source", pa.string()),
])


def pair_rows(result: RunResult) -> list[dict[str, Any]]:
    return [asdict(p) for p in result.pairs]  # type: ignore[call-overload]


def _rating_str(r: object) -> str | None:
    return None if r is None else str(r)


def annotation_rows(result: RunResult) -> list[dict[str, Any]]:
    """One row per response: its ratings per aspect (averaged over permutations), rationales,
    the positions it was shown at, constraint checks and its role in the pair."""
    cfg = result.config
    prompts = {p.id: p for p in result.prompts}
    by_prompt: dict[str, list[Judgment]] = defaultdict(list)
    for j in result.judgments:
        by_prompt[j.prompt_id].append(j)
    roles: dict[tuple[str, str], str] = {}
    for pair in result.pairs:
        roles[(pair.id, pair.chosen_model)] = "chosen"
        roles[(pair.id, pair.rejected_model)] = "rejected"
    rows = []
    for g in result.generations:
        p = prompts[g.prompt_id]
        js = by_prompt.get(g.prompt_id, [])
        means = aspect_means([j for j in js if not j.error]).get(g.model, {})
        row: dict[str, Any] = {
            "prompt_id": g.prompt_id, "prompt": p.text, "messages": p.messages,
            "source": p.source, "model": g.model, "response": g.text,
            "finish_reason": g.finish_reason, "generation_error": g.error,
            "prompt_tokens": g.usage.prompt_tokens, "completion_tokens": g.usage.completion_tokens,
            "score": score(means, cfg.pairs) if means else None,
            "role": roles.get((g.prompt_id, g.model), ""),
            "positions": [j.order.index(j.models.index(g.model)) + 1 for j in js
                          if j.aspect == cfg.judge.aspects[0] and g.model in j.models],
        }
        for aspect in cfg.judge.aspects:
            aj = [j for j in js if j.aspect == aspect and g.model in j.models]
            row[f"{aspect}_rating"] = means.get(aspect)
            row[f"{aspect}_raw_ratings"] = [_rating_str(j.ratings[j.models.index(g.model)])
                                            for j in aj]
            row[f"{aspect}_rationale"] = next(
                (j.rationales[j.models.index(g.model)] for j in aj
                 if j.rationales[j.models.index(g.model)]), None)
        cons = result.constraint_results.get((g.prompt_id, g.model))
        row["instruction_id_list"] = p.instruction_ids
        row["constraints_passed"] = cons
        rows.append(row)
    return rows


def judgment_rows(result: RunResult) -> list[dict[str, Any]]:
    return [{
        "prompt_id": j.prompt_id, "aspect": j.aspect, "permutation": j.permutation,
        "models": j.models, "order": j.order, "ratings": [_rating_str(r) for r in j.ratings],
        "raw": j.raw, "error": j.error, "attempts": j.attempts, "judge": j.judge,
    } for j in result.judgments]


def summary(result: RunResult) -> dict[str, Any]:
    """The facts the card, the report and ``prefsynth mix`` are written from."""
    cfg = result.config
    responses = Counter(g.model for g in result.generations if g.text is not None)
    failed = Counter(g.model for g in result.generations if g.text is None)
    jerr = Counter((j.error or "").split(":")[0] for j in result.judgments if j.error)
    return {
        "name": cfg.name,
        "prompts": {"read": result.prompt_stats.read, "duplicates": result.prompt_stats.duplicates,
                    "kept": result.prompt_stats.kept},
        "pairs": len(result.pairs),
        "pairs_num_bytes": pa.Table.from_pylist(pair_rows(result), schema=PAIR_SCHEMA).nbytes,
        "dropped": result.dropped_by_reason(),
        "complete": not result.pending,
        "models": [{
            "name": m.name, "backend": m.backend, "model": m.model, "license": m.license,
            "responses": responses.get(m.name, 0), "failed": failed.get(m.name, 0),
            "chosen": sum(p.chosen_model == m.name for p in result.pairs),
            "rejected": sum(p.rejected_model == m.name for p in result.pairs),
        } for m in cfg.models],
        "judge": {"name": cfg.judge.name, "backend": cfg.judge.backend, "model": cfg.judge.model,
                  "license": cfg.judge.license, "aspects": cfg.judge.aspects,
                  "mode": cfg.judge.mode, "permutations": cfg.judge.permutations,
                  "temperature": cfg.judge.params.temperature,
                  "judgments": len(result.judgments), "failed": dict(jerr),
                  "reasks": result.reasks},
        "panel": [{"name": j.name, "backend": j.backend, "model": j.model, "license": j.license,
                   "mode": j.mode} for j in cfg.panel],
        "agreement": judge_agreement(result.judgments) if cfg.panel else [],
        "position_means": position_means(result.judgments),
        "pairing": cfg.pairs.model_dump(),
        "responses_per_prompt": cfg.responses_per_prompt, "on_policy": cfg.on_policy,
        "seed": cfg.seed,
        "stages": {k: asdict(v) for k, v in result.stages.items()},  # type: ignore[call-overload]
        "sources": dict(Counter(p.source for p in result.pairs)),
        "config": cfg.model_dump(mode="json"),
    }


def _atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_table(rows: list[dict[str, Any]], folder: Path, schema: pa.Schema | None = None,
                jsonl: bool = True) -> None:
    table = pa.Table.from_pylist(rows, schema=schema) if rows or schema else pa.table({})
    _atomic(folder / "train.parquet", lambda t: pq.write_table(table, t))
    if jsonl:
        def _w(t: Path) -> None:
            with t.open("wb") as f:
                for r in rows:
                    f.write(orjson.dumps(r) + b"\n")
        _atomic(folder.with_suffix(".jsonl"), _w)


def write_output(result: RunResult) -> Path:
    from prefsynth.card import render_card

    out = result.config.output_dir
    write_table(pair_rows(result), out / "pairs", PAIR_SCHEMA)
    write_table(annotation_rows(result), out / "annotations")
    write_table(judgment_rows(result), out / "judgments", jsonl=False)
    facts = summary(result)
    _atomic(out / "run.json", lambda t: t.write_bytes(orjson.dumps(facts, option=orjson.OPT_INDENT_2)))
    _atomic(out / "README.md", lambda t: t.write_text(render_card(facts), encoding="utf-8"))
    return out
