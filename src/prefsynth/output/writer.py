"""The output folder a user hands to ``datasets`` and TRL, written shard by shard.

    OUTDIR/pairs/train.parquet, OUTDIR/pairs.jsonl   the binarized dataset, Tulu 3 columns
    OUTDIR/annotations/train.parquet, ….jsonl         every response, every aspect's ratings
    OUTDIR/judgments/train.parquet               every judge answer, raw text and shown order
    OUTDIR/run.json                              ``RunFacts``: counts, drops, usage, the config
    OUTDIR/README.md                             the dataset card

The JSONL copies sit beside the folders, not inside: ``load_dataset("parquet", data_dir=…)``
reads every file in the folder, which is also why anything else found there is removed once
the new file is in place. Row builders are pure. ``OutputWriter`` streams: each shard of a
run (``shard_size``) is appended as it finishes; files are written under hidden temporary
names and renamed into place on ``close``, so an interrupted export never leaves a
half-written parquet behind. An empty table is written with no row group, so it still reads
as zero rows with the full schema.
"""

from __future__ import annotations

import io
from collections import defaultdict
from dataclasses import fields
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from prefsynth.config import Config
from prefsynth.output.facts import RunFacts, run_facts
from prefsynth.output.files import MARKER, AtomicFile, remove_stale, write_text
from prefsynth.records import Judgment, Pair, RunSummary, ShardResult
from prefsynth.stages.judge.agreement import judge_agreement
from prefsynth.stages.pairs import aspect_means, score
from prefsynth.stages.prompts import PromptStats

MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))

PAIR_SCHEMA = pa.schema([
    ("id", pa.string()), ("prompt", pa.string()), ("chosen", MESSAGES), ("rejected", MESSAGES),
    ("chosen_rating", pa.float64()), ("rejected_rating", pa.float64()),
    ("chosen_model", pa.string()), ("rejected_model", pa.string()), ("source", pa.string()),
])


_PAIR_FIELDS = [f.name for f in fields(Pair)]


def pair_rows(shard: ShardResult) -> list[dict[str, Any]]:
    """Shallow: rows are only encoded, so ``asdict``'s deep copy of every message is waste."""
    return [{f: getattr(p, f) for f in _PAIR_FIELDS} for p in shard.pairs]


def _rating_str(r: object) -> str | None:
    return None if r is None else str(r)


def annotation_rows(shard: ShardResult, cfg: Config) -> list[dict[str, Any]]:
    """One row per response: its ratings per aspect (averaged over permutations), rationales,
    the positions it was shown at, constraint checks and its role in the pair."""
    prompts = {p.id: p for p in shard.prompts}
    by_prompt: dict[str, list[Judgment]] = defaultdict(list)
    for j in shard.judgments:
        by_prompt[j.prompt_id].append(j)
    roles: dict[tuple[str, str], str] = {}
    for pair in shard.pairs:
        roles[(pair.id, pair.chosen_model)] = "chosen"
        roles[(pair.id, pair.rejected_model)] = "rejected"
    prompt_means = {pid: aspect_means([j for j in js if not j.error])
                    for pid, js in by_prompt.items()}  # once per prompt, not per response
    rows = []
    for g in shard.generations:
        p = prompts[g.prompt_id]
        js = by_prompt.get(g.prompt_id, [])
        means = prompt_means.get(g.prompt_id, {}).get(g.model, {})
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
        cons = shard.constraint_results.get((g.prompt_id, g.model))
        row["instruction_id_list"] = p.instruction_ids
        row["constraints_passed"] = cons
        rows.append(row)
    return rows


def judgment_rows(shard: ShardResult) -> list[dict[str, Any]]:
    return [{
        "prompt_id": j.prompt_id, "aspect": j.aspect, "permutation": j.permutation,
        "models": j.models, "order": j.order, "ratings": [_rating_str(r) for r in j.ratings],
        "raw": j.raw, "error": j.error, "attempts": j.attempts, "judge": j.judge,
    } for j in shard.judgments]


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


#: the C allocator, not Arrow's default mimalloc/jemalloc pool: those keep a shard's freed
#: buffers mapped, which put ~40 MB on a sharded run's peak RSS (bench/pipeline_memory.py)
POOL = pa.system_memory_pool()


