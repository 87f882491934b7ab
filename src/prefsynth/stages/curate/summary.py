"""What curation did, for run.json and the card (``curation_facts``; ``output.card`` renders it).

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
