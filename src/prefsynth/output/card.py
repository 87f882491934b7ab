"""The dataset card (``OUTDIR/README.md``), written from the run's facts, Hugging Face format.

Pure: ``render_card(facts)`` takes the dict ``export.summary`` builds (also saved as
``run.json``) and returns Markdown with YAML front matter. The licence table flags the terms
people who check licences care about: non-commercial, share-alike, and terms on model outputs.
"""

from __future__ import annotations

from typing import Any

import yaml

from prefsynth.stages.pairs import position_spreads

#: licence id -> (display name, flags); flags: nc (non-commercial), sa (share-alike),
#: outputs (the licence restricts how the model's outputs may be used)
LICENSES: dict[str, tuple[str, set[str], str]] = {
    "apache-2.0": ("Apache 2.0", set(), ""),
    "mit": ("MIT", set(), ""),
    "bsd-3-clause": ("BSD 3-Clause", set(), ""),
    "odc-by": ("ODC-BY", set(), ""),
    "cc-by-4.0": ("CC BY 4.0", set(), ""),
    "cc-by-sa-4.0": ("CC BY-SA 4.0", {"sa"}, "derivatives must be shared alike"),
    "cc-by-nc-4.0": ("CC BY-NC 4.0", {"nc"}, "non-commercial use only"),
    "cc-by-nc-sa-4.0": ("CC BY-NC-SA 4.0", {"nc", "sa"}, "non-commercial, share-alike"),
    "llama2": ("Llama 2 Community License", {"outputs"},
               "outputs may not be used to improve other large language models"),
    "llama3": ("Llama 3 Community License", {"outputs"},
               "models trained on outputs must carry 'Llama' in their name; 700M MAU limit"),
    "llama3.1": ("Llama 3.1 Community License", {"outputs"},
                 "models trained on outputs must carry 'Llama' in their name; 700M MAU limit"),
    "llama3.3": ("Llama 3.3 Community License", {"outputs"},
                 "models trained on outputs must carry 'Llama' in their name; 700M MAU limit"),
    "gemma": ("Gemma Terms of Use", {"outputs"},
              "use restrictions apply to models trained on outputs (Gemma prohibited-use policy)"),
    "qwen": ("Qwen License", {"outputs"}, "commercial use above 100M MAU needs a licence"),
    "mistral-research": ("Mistral Research License", {"nc"}, "research use only"),
    "openai": ("OpenAI Terms of Use", {"outputs"},
               "outputs may not be used to develop models that compete with OpenAI"),
    "anthropic": ("Anthropic Terms", {"outputs"},
                  "outputs may not be used to build competing models"),
}


def licence_info(lic: str) -> tuple[str, set[str], str]:
    return LICENSES.get(lic.lower(), (lic, {"unknown"}, "licence not in prefsynth's table: check it"))


class _NoAliasDumper(yaml.SafeDumper):
    """Never writes ``&id001``/``*id001``: ``datasets`` parses the card's features by popping
    keys from the loaded dicts, so an alias shared by ``chosen`` and ``rejected`` breaks
    ``load_dataset(<repo>)`` with ``KeyError: 'name'``."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False)


def _judges(facts: dict[str, Any]) -> list[dict[str, Any]]:
    """Every judge whose ratings are in the data: the judge, its panel, and (for a mixture)
    each part's judge."""
    return [facts["judge"], *facts.get("panel", []), *facts.get("judges", [])]


#: a spread of mean rating across shown positions at or above this is called out in the card
POSITION_WARNING = 0.5


