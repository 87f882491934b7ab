"""What curation did, for run.json (``curation_facts``) and the card (``curation_markdown``).

The facts hold counts, rules, thresholds and a few matches by id; no text of a removed
prompt, and no eval text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from prefsynth.records import Prompt, stable_hash

if TYPE_CHECKING:
    from prefsynth.stages.curate import Curator

TOKENIZER = ("lowercased words: maximal runs of Unicode word characters (regex \\w+ on the "
             "lowercased text); punctuation and whitespace only separate tokens; no model")
RULE = ("a prompt is removed when the n-grams it shares with one eval instance cover more "
        "than `threshold` of that instance's tokens (or all of them); n-grams never span two "
        "user turns; every user turn of a prompt counts")


def curation_facts(cur: Curator, kept: Sequence[Prompt]) -> dict[str, Any]:
    st = cur.stats
    facts: dict[str, Any] = {
        "prompts_in": st.prompts_in,
        "kept": st.kept,
        "removed": {"exact_dup": st.exact_dup, "eval_overlap": dict(st.eval_overlap),
                    "near_dup": st.near_dup, "sampled_out": st.sampled_out},
        "order": ["exact_dup", "eval_overlap", "near_dup", "sampled_out"],
        "tokenizer": TOKENIZER,
        "decontaminate": None,
        "near_dup": cur.near.facts if cur.near is not None else None,
        "sample": cur.sample_facts,
        "examples": cur.examples,
        "kept_ids_hash": stable_hash([p.id for p in kept]),
    }
    if cur.index is not None and cur.spec.decontaminate is not None:
        from prefsynth.stages.curate.decontaminate import MIN_SHORT_TOKENS

        idx = cur.index
        facts["decontaminate"] = {
            "ngram": idx.n, "threshold": idx.threshold, "rule": RULE,
            "min_short_tokens": MIN_SHORT_TOKENS,
            "evals": [{"name": name, "origin": origin, "field": fld,
                       "instances": idx.instances[name], "ngrams": idx.ngrams[name],
                       "short_instances": idx.short[name], "skipped_instances": idx.skipped[name],
                       "removed": st.eval_overlap.get(name, 0)}
                      for name, origin, fld in cur.eval_sets],
        }
    return facts


def curation_markdown(facts: dict[str, Any]) -> str:
    """The card's "Prompt curation" section."""
    rm = facts["removed"]
    out = ["## Prompt curation\n",
           f"{facts['prompts_in']} prompts after exact deduplication "
           f"({rm['exact_dup']} exact duplicates removed at load); **{facts['kept']} kept**. "
           "Steps run in the order of the table; each removed prompt is counted once, under "
           "the first step that removed it.\n",
           "| step | rule | removed |\n|---|---|---:|",
           f"| exact duplicates | identical messages | {rm['exact_dup']} |"]
    d = facts.get("decontaminate")
    if d:
        for e in d["evals"]:
            out.append(f"| eval overlap: `{e['name']}` | {d['ngram']}-gram coverage of one "
                       f"instance > {d['threshold']:g} | {e['removed']} |")
    nd = facts.get("near_dup")
    if nd:
        out.append(f"| near duplicates | MinHash Jaccard ≥ {nd['threshold']:g} over "
                   f"{nd['ngram']}-word shingles ({nd['num_perm']} permutations, LSH "
                   f"{nd['bands']} bands × {nd['rows']} rows, {nd['library']}) | "
                   f"{rm['near_dup']} |")
    sp = facts.get("sample")
    if sp:
        how = (", ".join(f"`{k}`: {v}" for k, v in sp["per_source"].items())
               if sp["per_source"] is not None else f"{sp['total']} in total")
        out.append(f"| source-balanced sampling | {how} (seed {sp['seed']}) | "
                   f"{rm['sampled_out']} |")
    out.append("")
    if d:
        out.append(f"Decontamination rule: {d['rule']}. Tokenizer: {facts['tokenizer']}. "
                   f"An instance shorter than {d['ngram']} tokens matches when it appears "
                   f"whole in a user turn; one shorter than {d['min_short_tokens']} tokens is "
                   "not checked.\n")
        out.append("| eval set | source | field | instances | n-grams | short | not checked |\n"
                   "|---|---|---|---:|---:|---:|---:|")
        for e in d["evals"]:
            out.append(f"| `{e['name']}` | {e['origin']} | `{e['field']}` | {e['instances']} | "
                       f"{e['ngrams']} | {e['short_instances']} | {e['skipped_instances']} |")
        out.append("")
        ex = facts["examples"]["eval_overlap"]
        if ex:
            out.append("First matches (prompt ids from the input; removed prompts appear "
                       "nowhere in this dataset):\n\n| prompt | source | eval set | eval "
                       "instance | covered |\n|---|---|---|---|---:|")
            for m in ex:
                out.append(f"| `{m['prompt_id']}` | {m['source'] or '–'} | `{m['eval_set']}` | "
                           f"`{m['eval_id']}` | {m['ratio']:.0%} |")
            out.append("")
    ex = facts["examples"]["near_dup"]
    if ex:
        out.append("First near duplicates (removed → the earlier prompt kept): "
                   + ", ".join(f"`{m['prompt_id']}` → `{m['matched_prompt_id']}`" for m in ex)
                   + "\n")
    if sp and sp["shortfall"]:
        out.append("Sources with fewer prompts than asked (all kept): "
                   + ", ".join(f"`{k}` {v['available']} of {v['wanted']}"
                               for k, v in sp["shortfall"].items()) + "\n")
    return "\n".join(out) + "\n"
