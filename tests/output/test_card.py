"""The dataset card says what the data is: every number is checked against the files written.

One fake run with five models under five licences (permissive, model-output terms,
non-commercial, share-alike), a failing model and a failing judge, so the card has failed
responses and several drop reasons to report.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from prefsynth.config import parse_config
from prefsynth.core.pipeline import run
from prefsynth.output.card import licence_info, render_card
from prefsynth.output.facts import RunFacts
from prefsynth.output.writer import PAIR_SCHEMA
from tests.conftest import fake_config


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("card")
    cfg = fake_config(tmp)
    cfg["models"].append({"name": "e", "backend": "fake", "model": "fe", "license": "cc-by-sa-4.0",
                          "options": {"fail_rate": 0.3}})
    cfg["judge"]["options"] = {"fail_rate": 0.05}
    cfg["judge"]["max_reasks"] = 0
    config = parse_config(cfg)
    run(config)
    return tmp / "out", config.model_dump(mode="json")


def front_matter(card: str) -> dict[str, Any]:
    m = re.match(r"\A---\n(.*?)\n---\n", card, re.S)
    assert m, "card must start with a YAML front matter block"
    meta = yaml.safe_load(m.group(1))
    assert isinstance(meta, dict)
    return meta


def section(card: str, title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", card, re.S | re.M)
    assert m, f"no '## {title}' section"
    return m.group(1)


def table_rows(text: str) -> list[list[str]]:
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]  # skip header + rule


def read(out: Path) -> tuple[str, RunFacts, list[dict[str, Any]], list[dict[str, Any]]]:
    card = (out / "README.md").read_text(encoding="utf-8")
    facts = RunFacts.load(out / "run.json")
    pairs = pq.read_table(out / "pairs").to_pylist()
    ann = pq.read_table(out / "annotations").to_pylist()
    return card, facts, pairs, ann


def test_front_matter(out: tuple[Path, dict[str, Any]]) -> None:
    card, _, pairs, _ = read(out[0])
    meta = front_matter(card)
    assert meta["license"] == "other" and meta["license_name"] == "mixed"  # five licences
    assert meta["task_categories"] == ["text-generation"]
    assert meta["size_categories"] == ["n<1K"]
    configs = {c["config_name"]: c["data_files"] for c in meta["configs"]}
    assert configs == {"default": [{"split": "train", "path": "pairs/*.parquet"}],
                       "annotations": [{"split": "train", "path": "annotations/*.parquet"}]}
    info = meta["dataset_info"]
    assert info["splits"][0]["name"] == "train"
    assert info["splits"][0]["num_examples"] == len(pairs) > 0
    names = [f["name"] for f in info["features"]]
    assert names == pq.read_schema(out[0] / "pairs" / "train.parquet").names
    # no YAML anchors: `datasets` pops keys from the parsed feature dicts, and an alias shared
    # by chosen/rejected made load_dataset(<repo>) fail with KeyError: 'name'
    assert "&id" not in card and "*id" not in card


def test_card_features_are_the_parquet_features(out: tuple[Path, dict[str, Any]],
                                                tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    card, _, pairs, _ = read(out[0])
    feats = datasets.Features._from_yaml_list(copy.deepcopy(
        front_matter(card)["dataset_info"]["features"]))
    cache = str(tmp_path)
    local = datasets.load_dataset("parquet", data_dir=str(out[0] / "pairs"),
                                  cache_dir=cache)["train"]
    assert feats == local.features
    # the folder read the way the Hub reads a repo: README configs + dataset_info applied
    repo = datasets.load_dataset(str(out[0]), cache_dir=cache)
    assert repo["train"].features == local.features and repo["train"].num_rows == len(pairs)
    ann = datasets.load_dataset(str(out[0]), "annotations", cache_dir=cache)["train"]
    assert ann.num_rows == pq.read_metadata(out[0] / "annotations" / "train.parquet").num_rows


def test_split_size_is_checked_by_datasets_when_num_bytes_is_known(
        out: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    """With ``pairs_num_bytes`` in the facts the card's split is complete, so ``datasets``
    verifies num_examples against the files: a wrong count cannot go unnoticed."""
    datasets = pytest.importorskip("datasets")
    _, facts, _, _ = read(out[0])
    cache, tmp_path = str(tmp_path / "cache"), tmp_path / "data"
    (tmp_path / "pairs").mkdir(parents=True)
    (tmp_path / "pairs" / "train.parquet").write_bytes(
        (out[0] / "pairs" / "train.parquet").read_bytes())
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.parquet").write_bytes(
        (out[0] / "annotations" / "train.parquet").read_bytes())
    facts = facts.model_copy(update={"pairs_num_bytes": 12345})
    (tmp_path / "README.md").write_text(render_card(facts, PAIR_SCHEMA), encoding="utf-8")
    d = datasets.load_dataset(str(tmp_path), cache_dir=cache)
    assert d["train"].info.splits["train"].num_examples == facts.pairs
    facts.pairs += 1
    (tmp_path / "README.md").write_text(render_card(facts, PAIR_SCHEMA), encoding="utf-8")
    with pytest.raises(datasets.exceptions.NonMatchingSplitsSizesError):
        datasets.load_dataset(str(tmp_path), cache_dir=cache, download_mode="force_redownload")


def test_models_table_matches_the_data(out: tuple[Path, dict[str, Any]]) -> None:
    card, facts, pairs, ann = read(out[0])
    chosen = Counter(p["chosen_model"] for p in pairs)
    rejected = Counter(p["rejected_model"] for p in pairs)
    responses = Counter(a["model"] for a in ann if a["response"] is not None)
    rows = {r[0]: r for r in table_rows(section(card, "Models"))}
    assert len(rows) == len(out[1]["models"]) == 5
    for m in out[1]["models"]:
        row = rows[f"`{m['name']}` (`{m['model']}`)"]
        assert row[2] == licence_info(m["license"])[0]
        assert int(row[3]) == responses[m["name"]] > 0
        assert int(row[5].split()[0]) == chosen[m["name"]]
        assert int(row[6].split()[0]) == rejected[m["name"]]
    assert sum(chosen.values()) == len(pairs)
    failed = Counter(a["model"] for a in ann if a["response"] is None)
    assert {m.name: m.failed for m in facts.models if m.failed} == dict(failed)
    assert failed["e"] > 0


def test_licence_caveats_flag_the_terms(out: tuple[Path, dict[str, Any]]) -> None:
    card = read(out[0])[0]
    rows = {r[0]: r for r in table_rows(section(card, "Licence caveats"))}
    assert "**non-commercial**" in rows["CC BY-NC 4.0"][2] and rows["CC BY-NC 4.0"][1] == "c"
    assert "**share-alike**" in rows["CC BY-SA 4.0"][2] and rows["CC BY-SA 4.0"][1] == "e"
    assert "**model-output terms**" in rows["Llama 3.1 Community License"][2]
    openai = rows["OpenAI Terms of Use / Services Agreement"]
    assert openai[1] == "judge (judge)" and "**model-output terms**" in openai[2]
    assert openai[2].endswith("([terms](https://openai.com/policies/terms-of-use))")
    for permissive in ("Apache 2.0", "MIT"):
        assert rows[permissive][2] == "permissive"


def test_dropped_by_reason_matches_run_json(out: tuple[Path, dict[str, Any]]) -> None:
    card, facts, pairs, _ = read(out[0])
    line = re.search(r"^- dropped prompts by reason: (.*)$", section(card, "Prompts in, pairs out"),
                     re.M)
    assert line
    shown = dict((k, int(v)) for k, v in (x.split(": ") for x in line.group(1).split(", ")))
    assert shown == facts.dropped
    assert {"generation_failed", "judgment_failed"} <= set(shown)
    assert facts.prompts.kept == len(pairs) + sum(shown.values())


def test_config_block_is_the_config(out: tuple[Path, dict[str, Any]]) -> None:
    card = read(out[0])[0]
    m = re.search(r"^## Config\n\n```yaml\n(.*?)^```", card, re.S | re.M)
    assert m
    assert yaml.safe_load(m.group(1)) == out[1]


def test_single_licence_and_unknown_licence(out: tuple[Path, dict[str, Any]]) -> None:
    facts = read(out[0])[1]
    same = facts.model_copy(deep=True)
    for m in same.models:
        m.license = "apache-2.0"
    same.judge.license = "apache-2.0"
    meta = front_matter(render_card(same, PAIR_SCHEMA))
    assert meta["license"] == "apache-2.0" and "license_name" not in meta
    odd = facts.model_copy(deep=True)
    odd.models[0].license = "my-own-terms"
    rows = {r[0]: r for r in table_rows(section(render_card(odd, PAIR_SCHEMA),
                                                "Licence caveats"))}
    assert "unknown" in rows["my-own-terms"][2] and "check it" in rows["my-own-terms"][2]


def test_single_run_card_has_no_mixture_sections(out: tuple[Path, dict[str, Any]]) -> None:
    card = read(out[0])[0]
    assert "## Parts" not in card and "## Judges" not in card and "## Judge\n" in card


def test_position_bias_called_out_only_when_large() -> None:
    from prefsynth.output.card import position_spread

    assert position_spread({"honesty": [1.0, 2.1], "helpfulness": [3.0, 3.2]}) == 2.1 - 1.0
    assert position_spread({"honesty": [None, 2.0]}) is None


def test_card_warns_about_position_bias(tmp_path: Path) -> None:
    cfg = fake_config(tmp_path)
    run(parse_config(cfg), limit=4)
    facts = RunFacts.load(Path(cfg["output"]) / "run.json")
    facts.position_means = {"helpfulness": [1.0, 1.96]}
    assert "**Position bias:**" in render_card(facts, PAIR_SCHEMA)
    facts.position_means = {"helpfulness": [3.0, 3.1]}
    assert "**Position bias:**" not in render_card(facts, PAIR_SCHEMA)


# --- the template renders today's card; every value is escaped --------------------------------

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize(("facts", "card"), [("run_legacy.json", "card_legacy.md"),
                                             ("run_legacy_mix.json", "card_legacy_mix.md")])
def test_template_renders_the_card_prefsynth_wrote_before(facts: str, card: str) -> None:
    """``card_legacy*.md`` are the cards prefsynth wrote (before the template) for the facts
    beside them: the same facts render the same bytes. Deliberate changes since: the names
    and caveats of licences with model-output terms come from ``output/licenses.py``, with a
    link to the terms (the OpenAI and Llama 3.1 rows)."""
    from prefsynth.output.mixture import MERGED_PAIR_SCHEMA

    loaded = RunFacts.load(DATA / facts)
    schema = MERGED_PAIR_SCHEMA if "mix" in facts else PAIR_SCHEMA
    assert render_card(loaded, schema) == (DATA / card).read_text(encoding="utf-8")


def test_features_follow_the_parquet_schema() -> None:
    """The card's feature list is derived from the schema, as ``datasets`` writes it."""
    import pyarrow as pa

    from prefsynth.output.card import dataset_features
    from prefsynth.output.writer import JUDGMENT_SCHEMA, annotation_schema

    datasets = pytest.importorskip("datasets")
    odd = pa.schema([("s", pa.struct([("a", pa.int32()), ("b", pa.list_(pa.float32()))])),
                     ("ll", pa.list_(pa.list_(pa.string()))), ("u", pa.uint8())])
    for schema in (PAIR_SCHEMA, annotation_schema(["helpfulness"]), JUDGMENT_SCHEMA, odd):
        assert dataset_features(schema) == \
            datasets.Features.from_arrow_schema(schema)._to_yaml_list()