def position_spread(pos: dict[str, list[float | None]]) -> float | None:
    """Largest (max - min) mean rating across positions over aspects; None without data."""
    return max(position_spreads(pos).values(), default=None)


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
                        (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def _front_matter(facts: dict[str, Any]) -> str:
    lics = {m["license"].lower() for m in facts["models"] if m["responses"]}
    lics.update(j["license"].lower() for j in _judges(facts))
    licence = lics.pop() if len(lics) == 1 else "other"
    msg = [{"name": "role", "dtype": "string"}, {"name": "content", "dtype": "string"}]
    meta: dict[str, Any] = {
        "license": licence,
        "task_categories": ["text-generation"],
        "language": ["en"],
        "tags": ["dpo", "preference", "synthetic", "prefsynth"],
        "size_categories": [_size_category(facts["pairs"])],
        "configs": [
            {"config_name": "default", "data_files": [{"split": "train", "path": "pairs/*.parquet"}]},
            {"config_name": "annotations",
             "data_files": [{"split": "train", "path": "annotations/*.parquet"}]},
        ],
        "dataset_info": {
            "features": [
                {"name": "id", "dtype": "string"}, {"name": "prompt", "dtype": "string"},
                {"name": "chosen", "list": msg}, {"name": "rejected", "list": msg},
                {"name": "chosen_rating", "dtype": "float64"},
                {"name": "rejected_rating", "dtype": "float64"},
                {"name": "chosen_model", "dtype": "string"},
                {"name": "rejected_model", "dtype": "string"},
                {"name": "source", "dtype": "string"},
                *facts.get("extra_pair_features", []),
            ],
            # ``datasets`` only reads (and checks) num_examples when num_bytes is there too
            "splits": [{"name": "train",
                        **({"num_bytes": facts["pairs_num_bytes"]}
                           if "pairs_num_bytes" in facts else {}),
                        "num_examples": facts["pairs"]}],
        },
    }
    if licence == "other":
        meta["license_name"] = "mixed"
        meta["license_details"] = "Responses come from models under different licences; see the table below."
    return "---\n" + _dump(meta) + "---\n"


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "–"


def _mixture_intro(facts: dict[str, Any]) -> str:
    """Intro for a ``prefsynth mix`` output: what the parts are, not one run's recipe."""
    parts = facts["parts"]
    judges = sorted({j["model"] for j in facts.get("judges", [])}) or [facts["judge"]["model"]]
    dups = sum(p["duplicates"] for p in parts)
    return (f"A synthetic preference dataset of **{facts['pairs']} chosen/rejected pairs**, a "
            f"mixture of {len(parts)} prefsynth runs "
            f"combined the way the Tulu 3 preference mixture combines its subsets: the `source` "
            f"column names the part each row comes from (see *Parts*). Rated by "
            + ", ".join(f"`{m}`" for m in judges)
            + f"; {dups} pairs whose prompt already appeared in an earlier part were removed.\n")


def _judges_section(facts: dict[str, Any]) -> str:
    """A mixture rated by different judges: say so first, since the ratings of two judges
    are not on one scale and should only be compared within a part."""
    rows = ["\n## Judges\n\n> **The parts were rated by different judges.** Ratings from "
            "different judges are not on one scale: compare `chosen_rating`/`rejected_rating` "
            "only within a part (`source`).\n\n| part | judge | backend | licence | aspects | "
            "mode | panel |\n|---|---|---|---|---|---|---|"]
    for j in facts["judges"]:
        rows.append(f"| {j['part']} | `{j['model']}` | {j['backend']} | "
                    f"{licence_info(j['license'])[0]} | {', '.join(j['aspects'])} | {j['mode']} | "
                    f"{', '.join(f'`{p}`' for p in j.get('panel', [])) or '–'} |")
    return "\n".join(rows) + "\n"


def _parts_section(facts: dict[str, Any]) -> str:
    """Per-part provenance of a mixture: pairs in, cross-part duplicates removed, pairs kept."""
    rows = ["## Parts\n\nPrompts are compared across parts by their normalised message list; a "
            "prompt already present in an earlier part is removed from later ones.\n\n"
            "| part (`source`) | prompts | pairs | duplicates removed | pairs kept | judge |\n"
            "|---|---:|---:|---:|---:|---|"]
    for p in facts["parts"]:
        rows.append(f"| `{p['name']}` | {p.get('prompts', '–')} | {p['pairs']} | "
                    f"{p['duplicates']} | {p['kept']} | `{p.get('judge', '–')}` |")
    if any(f["name"] == "source_detail" for f in facts.get("extra_pair_features", [])):
        rows.append("\nThe original `source` of each row (the prompt set it came from) is kept "
                    "in `source_detail`.")
    pols = {repr(p.get("pairing")) for p in facts["parts"]}
    seeds = {p.get("seed") for p in facts["parts"]}
    if len(pols) > 1 or len(seeds) > 1:
        rows.append("\nThe parts differ in pairing policy or seed; *Pairing policy* below "
                    "describes the first part, each part's `run.json` config the others.")
    return "\n".join(rows) + "\n"


def render_card(facts: dict[str, Any]) -> str:
    models = [m for m in facts["models"] if m["responses"] or m["failed"]]
    total_resp = sum(m["responses"] for m in models)
    n = facts["pairs"]
    judge = facts["judge"]
    pol = facts["pairing"]
    out = [_front_matter(facts), f"# {facts['name']}\n"]
    if facts.get("parts"):
        out.append(_mixture_intro(facts))
    else:
        out.append(
            f"A synthetic preference dataset of **{n} chosen/rejected pairs** built by "
            f"prefsynth the way the Tulu 3 preference "
            f"mixture "
            f"was made: {facts['prompts']['kept']} prompts, "
            + (f"one on-policy response from `{facts['on_policy']}` against one from another pool "
               "model" if facts["on_policy"] else
               f"{facts['responses_per_prompt']} responses per prompt from distinct pool models")
            + f", rated by `{judge['model']}` on {len(judge['aspects'])} aspects "
            f"({', '.join(judge['aspects'])}).\n")
    failed = facts.get("failed_requests", 0)
    if failed:
        out.append(f"> **Partial run** (partial: {failed} failed requests, rerun "
                   "`prefsynth run` to retry them).\n")
    if not facts.get("complete", True) and (facts.get("pending_requests") or not failed):
        out.append("> **Incomplete run:** some requests were still pending when this card was "
                   "written (see *Prompts in, pairs out*). Rerun `prefsynth run` to finish.\n")
    out.append("## Models\n\n| model | backend | licence | responses | share | chosen | rejected |\n"
               "|---|---|---|---:|---:|---:|---:|")
    for m in models:
        name, _, _ = licence_info(m["license"])
        out.append(f"| `{m['name']}` (`{m['model']}`) | {m['backend']} | {name} | {m['responses']} | "
                   f"{_pct(m['responses'], total_resp)} | {m['chosen']} ({_pct(m['chosen'], n)}) | "
                   f"{m['rejected']} ({_pct(m['rejected'], n)}) |")
    if facts.get("judges_differ"):
        out.append(_judges_section(facts))
    else:
        out.append(f"\n## Judge\n\n- model: `{judge['model']}` ({judge['backend']}, licence: "
                   f"{licence_info(judge['license'])[0]}), temperature {judge['temperature']}\n"
                   f"- aspects: {', '.join(judge['aspects'])} (UltraFeedback templates; "
                   f"mode: {judge['mode']})\n- responses shuffled before judging; "
                   f"{judge['permutations']} order(s) per comparison\n"
                   f"- {judge['judgments']} judgments, {judge['reasks']} re-asks, failures: "
                   + (", ".join(f"{k}: {v}" for k, v in judge["failed"].items()) or "none")
                   + "\n")
    if facts.get("panel"):
        out.append("Judge panel (ratings averaged over all judges): "
                   + ", ".join(f"`{j['model']}` ({licence_info(j['license'])[0]})"
                               for j in facts["panel"]) + "\n")
        if facts.get("agreement"):
            out.append("| aspect | judges | n | Spearman ρ | Kendall τ-b |\n|---|---|---:|---:|---:|")
            for a in facts["agreement"]:
                rho, tau = a["spearman"], a["kendall_tau_b"]
                out.append(f"| {a['aspect']} | {' vs '.join(a['judges'])} | {a['n']} | "
                           f"{'–' if rho is None else f'{rho:.2f}'} | "
                           f"{'–' if tau is None else f'{tau:.2f}'} |")
            out.append("")
    pos = facts.get("position_means") or {}
    if pos:
        out.append("Mean rating by position shown to the judge (position bias check):\n\n"
                   "| aspect | " + " | ".join(f"text {i + 1}" for i in range(max(map(len, pos.values()))))
                   + " |\n|---|" + "---:|" * max(map(len, pos.values())))
        for a, vals in pos.items():
            out.append(f"| {a} | " + " | ".join("–" if v is None else f"{v:.2f}" for v in vals) + " |")
        out.append("")
        spread = position_spread(pos)
        if spread is not None and spread >= POSITION_WARNING:
            out.append(f"> **Position bias:** this judge's mean rating differs by {spread:.2f} "
                       "between positions. Responses were shuffled, so the bias does not follow "
                       "any model, but it adds noise to every pair; judge each comparison in "
                       "several orders (`judge.permutations`) or use a stronger judge.\n")
    out.append(
        f"## Pairing policy\n\n- score = {pol['aggregate']} over aspects (N/A and missing ratings "
        f"excluded{', weights ' + str(pol['weights']) if pol['weights'] else ''})\n"
        f"- chosen = highest score; rejected = "
        f"{'a random strictly lower response' if pol['rejected'] == 'random_lower' else 'the lowest response'}"
        f", at least {pol['min_margin']} lower\n- constraints: {pol['constraints']}\n"
        f"- seed: {facts['seed']}\n")
    out.append(f"## Prompts in, pairs out\n\n- prompts read: {facts['prompts']['read']} "
               f"({facts['prompts']['duplicates']} exact duplicates removed)\n"
               f"- pairs: {n}\n- dropped prompts by reason: "
               + (", ".join(f"{k}: {v}" for k, v in facts["dropped"].items()) or "none") + "\n")
    if facts.get("sources"):
        out.append("Pairs by source: " + ", ".join(f"`{k or '(none)'}`: {v}"
                                                   for k, v in facts["sources"].items()) + "\n")
    if facts.get("parts"):
        out.append(_parts_section(facts))
    out.append("## Licence caveats\n\n| licence | used by | terms to check |\n|---|---|---|")
    used: dict[str, list[str]] = {}
    for m in models:
        used.setdefault(m["license"].lower(), []).append(m["name"])
    for j in _judges(facts):
        who = used.setdefault(j["license"].lower(), [])
        if f"{j['name']} (judge)" not in who:
            who.append(f"{j['name']} (judge)")
    for lic, who in used.items():
        name, flags, note = licence_info(lic)
        tag = ", ".join(sorted(f.replace("nc", "**non-commercial**").replace("sa", "**share-alike**")
                               .replace("outputs", "**model-output terms**") for f in flags))
        out.append(f"| {name} | {', '.join(who)} | {tag + ': ' if tag else ''}{note or 'permissive'} |")
    out.append("\nThe dataset is released under the licence above for the prompts and the "
               "structure; each response is also subject to the terms of the model that wrote it, "
               "and the ratings to the terms of the judge.\n")
    out.append("## Use\n\n```python\nfrom datasets import load_dataset\n"
               "pairs = load_dataset(\"parquet\", data_dir=\"pairs\")[\"train\"]\n"
               "annotations = load_dataset(\"parquet\", data_dir=\"annotations\")[\"train\"]\n"
               "```\n\nTrain with TRL (conversational preference format: `chosen`/`rejected` message "
               "lists):\n\n```python\nfrom trl import DPOConfig, DPOTrainer\n"
               "trainer = DPOTrainer(model=model, args=DPOConfig(output_dir=\"dpo\"), "
               "train_dataset=pairs.select_columns([\"chosen\", \"rejected\"]), "
               "processing_class=tokenizer)\n```\n\n`chosen`/`rejected` include the user turn "
               "(the Tulu 3 layout): give TRL those two columns (it extracts the shared prompt), "
               "or `pairs.map(trl.maybe_extract_prompt)`; don't pass the string `prompt` column "
               "beside them.\n")
    out.append("## Config\n\n```yaml\n" + _dump(facts["config"]) + "```\n")
    return "\n".join(out)
