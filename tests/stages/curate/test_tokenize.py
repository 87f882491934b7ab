"""The curation tokenizer: lowercased words, the fast ASCII path equal to the regex."""

from __future__ import annotations

import random
import string

from prefsynth.records import Prompt
from prefsynth.stages.curate.tokenize import user_turns, words, words_regex


def test_lowercased_words_without_punctuation() -> None:
    assert words("Hello, World! It's 2+2=4_ok?") == [b"hello", b"world", b"it", b"s", b"2",
                                                    b"2", b"4_ok"]
    assert words("Janet’s ducks — Ünïcode ÉCOLE") == [b"janet", b"s", b"ducks",
                                                     "ünïcode".encode(), "école".encode()]


def test_ascii_fast_path_equals_the_regex() -> None:
    rng = random.Random(0)
    alphabet = string.printable + "é’—ß"
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert words(text) == words_regex(text), repr(text)
    every_ascii = "".join(map(chr, range(128)))
    assert words(every_ascii) == words_regex(every_ascii)


def test_every_user_turn_and_nothing_else() -> None:
    p = Prompt("x", [{"role": "system", "content": "sys"}, {"role": "user", "content": "one"},
                     {"role": "assistant", "content": "answer"},
                     {"role": "user", "content": "two"}])
    assert user_turns(p) == ["one", "two"]
