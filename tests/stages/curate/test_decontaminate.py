"""Decontamination: the hand-made cases on the bundled eval fixture, the exact threshold rule,
and the numpy scan equal to the plain-Python reference, hash collisions included."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from prefsynth.config import EvalSource, PromptSource
from prefsynth.stages.curate import decontaminate as dc
from prefsynth.stages.curate.evals import EvalSet, load_eval_sets
from prefsynth.stages.curate.reference import ReferenceIndex
from prefsynth.stages.curate.tokenize import user_turns, words, words_regex
from prefsynth.stages.prompts import load_prompts
from tests.conftest import ROOT

DATA = ROOT / "tests" / "data"
EVAL = EvalSource(path=str(DATA / "evals" / "mini_eval.jsonl"), field="question", id_field="id")


@pytest.fixture(scope="module")
def fixture_matches() -> dict[str, dc.Match | None]:
    prompts, _ = load_prompts(PromptSource(path=str(DATA / "curate_prompts.jsonl"),
                                           messages_field="messages"))
    idx = dc.build_index(load_eval_sets([EVAL], Path.cwd()), 8, 0.5)
    found = dc.scan(idx, [[words(t) for t in user_turns(p)] for p in prompts])
    return {p.id: m for p, m in zip(prompts, found, strict=True)}


def test_eval_item_pasted_inside_a_longer_prompt_is_removed(fixture_matches) -> None:
    m = fixture_matches["paste-gsm8k"]
    assert m == dc.Match("mini_eval", "gsm8k-test-0", 1.0)  # curly and straight ' alike


def test_near_copy_with_one_word_changed_is_removed(fixture_matches) -> None:
    m = fixture_matches["near-copy-robe"]
    assert m is not None and m.eval_id == "gsm8k-test-1" and 0.9 < m.ratio < 1.0


def test_paraphrase_under_half_covered_is_kept(fixture_matches) -> None:
    assert fixture_matches["paraphrase-house"] is None
    prompt = [words("My friend Josh bought an old house for $80,000 and then puts in $50,000 "
                    "in repairs before selling it. The repairs raised what the place was worth "
                    "by one and a half times. Did he come out ahead, and by how much?")]
    sets = load_eval_sets([EVAL], Path.cwd())
    house = sets[0].texts[sets[0].ids.index("gsm8k-test-2")]
    ratio = dc.coverage(prompt, [words(t) for t in house], 8)
    assert 0 < ratio < 0.5  # it does share 8-grams, just not enough


def test_every_user_turn_counts_and_only_user_turns(fixture_matches) -> None:
    m = fixture_matches["multi-turn-ifeval"]  # the item is in the first of two user turns
    assert m is not None and m.eval_id == "ifeval-1000"
    assert fixture_matches["assistant-turn-only"] is None  # the item is an assistant answer


def test_short_instances_match_whole_and_tiny_ones_are_skipped(fixture_matches) -> None:
    assert fixture_matches["short-contained"] == dc.Match("mini_eval", "own-capital", 1.0)
    assert fixture_matches["too-short-to-check"] is None  # "say hello": 2 tokens, not checked
    idx = dc.build_index(load_eval_sets([EVAL], Path.cwd()), 8, 0.5)
    assert idx.short["mini_eval"] == 1 and idx.skipped["mini_eval"] == 1
    assert idx.instances["mini_eval"] == 10


def test_clean_prompts_are_kept(fixture_matches) -> None:
    assert all(fixture_matches[k] is None for k in ("bakery", "clean-poem", "clean-sql"))
    assert fixture_matches["code-close"] is not None  # HumanEval/0 with its indentation changed


def _one_eval(text: str) -> list[EvalSet]:
    return [EvalSet("e", "test", "q", ["e0"], [[text]])]


def test_more_than_threshold_not_equal() -> None:
    inst = " ".join(f"w{i}" for i in range(16))
    half = " ".join(f"w{i}" for i in range(8))  # covers exactly 8 of 16 tokens
    more = " ".join(f"w{i}" for i in range(9))
    idx = dc.build_index(_one_eval(inst), 8, 0.5)
    got = dc.scan(idx, [[words("x " + half + " y")], [words(more)]])
    assert got[0] is None
    assert got[1] == dc.Match("e", "e0", 9 / 16)
    full = dc.build_index(_one_eval(inst), 8, 1.0)  # threshold 1: whole copies only
    assert dc.scan(full, [[words(more)], [words("a " + inst)]]) == [
        None, dc.Match("e", "e0", 1.0)]


def test_ngrams_never_span_two_user_turns() -> None:
    inst = " ".join(f"w{i}" for i in range(10))
    idx = dc.build_index(_one_eval(inst), 8, 0.5)
    split = [words("w0 w1 w2 w3 w4"), words("w5 w6 w7 w8 w9")]
    assert dc.scan(idx, [split]) == [None]


def _random_case(seed: int, vocab: int) -> tuple[list[EvalSet], list[list[str]]]:
    rng = random.Random(seed)
    v = [f"t{i}" for i in range(vocab)] + ["Ünï", "naïve"]

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(v, k=rng.randint(lo, hi)))

    evals = [[text(1, 30)] if rng.random() < 0.8 else [text(2, 12), text(2, 12)]
             for _ in range(120)]
    prompts = []
    for _ in range(300):
        turns = [text(0, 40) for _ in range(rng.choice((1, 1, 2, 3)))]
        if rng.random() < 0.5:
            e = rng.choice(evals)[0].split()
            a = rng.randint(0, len(e))
            b = rng.randint(a, len(e))
            t = rng.randrange(len(turns))
            turns[t] = f"{turns[t]} {' '.join(e[a:b])}, {text(0, 5)}"
        prompts.append(turns)
    sets = [EvalSet("a", "t", "q", [f"a{i}" for i in range(60)], evals[:60]),
            EvalSet("b", "t", "q", [f"b{i}" for i in range(60)], evals[60:])]
    return sets, prompts


@pytest.mark.parametrize(("seed", "vocab", "n", "threshold"),
                         [(0, 4, 8, 0.5), (1, 12, 8, 0.5), (2, 6, 5, 0.3), (3, 40, 8, 0.8),
                          (4, 6, 3, 1.0)])
def test_scan_equals_the_reference(seed: int, vocab: int, n: int, threshold: float) -> None:
    sets, prompts = _random_case(seed, vocab)
    ref = ReferenceIndex(sets, n, threshold)
    expected = [ref.match(p) for p in prompts]
    assert sum(m is not None for m in expected) > 2
    assert threshold == 1 or any(m is not None and m.ratio < 1 for m in expected)
    idx = dc.build_index(sets, n, threshold)
    assert dc.scan(idx, [[words(t) for t in p] for p in prompts]) == expected
    # in batches of any size, too (the Curator feeds 2048 at a time; a cluster, shards)
    got = [m for s in range(0, len(prompts), 7)
           for m in dc.scan(idx, [[words(t) for t in p] for p in prompts[s:s + 7]])]
    assert got == expected


def test_a_hash_collision_never_removes_a_prompt(monkeypatch) -> None:
    """Every n-gram hashing alike makes every pair a candidate; the exact check on the tokens
    must still give the reference's answer."""
    import numpy as np

    sets, prompts = _random_case(5, 8)
    sets = [EvalSet("a", "t", "q", s.ids[:15], s.texts[:15]) for s in sets]
    prompts = prompts[:40]
    expected = [ReferenceIndex(sets, 8, 0.5).match(p) for p in prompts]
    monkeypatch.setattr(dc, "_multipliers", lambda n: np.zeros(n, dtype=np.uint64))
    idx = dc.build_index(sets, 8, 0.5)
    assert len(np.unique(idx.grams[8].hashes)) == 1  # all collide
    assert dc.scan(idx, [[words(t) for t in p] for p in prompts]) == expected


def test_index_memory_per_ngram() -> None:
    rng = random.Random(0)
    v = [f"word{i}" for i in range(5000)]
    texts = [[" ".join(rng.choices(v, k=rng.randint(10, 150)))] for _ in range(2000)]
    idx = dc.build_index([EvalSet("e", "t", "q", [str(i) for i in range(2000)], texts)], 8, 0.5)
    grams = idx.ngrams["e"]
    vocab = sys.getsizeof(idx.vocab) + sum(sys.getsizeof(k) for k in idx.vocab)
    assert (idx.nbytes + vocab) / grams <= 200  # the budget; about 35-45 in practice


def test_tokenizer_is_the_same_on_both_sides() -> None:
    idx = dc.build_index(_one_eval("THE Quick, brown fox: jumps over the lazy dog!"), 8, 0.5)
    assert dc.scan(idx, [[words_regex("the quick brown fox jumps over the lazy dog")]]) == [
        dc.Match("e", "e0", 1.0)]
