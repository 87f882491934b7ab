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
- ``run.json`` in the shape ``export.summary`` produces, plus a ``parts`` list, and the
  dataset card rendered from it by ``card.render_card``.

Per-model chosen/rejected counts and response counts are recomputed from the merged data
rather than summed from the parts' ``run.json``: after de-duplication the sums would no longer
describe the rows in the folder, and the card must.
"""

from __future__ import annotations

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
from prefsynth.output.writer import PAIR_SCHEMA, _atomic, write_table
from prefsynth.records import Message, stable_hash

SOURCE_DETAIL = "source_detail"
MERGED_PAIR_SCHEMA = PAIR_SCHEMA.append(pa.field(SOURCE_DETAIL, pa.string()))


def _read_part(path: Path) -> tuple[dict[str, Any], pa.Table, pa.Table | None]:
    """run.json, pairs and (optional) annotations of one output folder, or ``InputError``."""
    if not path.is_dir():
        raise InputError(f"{path}: not a prefsynth output folder (no such directory)")
    run_json, pairs_dir = path / "run.json", path / "pairs"
    if not run_json.is_file() or not any(pairs_dir.glob("*.parquet")):
        raise InputError(f"{path}: not a prefsynth output folder (needs run.json and "
                         "pairs/*.parquet)")
    try:
        facts = orjson.loads(run_json.read_bytes())
        pairs = pq.read_table(pairs_dir)
    except (orjson.JSONDecodeError, pa.ArrowException, OSError) as e:
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


def _sum_nested(acc: dict[str, Any], add: dict[str, Any]) -> dict[str, Any]:
    for k, v in add.items():
        if isinstance(v, dict):
            acc[k] = _sum_nested(dict(acc.get(k) or {}), v)
        elif isinstance(v, int | float) and not isinstance(v, bool):
            acc[k] = acc.get(k, 0) + v
    return acc


def _judge_identity(facts: dict[str, Any]) -> str:
    """What makes ratings comparable: same judge(s), aspects, mode, temperature, orders."""
    j = facts["judge"]
    return stable_hash([j["backend"], j["model"], j["license"], j["aspects"], j["mode"],
                        j["temperature"], j["permutations"],
                        [[p["backend"], p["model"]] for p in facts.get("panel", [])]])


def _merge_models(parts: list[tuple[str, dict[str, Any]]], pairs: list[dict[str, Any]],
                  ann: pa.Table | None, ann_parts: set[str]) -> list[dict[str, Any]]:
    """Models by name across parts. A name that means two different models (or licences) in
    two parts would misattribute rows and licences, so it is refused."""
    merged: dict[str, dict[str, Any]] = {}
    owner: dict[str, str] = {}
    for pname, facts in parts:
        for m in facts["models"]:
            spec = {k: m[k] for k in ("name", "backend", "model", "license")}
            if m["name"] in merged:
                old = {k: merged[m["name"]][k] for k in spec}
                if old != spec:
                    raise InputError(
                        f"model name {m['name']!r} means {old['model']} ({old['license']}) in part "
                        f"{owner[m['name']]!r} but {m['model']} ({m['license']}) in part "
                        f"{pname!r}: rename one before mixing")
            else:
                merged[m["name"]] = {**spec, "responses": 0, "failed": 0}
                owner[m["name"]] = pname
            if pname not in ann_parts:  # no annotations to count from: trust run.json
                merged[m["name"]]["responses"] += m["responses"]
                merged[m["name"]]["failed"] += m["failed"]
    if ann is not None and ann.num_rows:
        cols = ann.select(["model", "response"]).to_pydict()
        for model, resp in zip(cols["model"], cols["response"], strict=True):
            if model in merged:
                merged[model]["responses" if resp is not None else "failed"] += 1
    chosen = Counter(p["chosen_model"] for p in pairs)
    rejected = Counter(p["rejected_model"] for p in pairs)
    for name, m in merged.items():
        m["chosen"], m["rejected"] = chosen.get(name, 0), rejected.get(name, 0)
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


def merge_outputs(inputs: Sequence[str | Path], output: str | Path, *,
                  names: Sequence[str] | None = None, name: str | None = None) -> dict[str, Any]:
    """Write the mixture of ``inputs`` (prefsynth output folders) to ``output``; return its
    facts (also written to ``output/run.json`` and rendered into ``output/README.md``).

    ``names`` label the parts (the ``source`` column); by default each part's run name.
    ``name`` titles the mixture; by default the output folder's name. Raises ``InputError``
    for a missing or malformed input, clashing part names, or an output inside an input.
    """
    from prefsynth.output.card import render_card

    paths = [Path(p) for p in inputs]
    out = Path(output)
    if not paths:
        raise InputError("mix: no input folders given")
    if names is not None and len(names) != len(paths):
        raise InputError(f"mix: {len(names)} name(s) given for {len(paths)} input folder(s)")
    for p in paths:
        rp, ro = p.resolve(), out.resolve()
        if rp == ro or rp in ro.parents or ro in rp.parents:
            raise InputError(f"{out}: the output folder overlaps input {p}")
    read = [_read_part(p) for p in paths]
    labels = list(names) if names is not None else [f["name"] for f, _, _ in read]
    seen_names: dict[str, Path] = {}
    for label, p in zip(labels, paths, strict=True):
        if label in seen_names:
            raise InputError(f"{p}: part name {label!r} already used by {seen_names[label]}; "
                             "give each part its own name")
        seen_names[label] = p

    detail = any(
        pc.any(pc.not_equal(pc.fill_null(t.column("source"), ""), label)).as_py()
        for (_, t, _), label in zip(read, labels, strict=True) if t.num_rows)

    seen: set[str] = set()
    pairs: list[dict[str, Any]] = []
    kept_ids: dict[str, list[str]] = {}
    parts: list[dict[str, Any]] = []
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
        parts.append({"name": label, "pairs": len(rows), "duplicates": dup,
                      "kept": len(rows) - dup, "prompts": facts["prompts"]["kept"],
                      "judge": facts["judge"]["model"], "seed": facts.get("seed"),
                      "pairing": facts.get("pairing")})

    ann_tables = []
    for (_, _, ann), label in zip(read, labels, strict=True):
        if ann is None:
            continue
        keep = pc.is_in(ann.column("prompt_id"), value_set=pa.array(kept_ids[label], pa.string()))
        ann_tables.append(_label(ann.filter(keep), label, detail))
    ann_all = (pa.concat_tables(ann_tables, promote_options="permissive")
               if ann_tables else None)

    schema = MERGED_PAIR_SCHEMA if detail else PAIR_SCHEMA
    pair_rows = [{k: r.get(k) for k in schema.names} for r in pairs]
    write_table(pair_rows, out / "pairs", schema)
    num_bytes = pa.Table.from_pylist(pair_rows, schema=schema).nbytes
    if ann_all is not None:
        write_table(ann_all.to_pylist(), out / "annotations", ann_all.schema)

    part_facts = [(label, f) for (f, _, _), label in zip(read, labels, strict=True)]
    facts = _merged_facts(part_facts, pairs, parts, ann_all,
                          {label for (_, _, a), label in zip(read, labels, strict=True)
                           if a is not None},
                          name or out.resolve().name, paths, detail)
    facts["pairs_num_bytes"] = num_bytes
    _atomic(out / "run.json",
            lambda t: t.write_bytes(orjson.dumps(facts, option=orjson.OPT_INDENT_2)))
    _atomic(out / "README.md", lambda t: t.write_text(render_card(facts), encoding="utf-8"))
    return facts


def _merged_facts(part_facts: list[tuple[str, dict[str, Any]]], pairs: list[dict[str, Any]],
                  parts: list[dict[str, Any]], ann: pa.Table | None, ann_parts: set[str],
                  name: str, paths: list[Path], detail: bool) -> dict[str, Any]:
    """The merged ``run.json``: ``export.summary``'s shape, so the card and the report read it
    unchanged, plus ``parts`` and ``judges`` for what only a mixture has."""
    first = part_facts[0][1]
    all_facts = [f for _, f in part_facts]
    same_judge = len({_judge_identity(f) for f in all_facts}) == 1
    judge = dict(first["judge"])
    if same_judge:
        judge["judgments"] = sum(f["judge"]["judgments"] for f in all_facts)
        judge["reasks"] = sum(f["judge"]["reasks"] for f in all_facts)
        judge["failed"] = dict(sum((Counter(f["judge"]["failed"]) for f in all_facts),
                                   Counter()))
    prompts: dict[str, int] = {}
    dropped: Counter[str] = Counter()
    stages: dict[str, Any] = {}
    for f in all_facts:
        _sum_nested(prompts, f["prompts"])
        dropped.update(f["dropped"])
        _sum_nested(stages, f.get("stages") or {})

    def common(key: str) -> Any:
        vals = [orjson.dumps(f.get(key), option=orjson.OPT_SORT_KEYS) for f in all_facts]
        return first.get(key) if len(set(vals)) == 1 else None

    facts: dict[str, Any] = {
        "name": name,
        "prompts": prompts,
        "pairs": len(pairs),
        "dropped": dict(dropped.most_common()),
        "complete": all(f.get("complete", True) for f in all_facts),
        "models": _merge_models(part_facts, pairs, ann, ann_parts),
        "judge": judge,
        "panel": first.get("panel", []) if same_judge else [],
        "agreement": [],  # per-rating data is not merged; see each part's run.json
        "position_means": {},
        "pairing": first["pairing"],
        "responses_per_prompt": common("responses_per_prompt"),
        "on_policy": common("on_policy"),
        "seed": first.get("seed"),
        "stages": stages,
        "sources": dict(Counter(p["source"] for p in pairs)),
        "config": {
            "mix": {"parts": [{"name": label, "path": str(p)}
                              for (label, _), p in zip(part_facts, paths, strict=True)],
                    "dedup": "normalised prompt messages; the first part keeps a prompt"},
            "runs": {label: f.get("config") for label, f in part_facts},
        },
        "parts": parts,
        "judges": [{"part": label, **{k: f["judge"][k] for k in
                                      ("name", "backend", "model", "license", "aspects", "mode")},
                    "panel": [p["model"] for p in f.get("panel", [])]}
                   for label, f in part_facts],
        "judges_differ": not same_judge,
    }
    if detail:
        facts["extra_pair_features"] = [{"name": SOURCE_DETAIL, "dtype": "string"}]
    return facts
