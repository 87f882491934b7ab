"""``run.json`` as ``RunFacts``: old folders load, new ones round-trip, broken ones are one line.

``tests/data/run_legacy*.json`` were written by prefsynth before ``RunFacts`` existed (a
fake-backend run with a judge panel and a failing model, and a mixture of it with another
run); they must keep loading.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson
import pytest

from prefsynth.config import parse_config
from prefsynth.core.pipeline import run
from prefsynth.errors import InputError
from prefsynth.output.facts import MixtureFacts, RunFacts, load_facts, run_facts
from prefsynth.output.mixture import merge_outputs
from prefsynth.records import RunSummary, StageCounts, Usage
from prefsynth.stages.prompts import PromptStats
from prefsynth.tools.report import write_report
from tests.conftest import fake_config

DATA = Path(__file__).resolve().parents[1] / "data"


def test_legacy_run_json_loads() -> None:
    raw = orjson.loads((DATA / "run_legacy.json").read_bytes())
    facts = RunFacts.load(DATA / "run_legacy.json")
    assert type(facts) is RunFacts
    assert facts.name == "legacy-run" and facts.pairs == raw["pairs"] == 9
    assert facts.models[4].name == "e" and facts.models[4].failed == 3
    assert facts.panel[0].model == "fj2" and facts.agreement[0].spearman == 1.0
    assert facts.stages["judge:judge2"].usage.prompt_tokens > 0
    assert facts.complete and facts.failed_requests == 0  # absent then: the default
    # written back, the file has the same keys and values, plus the new fields
    assert orjson.loads(facts.to_json()) == {**raw, "failed_requests": 0, "pending_requests": 0,
                                             "curation": None, "not_reproducible": []}


def test_legacy_mixture_loads() -> None:
    raw = orjson.loads((DATA / "run_legacy_mix.json").read_bytes())
    facts = RunFacts.load(DATA / "run_legacy_mix.json")
    assert isinstance(facts, MixtureFacts) and facts.judges_differ
    assert [p.name for p in facts.parts] == ["legacy-run", "legacy-b"]
    assert facts.parts[1].duplicates == 5 and facts.judges[0].panel == ["fj2"]
    assert MixtureFacts.load(DATA / "run_legacy_mix.json") == facts
    # extra_pair_features is now read from the parquet schema, not kept in run.json
    del raw["extra_pair_features"]
    assert orjson.loads(facts.to_json()) == {**raw, "failed_requests": 0, "pending_requests": 0,
                                             "curation": None, "not_reproducible": []}
    with pytest.raises(InputError, match="parts: Field required"):
        MixtureFacts.load(DATA / "run_legacy.json")


def test_new_run_json_round_trips(tmp_path: Path) -> None:
    cfg = fake_config(tmp_path)
    result = run(parse_config(cfg), limit=5)
    path = Path(cfg["output"]) / "run.json"
    facts = RunFacts.load(path)
    assert facts == result.facts
    assert facts.to_json() == path.read_bytes()
    assert set(orjson.loads(path.read_bytes())) == set(
        orjson.loads((DATA / "run_legacy.json").read_bytes())) | {
            "failed_requests", "pending_requests", "curation", "not_reproducible"}


BROKEN = [
    ("not json", b'{"name": "x", ', "not valid JSON"),
    ("empty", b"", "not valid JSON"),
    ("not an object", b"[1, 2]", "(top level)"),
    ("wrong type", None, "pairs: Input should be a valid integer"),
    ("missing field", None, "judge: Field required"),
    ("nested wrong type", None, "models.0.responses: Input should be a valid integer"),
    ("bool for int", None, "pairs: Input should be a valid integer"),
]


def _broken(what: str, data: bytes | None) -> bytes:
    if data is not None:
        return data
    facts = orjson.loads((DATA / "run_legacy.json").read_bytes())
    if what == "wrong type":
        facts["pairs"] = "many"
    elif what == "missing field":
        del facts["judge"]
    elif what == "nested wrong type":
        facts["models"][0]["responses"] = [1]
    elif what == "bool for int":
        facts["pairs"] = True
    return orjson.dumps(facts)


@pytest.mark.parametrize(("what", "data", "message"), BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_run_json_is_one_line_naming_the_file(tmp_path: Path, what: str,
                                                     data: bytes | None, message: str) -> None:
    path = tmp_path / "run.json"
    path.write_bytes(_broken(what, data))
    with pytest.raises(InputError) as err:
        load_facts(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_missing_run_json(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"run\.json: missing"):
        RunFacts.load(tmp_path / "run.json")


@pytest.fixture(scope="module")
def broken_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real output folder whose run.json was edited by hand and broken."""
    tmp = tmp_path_factory.mktemp("broken")
    cfg = fake_config(tmp)
    run(parse_config(cfg), limit=4)
    out = Path(cfg["output"])
    facts = orjson.loads((out / "run.json").read_bytes())
    facts["judge"]["aspects"] = "helpfulness"
    (out / "run.json").write_bytes(orjson.dumps(facts))
    return out


