"""``prefsynth mix``: one mixture dataset from several output folders, as Tulu 3 combines subsets.

The Tulu 3 preference mixture is a concatenation of subsets (on-policy, off-policy, IF, …) in
which ``source`` names the subset a row came from. ``merge_outputs`` does the same with
prefsynth output folders:

- pairs of every part, in the order given, with ``source`` set to the part's name; when a
  row's original ``source`` (the prompt set it came from) differs from the part name, it is
  kept in an extra ``source_detail`` column rather than lost;
- a prompt that appears in more than one part (same roles and contents after line-end,
  trailing-whitespace and Unicode normalisation) is kept once, from the first part, so the
  mixture never trains on one prompt twice with two different preferences; the removals are
  counted per part;
- annotations of the kept pairs only, labelled the same way, so every annotation row joins a
  pair on ``(source, prompt_id)``;
- ``run.json`` as ``MixtureFacts``: a run's facts plus ``parts`` and ``judges``, and the
  dataset card rendered from it by ``card.render_card``.

Per-model chosen/rejected counts and response counts are recomputed from the merged data
rather than summed from the parts' ``run.json``: after de-duplication the sums would no longer
describe the rows in the folder, and the card must.
"""

from __future__ import annotations

import shutil
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from prefsynth.errors import InputError
from prefsynth.output.facts import (
    JudgeFacts,
    MixtureFacts,
    ModelFacts,
    Part,
    PartJudge,
    PromptCounts,
    RunFacts,
    StageFacts,
    UsageFacts,
)
from prefsynth.output.files import MARKER, claim_output_dir, write_text
from prefsynth.output.writer import PAIR_SCHEMA, write_table
from prefsynth.records import Message, stable_hash

SOURCE_DETAIL = "source_detail"
MERGED_PAIR_SCHEMA = PAIR_SCHEMA.append(pa.field(SOURCE_DETAIL, pa.string()))

PartData = tuple[RunFacts, pa.Table, pa.Table | None]  # run.json, pairs, annotations


def _read_part(path: Path) -> PartData:
    """run.json, pairs and (optional) annotations of one output folder, or ``InputError``."""
    if not path.is_dir():
        raise InputError(f"{path}: not a prefsynth output folder (no such directory)")
    run_json, pairs_dir = path / "run.json", path / "pairs"
    if not run_json.is_file() or not any(pairs_dir.glob("*.parquet")):
        raise InputError(f"{path}: not a prefsynth output folder (needs run.json and "
                         "pairs/*.parquet)")
    facts = RunFacts.load(run_json)
    try:
        pairs = pq.read_table(pairs_dir)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"{path}: unreadable output folder ({e})") from e
    missing = [n for n in PAIR_SCHEMA.names if n not in pairs.column_names]
    if missing:
        raise InputError(f"{path}: pairs lack column(s) {', '.join(missing)}")
    ann_dir = path / "annotations"
    ann = pq.read_table(ann_dir) if any(ann_dir.glob("*.parquet")) else None
    return facts, pairs.select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA), ann


