"""Export: the output folder a user hands to ``datasets`` and TRL.

    OUTDIR/pairs/train.parquet, OUTDIR/pairs.jsonl   the binarized dataset, Tulu 3 columns
    OUTDIR/annotations/train.parquet, ….jsonl         every response, every aspect's ratings
    OUTDIR/judgments/train.parquet               every judge answer, raw text and shown order
    OUTDIR/run.json                              counts, drops by reason, usage, the config
    OUTDIR/README.md                             the dataset card

The JSONL copies sit beside the folders, not inside: ``load_dataset("parquet", data_dir=…)``
reads every file in the folder. Row builders are pure. ``OutputWriter`` streams: each shard
of a run (``shard_size``) is appended as it finishes and its counts folded into ``Facts``;
files are written under hidden temporary names and renamed into place on ``close``, so an
interrupted export never leaves a half-written parquet behind.
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

from prefsynth.config import Config
from prefsynth.core.pipeline import RunResult
from prefsynth.records import Judgment
from prefsynth.stages.judge.agreement import judge_agreement
from prefsynth.stages.pairs import aspect_means, means_from_sums, position_sums, score

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


def annotation_schema(aspects: list[str]) -> pa.Schema:
    """Explicit, so every shard of a streamed export writes the same columns and types."""
    fields = [
        ("prompt_id", pa.string()), ("prompt", pa.string()), ("messages", MESSAGES),
        ("source", pa.string()), ("model", pa.string()), ("response", pa.string()),
        ("finish_reason", pa.string()), ("generation_error", pa.string()),
        ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
        ("score", pa.float64()), ("role", pa.string()), ("positions", pa.list_(pa.int64())),
    ]
    for a in aspects:
        fields += [(f"{a}_rating", pa.float64()), (f"{a}_raw_ratings", pa.list_(pa.string())),
                   (f"{a}_rationale", pa.string())]
    fields += [("instruction_id_list", pa.list_(pa.string())),
               ("constraints_passed", pa.list_(pa.bool_()))]
    return pa.schema(fields)


JUDGMENT_SCHEMA = pa.schema([
    ("prompt_id", pa.string()), ("aspect", pa.string()), ("permutation", pa.int64()),
    ("models", pa.list_(pa.string())), ("order", pa.list_(pa.int64())),
    ("ratings", pa.list_(pa.string())), ("raw", pa.string()), ("error", pa.string()),
    ("attempts", pa.int64()), ("judge", pa.string()),
])


class Facts:
    """The facts the card, the report and ``prefsynth mix`` are written from, accumulated
    shard by shard (counts, sums), so a streamed run never holds all its records at once."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.responses: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.chosen: Counter[str] = Counter()
        self.rejected: Counter[str] = Counter()
        self.judge_errors: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()
        self.judgments = 0
        self.pairs = 0
        self.pairs_num_bytes = 0
        self.position: dict[str, dict[int, list[int]]] = defaultdict(
            lambda: defaultdict(lambda: [0, 0]))
        self.panel_ratings: list[Judgment] = []  # compact copies, only with a judge panel

    def add(self, result: RunResult, pairs_num_bytes: int) -> None:
        self.responses.update(g.model for g in result.generations if g.text is not None)
        self.failed.update(g.model for g in result.generations if g.text is None)
        self.chosen.update(p.chosen_model for p in result.pairs)
        self.rejected.update(p.rejected_model for p in result.pairs)
        self.sources.update(p.source for p in result.pairs)
        self.pairs += len(result.pairs)
        self.pairs_num_bytes += pairs_num_bytes
        self.judgments += len(result.judgments)
        self.judge_errors.update((j.error or "").split(":")[0]
                                 for j in result.judgments if j.error)
        for aspect, by_pos in position_sums(result.judgments).items():
            for pos, (total, n) in by_pos.items():
                acc = self.position[aspect][pos]
                acc[0] += total
                acc[1] += n
        if self.cfg.panel:
            self.panel_ratings.extend(
                Judgment(j.prompt_id, j.aspect, j.models, j.ratings, [], j.order,
                         error=j.error, judge=j.judge) for j in result.judgments)

    def to_dict(self, final: RunResult) -> dict[str, Any]:
        cfg = self.cfg
        failed = sum(c.failed for c in final.stages.values())
        pending = sum(c.pending for c in final.stages.values())
        return {
            "name": cfg.name,
            "prompts": {"read": final.prompt_stats.read,
                        "duplicates": final.prompt_stats.duplicates,
                        "kept": final.prompt_stats.kept},
            "pairs": self.pairs,
            "pairs_num_bytes": self.pairs_num_bytes,
            "dropped": final.dropped_by_reason(),
            # partial: requests pending (Batch API) or failed; a rerun asks them again
            "complete": not final.pending and failed == 0,
            "failed_requests": failed,
            "pending_requests": pending,
            "models": [{
                "name": m.name, "backend": m.backend, "model": m.model, "license": m.license,
                "responses": self.responses.get(m.name, 0), "failed": self.failed.get(m.name, 0),
                "chosen": self.chosen.get(m.name, 0), "rejected": self.rejected.get(m.name, 0),
            } for m in cfg.models],
            "judge": {"name": cfg.judge.name, "backend": cfg.judge.backend,
                      "model": cfg.judge.model, "license": cfg.judge.license,
                      "aspects": cfg.judge.aspects, "mode": cfg.judge.mode,
                      "permutations": cfg.judge.permutations,
                      "temperature": cfg.judge.params.temperature,
                      "judgments": self.judgments, "failed": dict(self.judge_errors),
                      "reasks": final.reasks},
            "panel": [{"name": j.name, "backend": j.backend, "model": j.model,
                       "license": j.license, "mode": j.mode} for j in cfg.panel],
            "agreement": judge_agreement(self.panel_ratings) if cfg.panel else [],
            "position_means": means_from_sums(self.position),
            "pairing": cfg.pairs.model_dump(),
            "responses_per_prompt": cfg.responses_per_prompt, "on_policy": cfg.on_policy,
            "seed": cfg.seed,
            "stages": {k: asdict(v) for k, v in final.stages.items()},  # type: ignore[call-overload]
            "sources": dict(self.sources),
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


class _TableSink:
    """One output table written shard by shard to hidden temporary files, renamed into
    place on ``close``: readers never see a half-written parquet."""

    def __init__(self, folder: Path, schema: pa.Schema, jsonl: bool) -> None:
        self.final = folder / "train.parquet"
        self.tmp = folder / ".train.parquet.tmp"
        self.final_jsonl = folder.with_suffix(".jsonl") if jsonl else None
        self.tmp_jsonl = folder.parent / f".{folder.name}.jsonl.tmp" if jsonl else None
        self.schema = schema
        self.writer: pq.ParquetWriter | None = None  # opened on first use: a run that fails
        # before its first shard leaves the folder untouched

    def _open(self) -> pq.ParquetWriter:
        if self.writer is None:
            self.tmp.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp, self.schema)
            if self.tmp_jsonl is not None:
                self.tmp_jsonl.write_bytes(b"")
        return self.writer

    def write(self, rows: list[dict[str, Any]]) -> int:
        table = pa.Table.from_pylist(rows, schema=self.schema)
        self._open().write_table(table)
        if self.tmp_jsonl is not None:
            with self.tmp_jsonl.open("ab") as f:
                f.write(b"".join(orjson.dumps(r) + b"\n" for r in rows))
        return int(table.nbytes)

    def close(self) -> None:
        self._open().close()
        os.replace(self.tmp, self.final)
        if self.tmp_jsonl is not None and self.final_jsonl is not None:
            os.replace(self.tmp_jsonl, self.final_jsonl)


