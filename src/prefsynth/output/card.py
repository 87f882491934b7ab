"""The dataset card (``OUTDIR/README.md``), written from the run's facts, Hugging Face format.

Pure: ``render_card(facts, schema)`` takes the ``RunFacts`` saved as ``run.json`` and the
schema of ``pairs/*.parquet`` and returns Markdown with YAML front matter, rendered from
``templates/card.md.jinja``. The front matter's feature list is derived from that schema, so
it cannot drift from the files. Every value from the data is escaped (``md``, ``code``): a
prompt source with a backtick once broke out of a code span into raw HTML. The licence table
flags the terms people who check licences care about: non-commercial, share-alike, and terms
on model outputs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import jinja2
import pyarrow as pa
import yaml

from prefsynth.output.facts import MixtureFacts, ModelFacts, RunFacts
from prefsynth.output.licenses import TERMS, licence_mismatch, output_terms
from prefsynth.stages.pairs import position_spreads

#: licence id -> (display name, flags, note) for the licences without model-output terms in
#: ``output.licenses.TERMS`` (those come from there, with a link); flags: nc (non-commercial),
#: sa (share-alike), outputs (the licence restricts how the model's outputs may be used)
LICENSES: dict[str, tuple[str, set[str], str]] = {
    "apache-2.0": ("Apache 2.0", set(), ""),
    "mit": ("MIT", set(), ""),
    "bsd-3-clause": ("BSD 3-Clause", set(), ""),
    "odc-by": ("ODC-BY", set(), ""),
    "cc-by-4.0": ("CC BY 4.0", set(), ""),
    "cc-by-sa-4.0": ("CC BY-SA 4.0", {"sa"}, "derivatives must be shared alike"),
    "cc-by-nc-4.0": ("CC BY-NC 4.0", {"nc"}, "non-commercial use only"),
    "cc-by-nc-sa-4.0": ("CC BY-NC-SA 4.0", {"nc", "sa"}, "non-commercial, share-alike"),
    "qwen": ("Qwen License", {"outputs"}, "commercial use above 100M MAU needs a licence"),
    "mistral-research": ("Mistral Research License", {"nc"}, "research use only"),
}
#: a licence id that says nothing: the model id decides the output terms (``output_terms``)
UNKNOWN = frozenset({"", "unknown"})


def licence_info(lic: str) -> tuple[str, set[str], str]:
    """(display name, flags, note) of a configured licence id."""
    key = lic.strip().lower()
    terms = TERMS.get(key)
    if terms is not None:
        return terms.name, {"outputs"}, terms.caveat
    return LICENSES.get(key, (lic, {"unknown"}, "licence not in prefsynth's table: check it"))


def licence_name(lic: str, model: str = "") -> str:
    """The licence to show beside a model: its own, or, when it is ``unknown``, the terms its
    model id implies (a Claude model left at the default)."""
    if lic.strip().lower() in UNKNOWN:
        terms = output_terms(model, lic)
        if terms is not None:
            return f"{terms.name} (from the model id)"
    return licence_info(lic)[0]


class _NoAliasDumper(yaml.SafeDumper):
    """Never writes ``&id001``/``*id001``: ``datasets`` parses the card's features by popping
    keys from the loaded dicts, so an alias shared by ``chosen`` and ``rejected`` breaks
    ``load_dataset(<repo>)`` with ``KeyError: 'name'``."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _dump(data: Any) -> str:
    return yaml.dump(data, Dumper=_NoAliasDumper, sort_keys=False)


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




# --- escaping: every value from the data goes through one of these -------------------------

_MD_SPECIAL = re.compile(r"([\\`*\[\]|<>&])")
_BACKTICKS = re.compile(r"`+")


def _one_line(value: object) -> str:
    return " ".join(str(value).splitlines()) if value is not None else ""


