"""``merge_outputs``: a Tulu-3-style mixture of output folders, checked against the files.

Part "alpha" runs the 57 example prompts; part "beta" runs 20 of them again (new ids, CRLF
line ends and trailing spaces, another source name) plus 5 new prompts, under another judge.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pyarrow.parquet as pq
import pytest
import yaml

from prefsynth.config import parse_config
from prefsynth.core.pipeline import run
from prefsynth.errors import InputError
from prefsynth.output.mixture import merge_outputs, prompt_key, prompt_messages
from tests.conftest import EXAMPLE_PROMPTS, fake_config


def _beta_prompts(path: Path) -> Path:
    rows = [json.loads(line) for line in EXAMPLE_PROMPTS.read_text(encoding="utf-8").splitlines()]
    out = []
    for r in rows[:20]:
        out.append({"id": f"beta-{r['id']}", "prompt": r["prompt"].replace("\n", "\r\n") + "  \n",
                    "source": "beta-set"})
    for i in range(5):
        out.append({"id": f"beta-new-{i}", "prompt": f"New question number {i}: why is the sky "
                    "blue at noon and red at sunset?", "source": "beta-set"})
    path.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("parts")
    a = fake_config(tmp / "a", name="alpha")
    b = fake_config(tmp / "b", prompts=_beta_prompts(tmp / "beta.jsonl"), name="beta", seed=3)
    b["judge"] = {**b["judge"], "model": "fj2"}
    run(parse_config(a))
    run(parse_config(b))
    return tmp / "a" / "out", tmp / "b" / "out"


@pytest.fixture(scope="module")
def mixed(parts: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("mix") / "mixture"
    merge_outputs(list(parts), out)
    return out


def _pairs(folder: Path) -> list[dict[str, Any]]:
    return pq.read_table(folder / "pairs").to_pylist()


def test_no_prompt_twice_and_source_per_part(parts: tuple[Path, Path], mixed: Path) -> None:
    pairs = _pairs(mixed)
    keys = [prompt_key(prompt_messages(p)) for p in pairs]
    assert len(keys) == len(set(keys))
    a, b = _pairs(parts[0]), _pairs(parts[1])
    a_keys = {prompt_key(prompt_messages(p)) for p in a}
    dup_b = sum(prompt_key(prompt_messages(p)) in a_keys for p in b)
    assert dup_b > 10  # CRLF + trailing spaces did not hide the repeats
    assert Counter(p["source"] for p in pairs) == {"alpha": len(a), "beta": len(b) - dup_b}
    assert [p["id"] for p in pairs[:len(a)]] == [p["id"] for p in a]  # order kept, first wins
    # the original prompt-set name differs from the part name, so it is kept
    assert {p["source_detail"] for p in pairs if p["source"] == "alpha"} == {"prefsynth-examples"}
    assert {p["source_detail"] for p in pairs if p["source"] == "beta"} == {"beta-set"}
    # the JSONL copy is the same data
    jsonl = [orjson.loads(line) for line in (mixed / "pairs.jsonl").read_bytes().splitlines()]
    assert jsonl == pairs


def test_annotations_only_for_kept_pairs(parts: tuple[Path, Path], mixed: Path) -> None:
    pairs = _pairs(mixed)
    ann = pq.read_table(mixed / "annotations").to_pylist()
    kept = {(p["source"], p["id"]) for p in pairs}
    assert {(a["source"], a["prompt_id"]) for a in ann} == kept
    per_pair = Counter((a["source"], a["prompt_id"]) for a in ann)
    assert set(per_pair.values()) == {4}  # responses_per_prompt
    for p in pairs[:5]:
        roles = {a["model"]: a["role"] for a in ann if (a["source"], a["prompt_id"]) == (
            p["source"], p["id"])}
        assert roles[p["chosen_model"]] == "chosen" and roles[p["rejected_model"]] == "rejected"


def test_merged_facts_and_card_match_the_data(parts: tuple[Path, Path], mixed: Path) -> None:
    pairs = _pairs(mixed)
    ann = pq.read_table(mixed / "annotations").to_pylist()
    facts = orjson.loads((mixed / "run.json").read_bytes())
    part_facts = [orjson.loads((p / "run.json").read_bytes()) for p in parts]
    assert facts["pairs"] == len(pairs)
    assert [p["name"] for p in facts["parts"]] == ["alpha", "beta"]
    sources = Counter(p["source"] for p in pairs)
    for p, pf in zip(facts["parts"], part_facts, strict=True):
        assert p["pairs"] == pf["pairs"] and p["kept"] == sources[p["name"]]
        assert p["duplicates"] == p["pairs"] - p["kept"]
    assert facts["parts"][0]["duplicates"] == 0 and facts["parts"][1]["duplicates"] > 10
    assert facts["prompts"]["kept"] == sum(pf["prompts"]["kept"] for pf in part_facts)
    dropped: Counter[str] = Counter()
    for pf in part_facts:
        dropped.update(pf["dropped"])
    assert facts["dropped"] == dict(dropped)
    assert facts["judges_differ"] and {j["model"] for j in facts["judges"]} == {"fj", "fj2"}

    card = (mixed / "README.md").read_text(encoding="utf-8")
    meta = yaml.safe_load(re.match(r"\A---\n(.*?)\n---\n", card, re.S).group(1))  # type: ignore[union-attr]
    assert meta["dataset_info"]["splits"][0]["num_examples"] == len(pairs)
    assert [f["name"] for f in meta["dataset_info"]["features"]] == \
        pq.read_schema(mixed / "pairs" / "train.parquet").names
    chosen = Counter(p["chosen_model"] for p in pairs)
    rejected = Counter(p["rejected_model"] for p in pairs)
    responses = Counter(a["model"] for a in ann if a["response"] is not None)
    models = re.search(r"^## Models\n(.*?)^## ", card, re.S | re.M).group(1)  # type: ignore[union-attr]
    for name in "abcd":
        row = next(r for r in models.splitlines() if r.startswith(f"| `{name}` "))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert int(cells[3]) == responses[name]
        assert int(cells[5].split()[0]) == chosen[name]
        assert int(cells[6].split()[0]) == rejected[name]
    parts_sec = re.search(r"^## Parts\n(.*?)^## ", card, re.S | re.M).group(1)  # type: ignore[union-attr]
    for p in facts["parts"]:
        assert (f"| `{p['name']}` | {p['prompts']} | {p['pairs']} | {p['duplicates']} | "
                f"{p['kept']} |") in parts_sec
    assert "different judges" in card and "`fj2`" in card
    assert "source_detail" in parts_sec


def test_mixture_loads_like_a_hub_repo(mixed: Path, tmp_path: Path) -> None:
    """``datasets`` applies the card (configs, features, split size incl. num_bytes) and
    checks num_examples against the files."""
    datasets = pytest.importorskip("datasets")
    d = datasets.load_dataset(str(mixed), cache_dir=str(tmp_path))["train"]
    assert d.num_rows == len(_pairs(mixed)) and "source_detail" in d.column_names
    assert d.info.splits["train"].num_examples == d.num_rows
    ann = datasets.load_dataset(str(mixed), "annotations", cache_dir=str(tmp_path))["train"]
    assert set(ann["source"]) == {"alpha", "beta"}


def test_same_judge_is_merged_and_names_override(parts: tuple[Path, Path], tmp_path: Path) -> None:
    facts = merge_outputs([parts[0]], tmp_path / "one", names=["prefsynth-examples"], name="solo")
    pairs = _pairs(tmp_path / "one")
    assert "source_detail" not in pairs[0]  # part name == original source: nothing to keep
    assert {p["source"] for p in pairs} == {"prefsynth-examples"}
    assert facts.name == "solo" and not facts.judges_differ
    single = orjson.loads((parts[0] / "run.json").read_bytes())
    assert facts.judge.judgments == single["judge"]["judgments"]
    assert [m.chosen for m in facts.models] == [m["chosen"] for m in single["models"]]
    card = (tmp_path / "one" / "README.md").read_text(encoding="utf-8")
    assert "## Judge\n" in card and "different judges" not in card


def test_bad_inputs(parts: tuple[Path, Path], tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(InputError, match=re.escape(str(missing))) as err:
        merge_outputs([parts[0], missing], tmp_path / "o")
    assert "\n" not in str(err.value)
    no_run = tmp_path / "no-run"
    shutil.copytree(parts[0] / "pairs", no_run / "pairs")
    with pytest.raises(InputError, match=re.escape(str(no_run))):
        merge_outputs([no_run], tmp_path / "o")
    no_pairs = tmp_path / "no-pairs"
    no_pairs.mkdir()
    shutil.copy(parts[0] / "run.json", no_pairs / "run.json")
    with pytest.raises(InputError, match=re.escape(str(no_pairs))):
        merge_outputs([no_pairs], tmp_path / "o")
    with pytest.raises(InputError, match="already used"):
        merge_outputs([parts[0], parts[0]], tmp_path / "o")
    with pytest.raises(InputError, match="overlaps"):
        merge_outputs([parts[0]], parts[0] / "sub")
    with pytest.raises(InputError, match="2 name"):
        merge_outputs([parts[0]], tmp_path / "o", names=["x", "y"])
    assert not (tmp_path / "o").exists()


def test_model_name_meaning_two_models_is_refused(parts: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(parts[1], other, ignore=shutil.ignore_patterns(".prefsynth"))
    facts = orjson.loads((other / "run.json").read_bytes())
    facts["models"][0]["model"] = "something-else"
    (other / "run.json").write_bytes(orjson.dumps(facts))
    with pytest.raises(InputError, match="model name 'a'"):
        merge_outputs([parts[0], other], tmp_path / "o")


def test_report_on_a_mixture(tmp_path: Path) -> None:
    """A mixture has no judgments/ folder; its report still renders, and says so."""
    from prefsynth.config import parse_config
    from prefsynth.core.pipeline import run
    from prefsynth.tools.report import write_report
    from tests.conftest import fake_config

    outs = []
    for seed in (1, 2):
        cfg = fake_config(tmp_path / f"run{seed}", seed=seed)
        cfg["name"] = f"part{seed}"
        run(parse_config(cfg), limit=6)
        outs.append(cfg["output"])
    from prefsynth.output.mixture import merge_outputs

    merge_outputs(outs, tmp_path / "mixed")
    path, text = write_report(tmp_path / "mixed")
    assert path.is_file() and "0 judgments" in text
    assert "No judgments." in path.read_text()
