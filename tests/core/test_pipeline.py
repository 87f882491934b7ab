"""Pipeline logic with the deterministic fake backend (the real model runs in test_resume and
test_quickstart)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from prefsynth.config import parse_config
from prefsynth.core.pipeline import run
from prefsynth.testing import FakeBackend
from tests.conftest import fake_config


def _calls() -> int:
    return sum(FakeBackend.calls.values())


def test_end_to_end_outputs(tmp_path: Path) -> None:
    cfg = parse_config(fake_config(tmp_path))
    result = run(cfg)
    out = Path(cfg.output)
    n_prompts = len(result.records.prompts)
    assert len(result.records.generations) == 4 * n_prompts
    assert len(result.records.judgments) == 4 * n_prompts  # one per (comparison, aspect)
    assert len(result.records.pairs) + len(result.records.dropped) == n_prompts
    pairs = pq.read_table(out / "pairs" / "train.parquet").to_pylist()
    assert len(pairs) == len(result.records.pairs) > 0
    for p in pairs:
        assert p["chosen_rating"] > p["rejected_rating"]
        assert p["chosen"][-1]["role"] == "assistant" and p["chosen"][0]["role"] == "user"
        assert p["chosen_model"] != p["rejected_model"]
    ann = pq.read_table(out / "annotations" / "train.parquet").to_pylist()
    assert len(ann) == 4 * n_prompts
    assert all(r["helpfulness_rationale"] for r in ann)
    assert {r["role"] for r in ann} == {"chosen", "rejected", ""}
    jsonl = (out / "pairs.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in jsonl] == [p["id"] for p in pairs]
    facts = json.loads((out / "run.json").read_text())
    assert facts["pairs"] == len(pairs)
    assert sum(m["chosen"] for m in facts["models"]) == len(pairs)
    assert (out / "README.md").read_text().startswith("---\n")


def test_rerun_costs_no_calls_and_gives_same_data(tmp_path: Path) -> None:
    cfg = parse_config(fake_config(tmp_path))
    first = run(cfg)
    before = _calls()
    second = run(cfg)
    assert _calls() == before
    assert second.summary.stages["generate"].cached == second.summary.stages["generate"].total
    assert [repr(p) for p in first.records.pairs] == [repr(p) for p in second.records.pairs]


def test_repairing_with_new_policy_calls_no_model(tmp_path: Path) -> None:
    raw = fake_config(tmp_path)
    first = run(parse_config(raw))
    before = _calls()
    raw["pairs"] = {"rejected": "lowest", "min_margin": 1.0, "aggregate": "min"}
    second = run(parse_config(raw))
    assert _calls() == before
    assert second.records.pairs != [] and len(second.records.pairs) <= len(first.records.pairs)
    assert all(p.chosen_rating - p.rejected_rating >= 1.0 for p in second.records.pairs)


def test_failures_recorded_never_rated_and_retried(tmp_path: Path) -> None:
    raw = fake_config(tmp_path)
    raw["models"][0]["options"] = {"fail_rate": 0.5}
    result = run(parse_config(raw))
    failed = [g for g in result.records.generations if g.error]
    assert failed and all(g.model == "a" and g.text is None for g in failed)
    reasons = result.summary.dropped_by_reason()
    assert reasons["generation_failed"] == len({g.prompt_id for g in failed})
    assert all(p.chosen_model != "a" or p.id not in {g.prompt_id for g in failed}
               for p in result.records.pairs)
    # the next run asks the failed requests again (and only those)
    before = FakeBackend.calls["a"]
    raw["models"][0]["options"] = {}
    again = run(parse_config(raw))
    assert FakeBackend.calls["a"] - before == len(failed)
    assert "generation_failed" not in again.summary.dropped_by_reason()


def test_reask_then_success(tmp_path: Path) -> None:
    raw = fake_config(tmp_path)
    raw["judge"]["options"] = {"garble_first": True}
    result = run(parse_config(raw))
    # every first answer was unparseable
    assert result.summary.reasks == len(result.records.judgments)
    assert all(j.error is None and j.attempts == 2 for j in result.records.judgments)
    assert len(result.records.pairs) > 0


def test_reask_exhausted_is_failure_with_raw_kept(tmp_path: Path) -> None:
    raw = fake_config(tmp_path)
    raw["judge"]["options"] = {"garble_first": True}
    raw["judge"]["max_reasks"] = 0
    result = run(parse_config(raw))
    assert result.records.pairs == []
    assert all(j.error and j.error.startswith("unparseable") for j in result.records.judgments)
    assert all(j.raw == "I think they are all fine." for j in result.records.judgments)
    assert all(r is None for j in result.records.judgments for r in j.ratings)
    assert result.summary.dropped_by_reason() == {"judgment_failed": len(result.records.prompts)}


def test_permutations_and_structured(tmp_path: Path) -> None:
    raw = fake_config(tmp_path, responses_per_prompt=3)
    raw["judge"].update(permutations=3, mode="structured")
    result = run(parse_config(raw), limit=5)
    assert len(result.records.comparisons) == 15
    orders = {}
    for c in result.records.comparisons:
        orders.setdefault(c.prompt_id, set()).add(tuple(c.order))
    assert all(len(v) == 3 for v in orders.values())  # three distinct orders per prompt
    assert all(j.error is None for j in result.records.judgments)


def test_on_policy(tmp_path: Path) -> None:
    raw = fake_config(tmp_path, on_policy="b", responses_per_prompt=2)
    result = run(parse_config(raw), limit=10)
    for models in result.records.assignment.values():
        assert "b" in models and len(models) == 2
    assert len(result.records.generations) == 20


def test_ties_dropped_never_paired(tmp_path: Path) -> None:
    raw = fake_config(tmp_path)
    raw["judge"]["options"] = {"rating": "tie"}
    result = run(parse_config(raw), limit=6)
    assert result.records.pairs == [] and result.summary.dropped_by_reason() == {"all_tied": 6}


def test_constraints_checked_into_annotations(tmp_path: Path) -> None:
    raw = fake_config(tmp_path)
    raw["pairs"] = {"constraints": "verify"}
    result = run(parse_config(raw))
    constrained = [p for p in result.records.prompts if p.instruction_ids]
    assert len({k[0] for k in result.records.constraint_results}) == len(constrained)
    ann = pq.read_table(Path(raw["output"]) / "annotations" / "train.parquet").to_pylist()
    with_checks = [r for r in ann if r["constraints_passed"] is not None]
    assert len(with_checks) == 4 * len(constrained)


def test_judge_panel_averaged_with_agreement(tmp_path: Path) -> None:
    raw = fake_config(tmp_path)
    raw["panel"] = [{"name": "judge2", "backend": "fake", "model": "fj2", "license": "apache-2.0",
                     "options": {"rating": "length"}}]
    result = run(parse_config(raw), limit=12)
    assert {j.judge for j in result.records.judgments} == {"judge", "judge2"}
    assert len(result.records.judgments) == 2 * 4 * 12
    assert set(result.summary.stages) == {"generate", "judge", "judge:judge2"}
    facts = json.loads((Path(raw["output"]) / "run.json").read_text())
    assert [a["aspect"] for a in facts["agreement"]] == sorted(result.config.judge.aspects)
    assert all(a["n"] == 48 for a in facts["agreement"])
    card = (Path(raw["output"]) / "README.md").read_text()
    assert "Judge panel" in card and "Spearman" in card


def test_run_stage_without_collecting_results(tmp_path: Path) -> None:
    import asyncio

    from prefsynth.backends import create_backend
    from prefsynth.config import ModelSpec
    from prefsynth.core.executor.local import run_stage
    from prefsynth.core.keys import build_request
    from prefsynth.core.store import Store
    from prefsynth.records import GenerationTag

    spec = ModelSpec(name="f", backend="fake", model="fm")
    reqs = [build_request(spec, [{"role": "user", "content": f"q{i}"}], i,
                          tag=GenerationTag(str(i), "f")) for i in range(300)]
    with Store(tmp_path / "s.sqlite") as store:
        out, counts = asyncio.run(run_stage("generate", {"f": (create_backend(spec), reqs)},
                                            store, collect=False))
        assert out == {} and counts.answered == 300 and counts.cached == 0
        assert len(store.answered(r.key for r in reqs)) == 300
        out, counts = asyncio.run(run_stage("generate", {"f": (create_backend(spec), reqs)},
                                            store))
        assert counts.cached == 300 and counts.answered == 0 and len(out) == 300


RUBRIC = """---
min: 1
max: 10
---
Rate how concise each text is, from 1 (rambling) to 10 (nothing to cut).