def md(value: object) -> str:
    """Text for prose or a table cell: one line, Markdown/HTML punctuation backslash-escaped
    (``|`` cannot end a cell, ``<`` cannot open a tag, a backtick cannot open a code span)."""
    return _MD_SPECIAL.sub(r"\\\1", _one_line(value))


def code(value: object, table: bool = False) -> str:
    """An inline code span that holds ``value`` whatever it contains: the fence is longer than
    any backtick run inside. In a table cell a ``|`` is escaped too (GFM splits cells first)."""
    text = _one_line(value)
    fence = "`" * (max(map(len, _BACKTICKS.findall(text)), default=0) + 1)
    if text.startswith("`") or text.endswith("`") or (
            text.startswith(" ") and text.endswith(" ") and text.strip()):
        text = f" {text} "
    if table:
        text = text.replace("|", "\\|")
    return f"{fence}{text or ' '}{fence}"


def tcode(value: object) -> str:
    return code(value, table=True)


def num(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def counts(values: Mapping[str, int]) -> str:
    """``reason: n, reason: n`` (keys escaped), or ``none``."""
    return ", ".join(f"{md(k)}: {v}" for k, v in values.items()) or "none"


def pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "–"


def fenced(text: str, lang: str) -> str:
    """A fenced block that ``text`` cannot close: the fence outgrows its backtick runs."""
    fence = "`" * max(3, max(map(len, _BACKTICKS.findall(text)), default=0) + 1)
    return f"{fence}{lang}\n{text}{fence}"


# --- front matter ----------------------------------------------------------------------------

def _dtype(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "string"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_floating(t):
        return f"float{t.bit_width}"
    if pa.types.is_integer(t):
        return f"{'u' if pa.types.is_unsigned_integer(t) else ''}int{t.bit_width}"
    raise ValueError(f"no dataset feature for arrow type {t}")


def _feature(t: pa.DataType) -> dict[str, Any]:
    """One ``datasets`` feature in the card's YAML form (as ``Features._to_yaml_list``)."""
    if pa.types.is_struct(t):
        return {"struct": [{"name": f.name, **_feature(f.type)} for f in t]}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        inner = _feature(t.value_type)
        if "struct" in inner:
            return {"list": inner["struct"]}
        return {"list": inner.get("dtype", inner)}
    return {"dtype": _dtype(t)}


def dataset_features(schema: pa.Schema) -> list[dict[str, Any]]:
    """The card's ``dataset_info.features``, derived from the parquet schema."""
    return [{"name": f.name, **_feature(f.type)} for f in schema]


def _licence(facts: RunFacts) -> str:
    lics = {m.license.lower() for m in facts.models if m.responses}
    lics.update(j.license.lower() for j in facts.judges_in_data())
    return lics.pop() if len(lics) == 1 else "other"


def front_matter(facts: RunFacts, schema: pa.Schema) -> str:
    licence = _licence(facts)
    split: dict[str, Any] = {"name": "train"}
    # ``datasets`` only reads (and checks) num_examples when num_bytes is there too
    if facts.pairs_num_bytes is not None:
        split["num_bytes"] = facts.pairs_num_bytes
    split["num_examples"] = facts.pairs
    meta: dict[str, Any] = {
        "license": licence,
        "task_categories": ["text-generation"],
        "language": ["en"],
        "tags": ["dpo", "preference", "synthetic", "prefsynth"],
        "size_categories": [_size_category(facts.pairs)],
        "configs": [
            {"config_name": "default", "data_files": [{"split": "train", "path": "pairs/*.parquet"}]},
            {"config_name": "annotations",
             "data_files": [{"split": "train", "path": "annotations/*.parquet"}]},
        ],
        "dataset_info": {"features": dataset_features(schema), "splits": [split]},
    }
    if licence == "other":
        meta["license_name"] = "mixed"
        meta["license_details"] = ("Responses come from models under different licences; see "
                                   "the table below.")
    return "---\n" + _dump(meta) + "---"


# --- the body --------------------------------------------------------------------------------

_FLAGS = {"nc": "**non-commercial**", "sa": "**share-alike**",
          "outputs": "**model-output terms**", "unknown": "unknown"}


def _licence_rows(facts: RunFacts, models: list[ModelFacts]
                  ) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per licence: who uses it (pool models, then judges) and the terms to check;
    and a warning for each licence that contradicts its model id. A model left at
    ``license: unknown`` goes in the row of the terms its model id implies, when prefsynth
    knows them (``output_terms``)."""
    used: dict[str, list[str]] = {}
    warnings: list[str] = []
    entries = [(m.name, m.model, m.license) for m in models]
    entries += [(f"{j.name} (judge)", j.model, j.license) for j in facts.judges_in_data()]
    for who, model, lic in entries:
        key = lic.strip().lower()
        implied = output_terms(model, lic) if key in UNKNOWN else None
        if implied is not None:
            key, who = implied.licence, f"{who} (from the model id)"
        warning = licence_mismatch(model, lic)
        if warning and warning not in warnings:
            warnings.append(warning)
        names = used.setdefault(key, [])
        if who not in names:
            names.append(who)
    rows = []
    for lic, users in used.items():
        name, flags, note = licence_info(lic)
        tag = ", ".join(sorted(_FLAGS[f] for f in flags))
        link = f" ([terms]({TERMS[lic].url}))" if lic in TERMS else ""
        rows.append({"name": name, "used_by": users,
                     "terms": f"{tag + ': ' if tag else ''}{md(note) or 'permissive'}{link}"})
    return rows, warnings


def _mixture_context(facts: RunFacts, schema: pa.Schema) -> dict[str, Any]:
    if not isinstance(facts, MixtureFacts):
        return {"mixture": False}
    pairings = {repr(p.pairing) for p in facts.parts}
    seeds = {p.seed for p in facts.parts}
    return {"mixture": True,
            "mix_judges": sorted({j.model for j in facts.judges}) or [facts.judge.model],
            "mix_duplicates": sum(p.duplicates for p in facts.parts),
            "source_detail": "source_detail" in schema.names,
            "parts_differ": len(pairings) > 1 or len(seeds) > 1}


@functools.cache
def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("prefsynth.output", "templates"),
        undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=True,
        trim_blocks=True, lstrip_blocks=True)
    env.filters.update(md=md, code=code, tcode=tcode, num=num, counts=counts)
    env.globals.update(pct=pct, licence=licence_name)
    return env


def _template() -> jinja2.Template:
    return _env().get_template("card.md.jinja")


def render_curation(facts: Mapping[str, Any]) -> str:
    """The card's "Prompt curation" section, from ``run.json``'s ``curation`` facts."""
    return _env().get_template("curation.md.jinja").render(
        f=facts, rm=facts["removed"], d=facts.get("decontaminate"), nd=facts.get("near_dup"),
        sp=facts.get("sample"))


def render_card(facts: RunFacts, schema: pa.Schema) -> str:
    """The card for ``facts``; ``schema`` is the schema of ``pairs/*.parquet``."""
    models = [m for m in facts.models if m.responses or m.failed]
    positions = facts.position_means
    spread = position_spread(positions)
    licences, licence_warnings = _licence_rows(facts, models)
    return _template().render(
        facts=facts, judge=facts.judge, pairing=facts.pairing, n=facts.pairs, models=models,
        total_responses=sum(m.responses for m in models),
        front_matter=front_matter(facts, schema),
        positions=positions, positions_width=max(map(len, positions.values()), default=0),
        position_spread=spread,
        position_warning=spread is not None and spread >= POSITION_WARNING,
        licences=licences, licence_warnings=licence_warnings,
        config_block=fenced(_dump(facts.config), "yaml"),
        curation=render_curation(facts.curation) if facts.curation else "",
        **_mixture_context(facts, schema))