def test_report_on_a_broken_run_json(broken_out: Path) -> None:
    pytest.importorskip("matplotlib")
    with pytest.raises(InputError) as err:
        write_report(broken_out)
    assert str(err.value).startswith(str(broken_out / "run.json"))
    assert "judge.aspects" in str(err.value) and "\n" not in str(err.value)


def test_mix_on_a_broken_run_json(broken_out: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError) as err:
        merge_outputs([broken_out], tmp_path / "mixed")
    assert str(err.value).startswith(str(broken_out / "run.json"))
    assert "\n" not in str(err.value) and not (tmp_path / "mixed").exists()


def test_facts_from_a_summary() -> None:
    """run.json is built from the summed RunSummary and the config, nothing else."""
    cfg = parse_config(fake_config(Path("/nonexistent")))
    s = RunSummary(
        stages={"generate": StageCounts(total=10, answered=7, failed=2, pending=1,
                                        usage=Usage(5, 6), errors=Counter({"timeout": 2})),
                "judge": StageCounts(total=4, answered=3, failed=1)},
        dropped=Counter({"generation_failed": 2, "judgment_failed": 1}), reasks=2,
        pending=True, pairs=3, judgments=4, responses=Counter({"a": 3, "b": 4}),
        failed=Counter({"b": 2}), chosen=Counter({"a": 2, "b": 1}), rejected=Counter({"b": 3}),
        sources=Counter({"s": 3}), judge_errors=Counter({"request failed": 1}),
        position={"helpfulness": {0: [6, 2], 1: [2, 2]}})
    facts = run_facts(cfg, s, PromptStats(read=7, duplicates=1, kept=6), pairs_num_bytes=99)
    assert not facts.complete and facts.failed_requests == 3
    assert facts.prompts.model_dump() == {"read": 7, "duplicates": 1, "kept": 6}
    assert facts.dropped == {"generation_failed": 2, "judgment_failed": 1}
    a, b = facts.models[0], facts.models[1]
    assert (a.responses, a.failed, a.chosen, a.rejected) == (3, 0, 2, 0)
    assert (b.responses, b.failed, b.chosen, b.rejected) == (4, 2, 1, 3)
    assert facts.judge.failed == {"request failed": 1} and facts.judge.reasks == 2
    assert facts.position_means == {"helpfulness": [3.0, 1.0]}
    assert facts.stages["generate"].errors == {"timeout": 2}
    assert facts.pairs_num_bytes == 99 and facts.config["name"] == "fake-run"
    assert RunFacts.model_validate_json(facts.to_json(), strict=True) == facts


def test_models_whose_api_takes_no_seed_are_named(tmp_path: Path) -> None:
    """``Backend.reproducible`` of each configured model's backend, pool and judges alike."""
    raw = fake_config(tmp_path)
    raw["models"][2].update(name="claude", backend="anthropic-batch", model="claude-3-5-haiku")
    raw["panel"] = [{"name": "claude-judge", "backend": "anthropic", "model": "claude-x"}]
    facts = run_facts(parse_config(raw), RunSummary(), PromptStats(), pairs_num_bytes=0)
    assert facts.not_reproducible == ["claude", "claude-judge"]
    assert run_facts(parse_config(fake_config(tmp_path)), RunSummary(), PromptStats(),
                     pairs_num_bytes=0).not_reproducible == []