EVIL_SOURCE = "x` <img src=x onerror=alert(1)> `y"


def _evil_facts() -> RunFacts:
    facts = RunFacts.load(DATA / "run_legacy.json")
    facts.name = "run <script>alert(1)</script>\n# not a heading"
    facts.sources = {EVIL_SOURCE: 5, "a|b": 4, "``": 1}
    facts.models[0].name = "a`|`b"
    facts.models[0].backend = "x | y <b>"
    facts.models[1].license = "my <b>own</b> | terms\nsecond line"
    facts.dropped = {"why|<i>": 2}
    facts.judge.model = "j`\n<img src=y>"
    facts.config = {"note": "```\n</code><img src=z>\n```"}
    return facts


def test_card_escapes_every_value() -> None:
    """A prompt source with backticks broke out of a code span into raw HTML; the card
    parsed as the Hub does (CommonMark + tables) shows the values as text."""
    markdown_it = pytest.importorskip("markdown_it")
    card = render_card(_evil_facts(), PAIR_SCHEMA)
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(card)
    assert "<img" not in html and "<script" not in html and "<b>" not in html
    assert "<i>" not in html
    assert "onerror=alert(1)" in html  # as text, inside a code span
    assert f"<code>{EVIL_SOURCE.replace('<', '&lt;').replace('>', '&gt;')}</code>" in html
    for title, cols in (("Models", 7), ("Licence caveats", 3)):
        for row in table_rows(section(card, title)):
            assert len(row) >= cols  # escaped pipes do not split a cell
    models = markdown_it.MarkdownIt("commonmark").enable("table").render(section(card, "Models"))
    assert "<code>a`|`b</code>" in models
    assert "<h1>run &lt;script&gt;alert(1)&lt;/script&gt; # not a heading</h1>" in html
    # the config block is fenced by more backticks than it contains
    m = re.search(r"^## Config\n\n(`{3,})yaml\n(.*?)^\1$", card, re.S | re.M)
    assert m and len(m.group(1)) == 4
    assert yaml.safe_load(m.group(2)) == {"note": "```\n</code><img src=z>\n```"}