def _norm(text: str) -> str:
    """Unicode NFC, ``\n`` line ends, no trailing spaces, no blank ends. Inner whitespace is
    kept: in code prompts indentation is meaning, and two such prompts are different tasks."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    return "\n".join(line.rstrip() for line in text.strip().split("\n"))


def prompt_messages(row: dict[str, Any]) -> list[Message]:
    """The prompt turns of a pair: the common prefix of chosen and rejected, short of the
    final answer (the Tulu 3 layout carries the user turn(s) inside both)."""
    chosen, rejected = row["chosen"] or [], row["rejected"] or []
    n = 0
    while (n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]):
        n += 1
    return chosen[:n] or [{"role": "user", "content": row["prompt"] or ""}]


def prompt_key(messages: Sequence[Message]) -> str:
    """Identity of a prompt across parts: roles plus normalised contents. Line-end, trailing
    whitespace and Unicode-normalisation differences do not make a prompt new; anything else
    does."""
    return stable_hash([[m["role"], _norm(m["content"])] for m in messages], length=32)


def _judge_identity(facts: RunFacts) -> str:
    """What makes ratings comparable: same judge(s), aspects, mode, temperature, orders."""
    j = facts.judge
    return stable_hash([j.backend, j.model, j.license, j.aspects, j.mode, j.temperature,
                        j.permutations, [[p.backend, p.model] for p in facts.panel]])


def _merge_models(parts: list[tuple[str, RunFacts]], pairs: list[dict[str, Any]],
                  ann: pa.Table | None, ann_parts: set[str]) -> list[ModelFacts]:
    """Models by name across parts. A name that means two different models (or licences) in
    two parts would misattribute rows and licences, so it is refused."""
    merged: dict[str, ModelFacts] = {}
    owner: dict[str, str] = {}
    for pname, facts in parts:
        for m in facts.models:
            old = merged.get(m.name)
            if old is None:
                merged[m.name] = m.model_copy(update={"responses": 0, "failed": 0})
                owner[m.name] = pname
                old = merged[m.name]
            elif (old.backend, old.model, old.license) != (m.backend, m.model, m.license):
                raise InputError(
                    f"model name {m.name!r} means {old.model} ({old.license}) in part "
                    f"{owner[m.name]!r} but {m.model} ({m.license}) in part "
                    f"{pname!r}: rename one before mixing")
            if pname not in ann_parts:  # no annotations to count from: trust run.json
                old.responses += m.responses
                old.failed += m.failed
    if ann is not None and ann.num_rows:
        cols = ann.select(["model", "response"]).to_pydict()
        for model, resp in zip(cols["model"], cols["response"], strict=True):
            if model in merged:
                if resp is not None:
                    merged[model].responses += 1
                else:
                    merged[model].failed += 1
    chosen = Counter(p["chosen_model"] for p in pairs)
    rejected = Counter(p["rejected_model"] for p in pairs)
    for name, m in merged.items():
        m.chosen, m.rejected = chosen.get(name, 0), rejected.get(name, 0)
    return list(merged.values())


def _label(table: pa.Table, part: str, detail: bool) -> pa.Table:
    """Set ``source`` to the part name (in place, column order kept); keep the original in
    ``source_detail`` when asked, so no provenance is lost."""
    n = table.num_rows
    names = table.column_names
    original = table.column("source") if "source" in names else pa.nulls(n, pa.string())
    if SOURCE_DETAIL in names:
        table = table.drop_columns([SOURCE_DETAIL])
    labelled = pa.array([part] * n, pa.string())
    if "source" in table.column_names:
        table = table.set_column(table.column_names.index("source"), "source", labelled)
    else:
        table = table.append_column("source", labelled)
    if detail:
        table = table.append_column(SOURCE_DETAIL, original.cast(pa.string()))
    return table


def _check(paths: list[Path], out: Path, names: Sequence[str] | None) -> None:
    if not paths:
        raise InputError("mix: no input folders given")
    if names is not None and len(names) != len(paths):
        raise InputError(f"mix: {len(names)} name(s) given for {len(paths)} input folder(s)")
    for p in paths:
        rp, ro = p.resolve(), out.resolve()
        if rp == ro or rp in ro.parents or ro in rp.parents:
            raise InputError(f"{out}: the output folder overlaps input {p}")


def _labels(read: list[PartData], paths: list[Path], names: Sequence[str] | None) -> list[str]:
    labels = list(names) if names is not None else [f.name for f, _, _ in read]
    seen: dict[str, Path] = {}
    for label, p in zip(labels, paths, strict=True):
        if label in seen:
            raise InputError(f"{p}: part name {label!r} already used by {seen[label]}; "
                             "give each part its own name")
        seen[label] = p
    return labels


def _dedup(read: list[PartData], labels: list[str], detail: bool
           ) -> tuple[list[dict[str, Any]], dict[str, list[str]], list[Part]]:
    """Every part's pairs in order, a prompt kept from the first part that has it: the kept
    rows, the kept pair ids per part, and each part's counts."""
    seen: set[str] = set()
    pairs: list[dict[str, Any]] = []
    kept_ids: dict[str, list[str]] = {}
    parts: list[Part] = []
    for (facts, table, _), label in zip(read, labels, strict=True):
        rows = _label(table, label, detail).to_pylist()
        dup = 0
        kept_ids[label] = []
        for row in rows:
            key = prompt_key(prompt_messages(row))
            if key in seen:
                dup += 1
                continue
            seen.add(key)
            pairs.append(row)
            kept_ids[label].append(row["id"])
        parts.append(Part(name=label, pairs=len(rows), duplicates=dup, kept=len(rows) - dup,
                          prompts=facts.prompts.kept, judge=facts.judge.model,
                          seed=facts.seed, pairing=facts.pairing))
    return pairs, kept_ids, parts


