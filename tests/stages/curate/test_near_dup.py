"""Near duplicates: MinHash LSH (rensa) keeps the first of each cluster, in input order."""

from __future__ import annotations

import os
import random
import subprocess
import sys

from prefsynth.config import NearDupSpec
from prefsynth.stages.curate.near_dup import NearDup, lsh_bands, shingles
from prefsynth.stages.curate.tokenize import words

BAKERY = ("I run a small bakery and want to plan next week's production. On Monday we usually "
          "sell about forty loaves of sourdough, thirty croissants and twenty cinnamon rolls, and "
          "the numbers rise by roughly a quarter on Friday and Saturday. Could you draft a simple "
          "production schedule for the whole week, say how much flour I need in total, and "
          "suggest one way to cut waste from unsold bread at the end of each day?")


def _check(nd: NearDup, texts: list[str], ids: list[str] | None = None) -> list[str | None]:
    ids = ids or [f"p{i}" for i in range(len(texts))]
    return nd.check(ids, [words(t) for t in texts], texts)


def test_punctuation_and_one_word_apart_keeps_the_first() -> None:
    twin = (BAKERY.replace("forty", "fifty").replace(", and the numbers", " - and the numbers")
            .replace("?", "!!").upper())
    nd = NearDup(NearDupSpec())
    assert _check(nd, [BAKERY, twin], ["first", "second"]) == [None, "first"]
    # the other order: the twin comes first and stays
    assert _check(NearDup(NearDupSpec()), [twin, BAKERY], ["t", "b"]) == [None, "t"]


def test_different_prompts_sharing_a_template_are_kept() -> None:
    a = "Translate the following sentence into French: the cat sleeps on the warm windowsill."
    b = "Translate the following sentence into French: my brother repairs old bicycles at night."
    assert _check(NearDup(NearDupSpec()), [a, b]) == [None, None]


def test_matches_the_earliest_kept_prompt_across_batches() -> None:
    nd = NearDup(NearDupSpec())
    assert _check(nd, [BAKERY], ["a"]) == [None]
    assert _check(nd, ["unrelated question about tides and the moon", BAKERY + " "],
                  ["b", "c"]) == [None, "a"]


def test_short_and_wordless_prompts() -> None:
    assert shingles(words("Hi there!"), 5, "Hi there!") == [b"hi there"]
    assert shingles([], 5, "🙂🙂") == ["🙂🙂".encode()]
    nd = NearDup(NearDupSpec())
    assert _check(nd, ["Hi there!", "hi, THERE", "🙂🙂", "🙂", "?!"]) == [
        None, "p0", None, None, None]


def test_same_decisions_in_every_process() -> None:
    """rensa's string hashing is fixed (no per-process salt): a fresh interpreter signs the
    same shingles alike, so workers on a cluster agree with the driver."""
    code = ("import rensa, sys; from prefsynth.stages.curate.near_dup import SEED; "
            "m = rensa.RMinHash(128, SEED); m.update([b'a b c', b'b c d']); print(m.digest())")
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env=env).stdout for _ in range(2)}
    assert len(outs) == 1
    rng = random.Random(3)
    vocab = [f"w{i}" for i in range(60)]
    texts: list[str] = []
    for _ in range(200):
        if texts and rng.random() < 0.3:
            t = rng.choice(texts).split()
            t[rng.randrange(len(t))] = "zz"
            texts.append(" ".join(t))
        else:
            texts.append(" ".join(rng.choices(vocab, k=rng.randint(30, 60))))
    first = _check(NearDup(NearDupSpec()), texts)
    assert first == _check(NearDup(NearDupSpec()), texts)
    assert sum(m is not None for m in first) > 20


def test_bands_divide_the_permutations() -> None:
    assert lsh_bands(0.8, 128) == 16
    assert lsh_bands(0.9, 128) == 8
    for t in (0.3, 0.5, 0.7, 0.95, 1.0):
        for n in (16, 64, 100, 128, 256):
            assert n % lsh_bands(t, n) == 0