def test_markdown_escapes() -> None:
    from prefsynth.output.card import code, md, tcode

    assert md("a|b<c>`d`*e*[f](g)&amp;\\") == "a\\|b\\<c\\>\\`d\\`\\*e\\*\\[f\\](g)\\&amp;\\\\"
    assert md("two\nlines\r\nhere") == "two lines here"
    assert code("plain") == "`plain`"
    assert code("a`b") == "``a`b``"
    assert code("`x`") == "`` `x` ``"
    assert code("a|b") == "`a|b`" and tcode("a|b") == "`a\\|b`"
    assert code("") == "` `"


def test_incomplete_run_says_so_with_the_failed_count() -> None:
    facts = RunFacts.load(DATA / "run_legacy.json")
    assert "Incomplete run" not in render_card(facts, PAIR_SCHEMA)
    facts.complete = False
    assert "> **Incomplete run:** some requests were still pending when" in render_card(
        facts, PAIR_SCHEMA)
    facts.failed_requests = 3  # failures alone: the partial line, not the pending banner
    card = render_card(facts, PAIR_SCHEMA)
    assert "> **Partial run** (partial: 3 failed requests, rerun `prefsynth run`" in card
    assert "Incomplete run" not in card
    facts.pending_requests = 2  # both
    card = render_card(facts, PAIR_SCHEMA)
    assert "Partial run" in card and "Incomplete run" in card