def _annotations(read: list[PartData], labels: list[str], kept_ids: dict[str, list[str]],
                 detail: bool) -> pa.Table | None:
    """The annotations of the kept pairs only, labelled like the pairs."""
    tables = []
    for (_, _, ann), label in zip(read, labels, strict=True):
        if ann is None:
            continue
        keep = pc.is_in(ann.column("prompt_id"), value_set=pa.array(kept_ids[label], pa.string()))
        tables.append(_label(ann.filter(keep), label, detail))
    return pa.concat_tables(tables, promote_options="permissive") if tables else None


def merge_outputs(inputs: Sequence[str | Path], output: str | Path, *,
                  names: Sequence[str] | None = None, name: str | None = None,
                  force: bool = False) -> MixtureFacts:
    """Write the mixture of ``inputs`` (prefsynth output folders) to ``output``; return its
    facts (also written to ``output/run.json`` and rendered into ``output/README.md``).

    ``names`` label the parts (the ``source`` column); by default each part's run name.
    ``name`` titles the mixture; by default the output folder's name. Raises ``InputError``
    for a missing or malformed input, clashing part names, an output inside an input, or a
    non-empty output folder that is not a prefsynth output (unless ``force``).
    """
    from prefsynth.output.card import render_card

    paths = [Path(p) for p in inputs]
    out = Path(output)
    _check(paths, out, names)
    read = [_read_part(p) for p in paths]
    labels = _labels(read, paths, names)
    detail = any(
        pc.any(pc.not_equal(pc.fill_null(t.column("source"), ""), label)).as_py()
        for (_, t, _), label in zip(read, labels, strict=True) if t.num_rows)
    pairs, kept_ids, parts = _dedup(read, labels, detail)
    ann = _annotations(read, labels, kept_ids, detail)

    claim_output_dir(out, force)
    schema = MERGED_PAIR_SCHEMA if detail else PAIR_SCHEMA
    num_bytes = write_table([{k: r.get(k) for k in schema.names} for r in pairs],
                            out / "pairs", schema)
    if ann is not None:
        write_table(ann.to_pylist(), out / "annotations", ann.schema)
    _remove_absent(out, annotations=ann is not None)

    part_facts = [(label, f) for (f, _, _), label in zip(read, labels, strict=True)]
    ann_parts = {label for (_, _, a), label in zip(read, labels, strict=True) if a is not None}
    facts = _merged_facts(part_facts, pairs, parts, ann, ann_parts, name or out.resolve().name,
                          paths)
    facts.pairs_num_bytes = num_bytes
    facts.save(out / "run.json")
    write_text(out / "README.md", render_card(facts, schema))
    return facts


def _remove_absent(out: Path, annotations: bool) -> None:
    """A mixture has no judgments, and annotations only when a part has them: what an
    earlier write left there would be read (and pushed) as this mixture's."""
    stale = [out / "judgments"] + ([] if annotations else [out / "annotations"])
    for folder in stale:
        if folder.is_dir():
            shutil.rmtree(folder)
        folder.with_suffix(".jsonl").unlink(missing_ok=True)
    (out / MARKER).mkdir(parents=True, exist_ok=True)