class OutputWriter:
    """Streams a run's output: ``add`` each shard's records as they are done, ``close`` with
    the final result (counts, stages, drops) to write ``run.json`` and the card."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.out = cfg.output_dir
        self.facts = Facts(cfg)
        self.pairs = _TableSink(self.out / "pairs", PAIR_SCHEMA, jsonl=True)
        self.annotations = _TableSink(self.out / "annotations",
                                      annotation_schema(list(cfg.judge.aspects)), jsonl=True)
        self.judgments = _TableSink(self.out / "judgments", JUDGMENT_SCHEMA, jsonl=False)

    def add(self, shard: RunResult) -> None:
        nbytes = self.pairs.write(pair_rows(shard))
        self.annotations.write(annotation_rows(shard))
        self.judgments.write(judgment_rows(shard))
        self.facts.add(shard, nbytes)

    def close(self, final: RunResult) -> dict[str, Any]:
        from prefsynth.output.card import render_card

        for sink in (self.pairs, self.annotations, self.judgments):
            sink.close()
        facts = self.facts.to_dict(final)
        _atomic(self.out / "run.json",
                lambda t: t.write_bytes(orjson.dumps(facts, option=orjson.OPT_INDENT_2)))
        _atomic(self.out / "README.md", lambda t: t.write_text(render_card(facts), encoding="utf-8"))
        return facts