def _with_models(*models: tuple[str, str]) -> RunFacts:
    """The legacy facts with their first pool models' (model id, licence) replaced."""
    facts = RunFacts.load(DATA / "run_legacy.json")
    for m, (model, lic) in zip(facts.models, models, strict=False):
        m.model, m.license = model, lic
    return facts


def test_a_model_left_at_unknown_gets_the_terms_its_model_id_implies() -> None:
    card = render_card(_with_models(("claude-3-5-sonnet-20241022", "unknown"),
                                    ("mystery-model", "unknown")), PAIR_SCHEMA)
    rows = {r[0]: r for r in table_rows(section(card, "Licence caveats"))}
    claude = rows["Anthropic Commercial Terms of Service"]
    assert claude[1] == "a (from the model id)" and "**model-output terms**" in claude[2]
    assert "anthropic.com/legal/commercial-terms" in claude[2]
    assert "check it" in rows["unknown"][2] and rows["unknown"][1] == "b"
    models = {r[0]: r for r in table_rows(section(card, "Models"))}
    assert models["`a` (`claude-3-5-sonnet-20241022`)"][2] == \
        "Anthropic Commercial Terms of Service (from the model id)"
    assert "Licence check" not in card


def test_a_licence_contradicting_the_model_id_is_called_out() -> None:
    card = render_card(_with_models(("claude-3-5-sonnet-20241022", "apache-2.0")), PAIR_SCHEMA)
    caveats = section(card, "Licence caveats")
    assert ("> **Licence check:** claude-3-5-sonnet-20241022 is an Anthropic model (Anthropic "
            "Commercial Terms of Service), but its license is set to 'apache-2.0'.") in caveats
    assert caveats.count("Licence check") == 1


def test_llama3_outputs_may_not_improve_other_models() -> None:
    """Llama 3.0 (unlike 3.1) forbids using outputs to improve other LLMs; the card once said
    only that derived models carry 'Llama' in their name."""
    name, flags, note = licence_info("llama3")
    assert name == "Meta Llama 3 Community License" and flags == {"outputs"}
    assert "may not be used to improve other large language models" in note
    assert "improve other" not in licence_info("llama3.1")[2]


def test_models_on_an_api_without_a_seed_are_named_as_not_replayable() -> None:
    facts = RunFacts.load(DATA / "run_legacy.json")
    assert "replayable" not in render_card(facts, PAIR_SCHEMA)
    facts.not_reproducible = ["c", "judge"]
    models = section(render_card(facts, PAIR_SCHEMA), "Models")
    assert ("> **Not replayable bit-for-bit:** `c`, `judge` ran on an API that takes no seed, "
            "so running this config again from scratch gets other answers from them.") in models