def _sum_stages(all_facts: list[RunFacts]) -> dict[str, StageFacts]:
    out: dict[str, StageFacts] = {}
    for f in all_facts:
        for name, s in f.stages.items():
            acc = out.setdefault(name, StageFacts())
            acc.total += s.total
            acc.cached += s.cached
            acc.answered += s.answered
            acc.failed += s.failed
            acc.pending += s.pending
            acc.usage = UsageFacts(
                prompt_tokens=acc.usage.prompt_tokens + s.usage.prompt_tokens,
                completion_tokens=acc.usage.completion_tokens + s.usage.completion_tokens)
            acc.errors = dict(Counter(acc.errors) + Counter(s.errors))
    return out


def _merged_judge(all_facts: list[RunFacts], same_judge: bool) -> JudgeFacts:
    """The first part's judge; with one judge throughout, its counts over every part."""
    judge = all_facts[0].judge.model_copy(deep=True)
    if same_judge:
        judge.judgments = sum(f.judge.judgments for f in all_facts)
        judge.reasks = sum(f.judge.reasks for f in all_facts)
        judge.failed = dict(sum((Counter(f.judge.failed) for f in all_facts), Counter()))
    return judge


def _merged_facts(part_facts: list[tuple[str, RunFacts]], pairs: list[dict[str, Any]],
                  parts: list[Part], ann: pa.Table | None, ann_parts: set[str],
                  name: str, paths: list[Path]) -> MixtureFacts:
    """The merged ``run.json``: a run's facts, so the card and the report read it unchanged,
    plus ``parts`` and ``judges`` for what only a mixture has."""
    all_facts = [f for _, f in part_facts]
    first = all_facts[0]
    same_judge = len({_judge_identity(f) for f in all_facts}) == 1
    dropped: Counter[str] = Counter()
    for f in all_facts:
        dropped.update(f.dropped)

    def common(value: Any) -> Any:
        vals = {orjson.dumps(value(f), option=orjson.OPT_SORT_KEYS) for f in all_facts}
        return value(first) if len(vals) == 1 else None

    return MixtureFacts(
        name=name,
        prompts=PromptCounts(read=sum(f.prompts.read for f in all_facts),
                             duplicates=sum(f.prompts.duplicates for f in all_facts),
                             kept=sum(f.prompts.kept for f in all_facts)),
        pairs=len(pairs),
        dropped=dict(dropped.most_common()),
        complete=all(f.complete for f in all_facts),
        failed_requests=sum(f.failed_requests for f in all_facts),
        models=_merge_models(part_facts, pairs, ann, ann_parts),
        judge=_merged_judge(all_facts, same_judge),
        panel=list(first.panel) if same_judge else [],
        agreement=[],  # per-rating data is not merged; see each part's run.json
        position_means={},
        pairing=first.pairing,
        responses_per_prompt=common(lambda f: f.responses_per_prompt),
        on_policy=common(lambda f: f.on_policy),
        seed=first.seed,
        not_reproducible=list(dict.fromkeys(n for f in all_facts for n in f.not_reproducible)),
        stages=_sum_stages(all_facts),
        sources=dict(Counter(p["source"] for p in pairs)),
        config={"mix": {"parts": [{"name": label, "path": str(p)}
                                  for (label, _), p in zip(part_facts, paths, strict=True)],
                        "dedup": "normalised prompt messages; the first part keeps a prompt"},
                "runs": {label: f.config for label, f in part_facts}},
        parts=parts,
        judges=[PartJudge(part=label, name=f.judge.name, backend=f.judge.backend,
                          model=f.judge.model, license=f.judge.license,
                          aspects=f.judge.aspects, mode=f.judge.mode,
                          panel=[p.model for p in f.panel]) for label, f in part_facts],
        judges_differ=not same_judge,
    )