## Annotation

### Input
Instruction: {{ instruction }}

Texts:
{% for c in completions %}<text {{ loop.index }}> {{ c }}
{% endfor %}
### Output
"""


def test_custom_rubric_with_its_own_scale(tmp_path: Path) -> None:
    rubrics = tmp_path / "rubrics"
    rubrics.mkdir()
    (rubrics / "conciseness.jinja").write_text(RUBRIC, encoding="utf-8")
    raw = fake_config(tmp_path)
    raw["judge"].update(aspects=["conciseness", "honesty"], templates_dir=str(rubrics))
    result = run(parse_config(raw), limit=6)
    assert {j.aspect for j in result.records.judgments} == {"conciseness", "honesty"}
    assert all(j.error is None for j in result.records.judgments)
    ann = pq.read_table(Path(raw["output"]) / "annotations" / "train.parquet").to_pylist()
    assert all(r["conciseness_rating"] is not None for r in ann)


def test_unsafe_rubric_refused_before_any_generation(tmp_path: Path, capsys) -> None:
    from prefsynth.cli import main
    from tests.conftest import write_config

    rubrics = tmp_path / "rubrics"
    rubrics.mkdir()
    (rubrics / "evil.jinja").write_text(
        "{{ completions.__class__.__mro__[1].__subclasses__() }}", encoding="utf-8")
    raw = fake_config(tmp_path)
    raw["judge"].update(aspects=["evil"], templates_dir=str(rubrics))
    before = sum(FakeBackend.calls.values())
    assert main(["run", str(write_config(tmp_path, raw))]) == 2
    err = capsys.readouterr().err.strip()
    assert "evil.jinja" in err and "\n" not in err
    assert sum(FakeBackend.calls.values()) == before  # no model was called


def test_sharded_streamed_run_writes_the_same_dataset(tmp_path: Path) -> None:
    raw = fake_config(tmp_path / "whole")
    raw["models"][0]["options"] = {"fail_rate": 0.2}  # some drops, so counts are exercised
    whole = run(parse_config(raw))
    raw_sharded = fake_config(tmp_path / "sharded", shard_size=7)
    raw_sharded["models"][0]["options"] = {"fail_rate": 0.2}
    sharded = run(parse_config(raw_sharded), keep=False)
    assert sharded.records.pairs == [] and sharded.records.generations == []  # records not kept
    assert sharded.summary.pairs == len(whole.records.pairs)
    for name in ("pairs", "annotations", "judgments"):
        a = pq.read_table(Path(raw["output"]) / name / "train.parquet").to_pylist()
        b = pq.read_table(Path(raw_sharded["output"]) / name / "train.parquet").to_pylist()
        assert a == b, name
    fa = json.loads((Path(raw["output"]) / "run.json").read_text())
    fb = json.loads((Path(raw_sharded["output"]) / "run.json").read_text())
    for key in ("pairs", "pairs_num_bytes", "dropped", "models", "judge", "position_means",
                "sources", "prompts"):
        assert fa[key] == fb[key], key
    assert (Path(raw["output"]) / "pairs.jsonl").read_text() == (
        Path(raw_sharded["output"]) / "pairs.jsonl").read_text()
    assert not list(Path(raw_sharded["output"]).rglob("*.tmp"))
