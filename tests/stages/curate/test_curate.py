"""The whole curation step on the bundled fixture: what is removed and why, the same with and
without shards, the facts and the card section, the files ``prefsynth curate`` writes."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import orjson
import pytest

import prefsynth.stages.curate as curate_mod
from prefsynth.config import CurateSpec, PromptSource
from prefsynth.output.card import render_curation as curation_markdown
from prefsynth.output.curation import write_curation
from prefsynth.records import CurationStats, Prompt, Removal
from prefsynth.stages.curate import curate_prompts
from prefsynth.stages.prompts import load_prompts
from tests.conftest import ROOT

DATA = ROOT / "tests" / "data"
SPEC = {
    "near_dup": {},
    "decontaminate": {"evals": [{"path": str(DATA / "evals" / "mini_eval.jsonl"),
                                 "field": "question", "id_field": "id", "name": "mini"}]},
}


def _fixture() -> tuple[list[Prompt], int]:
    prompts, stats = load_prompts(PromptSource(path=str(DATA / "curate_prompts.jsonl"),
                                               messages_field="messages"))
    return prompts, stats.duplicates


def test_fixture_removals_by_reason() -> None:
    prompts, dups = _fixture()
    r = curate_prompts(prompts, CurateSpec.model_validate(SPEC), exact_dup=dups)
    reasons = {x.prompt_id: x for x in r.removals}
    assert {k for k, v in reasons.items() if v.reason == "eval_overlap"} == {
        "paste-gsm8k", "near-copy-robe", "multi-turn-ifeval", "short-contained", "code-close"}
    assert reasons["bakery-again"] == Removal("bakery-again", "near_dup",
                                              matched_prompt_id="bakery")
    assert reasons["paste-gsm8k"].eval_set == "mini" and reasons["paste-gsm8k"].ratio == 1.0
    assert [p.id for p in r.prompts] == ["paraphrase-house", "assistant-turn-only",
                                         "too-short-to-check", "bakery", "clean-poem",
                                         "clean-sql", "clean-history"]
    assert r.stats == CurationStats(prompts_in=13, exact_dup=1, near_dup=1,
                                    eval_overlap=Counter({"mini": 5}), kept=7)


def test_facts_and_card_section_keep_no_removed_text() -> None:
    prompts, dups = _fixture()
    r = curate_prompts(prompts, CurateSpec.model_validate(SPEC), exact_dup=dups)
    f = r.facts
    assert f["removed"] == {"exact_dup": 1, "eval_overlap": {"mini": 5}, "near_dup": 1,
                            "sampled_out": 0}
    assert f["decontaminate"]["ngram"] == 8 and f["decontaminate"]["threshold"] == 0.5
    assert f["decontaminate"]["evals"][0] | {"origin": None} == {
        "name": "mini", "origin": None, "field": "question", "instances": 10,
        "ngrams": f["decontaminate"]["evals"][0]["ngrams"], "short_instances": 1,
        "skipped_instances": 1, "removed": 5}
    assert f["near_dup"]["bands"] * f["near_dup"]["rows"] == 128
    assert f["examples"]["eval_overlap"][0] == {
        "prompt_id": "paste-gsm8k", "source": "homework", "eval_set": "mini",
        "eval_id": "gsm8k-test-0", "ratio": 1.0}
    md = curation_markdown(f)
    assert md.startswith("## Prompt curation\n")
    assert "| eval overlap: `mini` | 8-gram coverage of one instance > 0.5 | 5 |" in md
    assert "`bakery-again` → `bakery`" in md and "lowercased words" in md
    dumped = orjson.dumps(f).decode() + md
    removed = {x.prompt_id for x in r.removals}
    for p in prompts:
        if p.id in removed:
            for turn in p.messages:
                assert turn["content"][:40] not in dumped


def _synthetic(n: int, seed: int = 0) -> list[Prompt]:
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(80)]
    evals = (DATA / "evals" / "mini_eval.jsonl").read_bytes().splitlines()
    texts: list[str] = []
    for _ in range(n):
        u = rng.random()
        if u < 0.2 and texts:
            t = rng.choice(texts).split()
            t[rng.randrange(len(t))] = "changed"
            texts.append(" ".join(t))
        elif u < 0.3:
            texts.append(" ".join(rng.choices(vocab, k=20)) + " "
                         + orjson.loads(rng.choice(evals))["question"])
        else:
            texts.append(" ".join(rng.choices(vocab, k=rng.randint(20, 60))))
    return [Prompt(f"s{i}", [{"role": "user", "content": t}], source=rng.choice("ab"))
            for i, t in enumerate(texts)]


@pytest.mark.parametrize("batch", [2048, 5])
def test_same_removals_with_and_without_shards(monkeypatch, batch: int) -> None:
    monkeypatch.setattr(curate_mod, "BATCH", batch)
    prompts = _synthetic(300)
    spec = CurateSpec.model_validate({**SPEC, "sample": {"per_source": {"a": 60, "b": 50}}})
    whole = curate_prompts(prompts, spec)
    assert whole.stats.near_dup > 10 and sum(whole.stats.eval_overlap.values()) > 10
    for shard in (1, 7, 64, 299):
        part = curate_prompts(prompts, spec, shard_size=shard)
        assert [p.id for p in part.prompts] == [p.id for p in whole.prompts]
        assert part.removals == whole.removals
        assert part.stats == whole.stats and part.facts == whole.facts


def test_stats_add_up() -> None:
    a = CurationStats(10, 1, 2, Counter({"x": 1}), 3, 4)
    b = CurationStats(5, 0, 1, Counter({"x": 1, "y": 2}), 0, 1)
    a.add(b)
    assert a == CurationStats(15, 1, 3, Counter({"x": 2, "y": 2}), 3, 5)


def test_threshold_change_keeps_the_other_prompts_as_they_were() -> None:
    prompts = _synthetic(200, seed=1)
    loose = curate_prompts(prompts, CurateSpec.model_validate(SPEC))
    strict = CurateSpec.model_validate(
        {**SPEC, "decontaminate": {**SPEC["decontaminate"], "threshold": 0.99}})
    tight = curate_prompts(prompts, strict)
    kept_before = {p.id: p for p in loose.prompts}
    assert kept_before.keys() <= {p.id for p in tight.prompts}
    assert all(kept_before[p.id] == p for p in tight.prompts if p.id in kept_before)


def test_write_curation_round_trips_through_load_prompts(tmp_path: Path) -> None:
    prompts, dups = _fixture()
    r = curate_prompts(prompts, CurateSpec.model_validate(SPEC), exact_dup=dups)
    paths = write_curation(r, tmp_path / "cur")
    assert [p.name for p in paths] == ["prompts.jsonl", "removed.jsonl", "curation.json",
                                       "curation.md"]
    back, _ = load_prompts(PromptSource(path=str(paths[0]), messages_field="messages"))
    assert [(p.id, p.messages, p.source) for p in back] == [
        (p.id, p.messages, p.source) for p in r.prompts]
    rows = [orjson.loads(x) for x in paths[1].read_bytes().splitlines()]
    assert len(rows) == 6 and rows[0]["reason"] == "eval_overlap"
    assert set(rows[0]) == {"prompt_id", "reason", "eval_set", "eval_id", "ratio",
                            "matched_prompt_id"}
    assert orjson.loads(paths[2].read_bytes())["kept"] == 7


def test_no_step_keeps_everything_and_sampling_shows_on_the_card() -> None:
    prompts, dups = _fixture()
    r = curate_prompts(prompts, CurateSpec(), exact_dup=dups)
    assert r.prompts == prompts and r.removals == [] and r.facts["kept"] == 13
    assert "| exact duplicates | identical messages | 1 |" in curation_markdown(r.facts)
    spec = CurateSpec.model_validate({"sample": {"per_source": {"chat": 2, "code": 5}}})
    r = curate_prompts(prompts, spec)
    assert r.stats.sampled_out == 13 - 4 and len(r.prompts) == 4
    md = curation_markdown(r.facts)
    assert "| source-balanced sampling | `chat`: 2, `code`: 5 (seed 0) | 9 |" in md
    assert "`code` 2 of 5" in md