def rows_table(lines: bytes, schema: pa.Schema) -> pa.Table:
    """The table of ``lines`` (one orjson-encoded row per line) in ``schema``.

    Parsed by Arrow's JSON reader rather than ``pa.Table.from_pylist``: every Python-object
    path into Arrow (``from_pylist``, ``pa.array``) imports pandas on first use (0.45 s of a
    run's tail) to ask whether the object is a Series; this path never does. Keys outside
    ``schema`` are ignored and missing ones are null, as ``from_pylist`` does; the one block
    spans every line, so no row is cut at a block boundary.
    """
    if not lines:
        return pa.Table.from_batches([], schema=schema)  # empty_table() imports pandas
    read = pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    block = pa_json.ReadOptions(block_size=len(lines) + 1)
    return pa_json.read_json(io.BytesIO(lines), read_options=block, parse_options=read,
                             memory_pool=POOL)


class TableSink:
    """One output table written shard by shard to hidden temporary files, renamed into
    place on ``close``: readers never see a half-written parquet. ``close`` then removes
    anything else in the folder, so no stale parquet is read along with the new one."""

    def __init__(self, folder: Path, schema: pa.Schema, jsonl: bool) -> None:
        self.folder = folder
        self.parquet = AtomicFile(folder / "train.parquet")
        self.jsonl = AtomicFile(folder.with_suffix(".jsonl")) if jsonl else None
        self.schema = schema
        self.writer: pq.ParquetWriter | None = None  # opened on first use: a run that fails
        # before its first shard leaves the folder untouched

    def _open(self) -> pq.ParquetWriter:
        if self.writer is None:
            self.writer = pq.ParquetWriter(self.parquet.open(), self.schema, memory_pool=POOL)
            if self.jsonl is not None:
                self.jsonl.open().write_bytes(b"")
        return self.writer

    def write(self, rows: list[dict[str, Any]]) -> int:
        """Append ``rows``; return their size in bytes (as ``datasets`` counts num_bytes)."""
        lines = b"".join(orjson.dumps(r) + b"\n" for r in rows)
        table = rows_table(lines, self.schema)
        writer = self._open()
        if table.num_rows:  # a row group of 0 rows makes ``datasets`` fail (batch size 0)
            writer.write_table(table)
        if self.jsonl is not None:
            with self.jsonl.tmp.open("ab") as f:
                f.write(lines)
        return int(table.nbytes)

    def close(self) -> None:
        self._open().close()
        self.parquet.commit()
        if self.jsonl is not None:
            self.jsonl.commit()
        remove_stale(self.folder, {self.parquet.path.name})


def write_table(rows: list[dict[str, Any]], folder: Path, schema: pa.Schema,
                jsonl: bool = True) -> int:
    """A whole table at once (``prefsynth mix``); returns its size in bytes."""
    sink = TableSink(folder, schema, jsonl)
    nbytes = sink.write(rows)
    sink.close()
    return nbytes


class OutputWriter:
    """Streams a run's output: ``add`` each shard's records as they are done, ``close`` with
    the run's summed ``RunSummary`` to write ``run.json`` and the card."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.out = cfg.output_dir
        self.pairs = TableSink(self.out / "pairs", PAIR_SCHEMA, jsonl=True)
        self.annotations = TableSink(self.out / "annotations",
                                     annotation_schema(list(cfg.judge.aspects)), jsonl=True)
        self.judgments = TableSink(self.out / "judgments", JUDGMENT_SCHEMA, jsonl=False)
        self.pairs_num_bytes = 0
        self.panel_ratings: list[Judgment] = []  # compact copies, only with a judge panel

    def add(self, shard: ShardResult) -> None:
        self.pairs_num_bytes += self.pairs.write(pair_rows(shard))
        self.annotations.write(annotation_rows(shard, self.cfg))
        self.judgments.write(judgment_rows(shard))
        if self.cfg.panel:  # agreement needs every rating; the summary only adds counts
            self.panel_ratings.extend(
                Judgment(j.prompt_id, j.aspect, j.models, j.ratings, [], j.order,
                         error=j.error, judge=j.judge) for j in shard.judgments)

    def close(self, summary: RunSummary, prompts: PromptStats,
              curation: dict[str, Any] | None = None) -> RunFacts:
        """Put every table in place and write ``run.json`` and the card from ``summary``
        (the sum of every shard's) and the prompt counts."""
        from prefsynth.output.card import render_card

        for sink in (self.pairs, self.annotations, self.judgments):
            sink.close()
        (self.out / MARKER).mkdir(parents=True, exist_ok=True)
        agreement = judge_agreement(self.panel_ratings) if self.cfg.panel else None
        facts = run_facts(self.cfg, summary, prompts, pairs_num_bytes=self.pairs_num_bytes,
                          agreement=agreement, curation=curation)
        facts.save(self.out / "run.json")
        write_text(self.out / "README.md", render_card(facts, PAIR_SCHEMA))
        return facts
