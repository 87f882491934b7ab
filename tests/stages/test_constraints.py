"""Tests for the IFEval-style constraint verifier and the shipped example prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from prefsynth.errors import InputError
from prefsynth.stages.constraints.checks import count_words, split_sentences
from prefsynth.stages.constraints.verifier import (
    SUPPORTED,
    describe,
    langdetect_available,
    verify_constraint,
    verify_constraints,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "prompts.jsonl"

# (instruction id, kwargs, a response that follows it, a response that does not)
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("keywords:existence", {"keywords": ["apple", "river"]},
     "An Apple fell into the river.", "An apple fell into the lake."),
    ("keywords:frequency", {"keyword": "data", "frequency": 3, "relation": "at least"},
     "Data beats opinions; more data, better DATA.", "Some data here, some data there."),
    ("keywords:frequency", {"keyword": "very", "frequency": 2, "relation": "less than"},
     "It was very good.", "It was very, very good."),
    ("keywords:forbidden_words", {"forbidden_words": ["cheap", "free"]},
     "Affordable, and it celebrates freedom.", "It is FREE today."),
    ("keywords:letter_frequency", {"letter": "Z", "let_frequency": 2, "let_relation": "at least"},
     "Zany zebras.", "A lazy dog."),
    ("length_constraints:number_sentences", {"relation": "less than", "num_sentences": 3},
     "Dr. Smith arrived at 3.14 p.m. today. He left!", "One. Two? Three!"),
    ("length_constraints:number_sentences", {"relation": "at least", "num_sentences": 3},
     "First point. Second point! Third point?", "Only e.g. one sentence here."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "First part.\n***\nSecond part.", "Only one part."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "***\nLeading divider is fine.\n***\nSecond.\n***", "One.\n***\n***\nEmpty middle."),
    ("length_constraints:number_words", {"relation": "less than", "num_words": 5},
     "Short answer here.", "This answer has far too many words in it."),
    ("length_constraints:number_words", {"relation": "at least", "num_words": 4},
     "it's four words", "three words only"),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "However"},
     "Intro text.\n\n\"However, this works.\"", "Intro text.\n\nBut this does not."),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "Rain falls.\n\nThen it rises.", "Rain falls.\n\nThen it rises.\n\nAnd again."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], see you at [address].", "Dear [name], see you soon."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Thanks again.\n\nP.S. The plants look great.", "Thanks again. PS the plants look great."),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     "Hi.\nP.S. one\nP.P.S two", "Hi.\nP.S. only one"),
    ("detectable_content:postscript", {"postscript_marker": "Note:"},
     "Body.\nnote: remember the milk", "Body without a note marker."),
    ("detectable_format:number_bullet_lists", {"num_bullets": 3},
     "Intro\n* one\n* two\n- three", "* one\n* two\n**bold line**"),
    ("detectable_format:constrained_response", {},
     "Having read it twice: My answer is no.", "No, I do not think so."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "This is *key* and **also key**.", "Only *one* here, and ** ** is empty."),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nCheck the router.\nSECTION 2\nCall us.", "SECTION 1\nCheck the router."),
    ("detectable_format:json_format", {},
     '```json\n{"label": "spam", "reason": "prize"}\n```', 'Here it is: {"label": "spam"}'),
    ("detectable_format:json_format", {}, '[1, 2, {"a": null}]', "```\n{'a': 1}\n```"),
    ("detectable_format:title", {},
     "<<Rain on Tin>>\nDrops drum the roof", "Rain on Tin\nDrops drum the roof <<  >>"),
    ("combination:two_responses", {},
     "Fixed fast.\n******\nWe keep you rolling.", "Fixed fast.\n******\nFixed fast."),
    ("combination:two_responses", {}, "\n******\nOne.\n******\nTwo.", "One only."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "What is 15 multiplied by 4?"},
     "what is 15 multiplied by 4? It is 60.", "It is 60. What is 15 multiplied by 4?"),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     '"It is 210 minutes. Any other questions?"', "Any other questions? It is 210 minutes."),
    ("startend:quotation", {}, '  "Read more, worry less."  ', "Read more, worry less."),
    ("startend:quotation", {}, '"Quoted"', '"'),
    ("change_case:english_capital", {},
     "GO TEAM GO! WE PLAY HARD AND WE PLAY FAIR, AND TODAY WE WIN TOGETHER.",
     "Go team go! We play hard and we play fair, and today we win together."),
    ("change_case:english_lowercase", {},
     "the moon shines because it reflects light from the sun, and we see different parts.",
     "The Moon shines because it reflects light from the Sun, and we see different parts."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "DANGER: this stove is VERY hot.", "Danger: this stove is VERY hot."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "less than"},
     "The WELL-KNOWN fact.", "I'm SURE."),
    ("punctuation:no_comma", {}, "No commas here at all.", "Yes, there is one."),
]  # fmt: skip

LANGUAGE_ID = "language:response_language"


@pytest.mark.parametrize(("iid", "kwargs", "good", "bad"), CASES, ids=[c[0] for c in CASES])
def test_each_constraint_passes_and_fails(
    iid: str, kwargs: dict[str, Any], good: str, bad: str
) -> None:
    assert verify_constraints(good, [iid], [kwargs]) == [True]
    assert verify_constraints(bad, [iid], [kwargs]) == [False]


def test_every_supported_id_has_a_case() -> None:
    covered = {c[0] for c in CASES} | {LANGUAGE_ID}
    assert covered == SUPPORTED
    assert len(SUPPORTED) == 25  # all of IFEval's registered instruction types


def test_response_language_with_langdetect() -> None:
    pytest.importorskip("langdetect")
    spanish = "Bienvenido a Madrid. Esperamos que disfrute de su estancia en nuestro hotel."
    english = "Welcome to Madrid. We hope you enjoy your stay at our hotel this week."
    assert verify_constraint(spanish, LANGUAGE_ID, {"language": "es"}) is True
    assert verify_constraint(english, LANGUAGE_ID, {"language": "es"}) is False


def test_response_language_without_langdetect_is_false() -> None:
    if langdetect_available():
        pytest.skip("langdetect is installed")
    spanish = "Bienvenido a Madrid. Esperamos que disfrute de su estancia en nuestro hotel."
    assert verify_constraint(spanish, LANGUAGE_ID, {"language": "es"}) is False


def test_multi_constraint_call_keeps_order() -> None:
    response = "<<Note>>\nshort, lowercase reply"
    ids = [
        "detectable_format:title",
        "punctuation:no_comma",
        "length_constraints:number_words",
        "startend:quotation",
    ]
    kwargs: list[dict[str, Any] | None] = [{}, None, {"relation": "less than", "num_words": 10}, {}]
    assert verify_constraints(response, ids, kwargs) == [True, False, True, False]
    backwards = verify_constraints(response, ids[::-1], kwargs[::-1])
    assert backwards == [False, True, False, True]


def test_kwargs_may_be_omitted_for_argument_free_constraints() -> None:
    ids = ["startend:quotation", "punctuation:no_comma"]
    assert verify_constraints('"hi"', ids) == [True, True]
    assert verify_constraints('"hi, you"', ids, None) == [True, False]


def test_unknown_id_raises_input_error_naming_it() -> None:
    with pytest.raises(InputError, match="keywords:nonsense"):
        verify_constraints("text", ["punctuation:no_comma", "keywords:nonsense"], [{}, {}])
    with pytest.raises(InputError, match="multi-turn:constrained_start"):
        describe("multi-turn:constrained_start", {})


def test_none_kwargs_are_dropped_like_ifeval() -> None:
    padded = {"num_words": 3, "relation": "at least", "keywords": None, "end_phrase": None}
    assert verify_constraint("one two three", "length_constraints:number_words", padded)
    assert verify_constraint("fine", "punctuation:no_comma", {"num_words": None})


def test_numeric_kwargs_survive_json_round_trips() -> None:
    kwargs = {"num_words": "3", "relation": "at least"}
    assert verify_constraint("one two three", "length_constraints:number_words", kwargs)
    as_float = {**kwargs, "num_words": 3.0}
    assert not verify_constraint("a b", "length_constraints:number_words", as_float)


@pytest.mark.parametrize(
    ("iid", "kwargs", "message"),
    [
        ("length_constraints:number_words", {"relation": "less than"}, "num_words"),
        ("length_constraints:number_words", {"relation": "at most", "num_words": 5}, "relation"),
        ("length_constraints:number_words", {"relation": "at least", "num_words": "x"}, "integer"),
        ("keywords:existence", {"keywords": []}, "keywords"),
        ("keywords:letter_frequency", {"letter": "ab", "let_frequency": 1,
                                       "let_relation": "at least"}, "single letter"),
        ("startend:end_checker", {"end_phrase": None}, "end_phrase"),
    ],
)  # fmt: skip
def test_bad_kwargs_raise_input_error(iid: str, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InputError, match=message) as info:
        verify_constraint("anything", iid, kwargs)
    assert iid in str(info.value)


def test_misaligned_kwargs_raise() -> None:
    with pytest.raises(InputError, match="2 instruction ids but 1 kwargs"):
        verify_constraints("x", ["punctuation:no_comma", "startend:quotation"], [{}])
    with pytest.raises(InputError, match="list of ids"):
        verify_constraints("x", "punctuation:no_comma")  # type: ignore[arg-type]


def test_describe_gives_a_sentence_for_every_id() -> None:
    kwargs_by_id = {c[0]: c[1] for c in CASES} | {LANGUAGE_ID: {"language": "es"}}
    for iid in sorted(SUPPORTED):
        text = describe(iid, kwargs_by_id[iid])
        assert text[-1] in ".'" and "{" not in text, (iid, text)
    words = describe("length_constraints:number_words", {"relation": "less than", "num_words": 50})
    assert words == "Answer with less than 50 words."
    forbidden = describe("keywords:forbidden_words", {"forbidden_words": ["cheap", "free"]})
    assert forbidden == "Do not include the words 'cheap', 'free' in the response."
    assert "Spanish" in describe(LANGUAGE_ID, {"language": "es"})


def test_sentence_splitter_and_word_count() -> None:
    text = 'Mr. Lee paid $3.50 at example.com today. "Really?" she asked.\n\nHeading\nBody... ok'
    assert split_sentences(text) == [
        "Mr. Lee paid $3.50 at example.com today.",
        '"Really?"',
        "she asked.",
        "Heading\nBody...",
        "ok",
    ]
    assert split_sentences("") == []
    assert split_sentences("  ...  ") == []
    assert count_words("It's 3.5 km-long") == 6


def _load_examples() -> list[dict[str, Any]]:
    lines = EXAMPLES.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_example_prompts_are_well_formed() -> None:
    rows = _load_examples()
    ids = [row["id"] for row in rows]
    assert len(rows) >= 40
    assert len(ids) == len(set(ids))
    for row in rows:
        assert isinstance(row["prompt"], str) and row["prompt"].strip(), row["id"]
        assert row["source"] == "prefsynth-examples"
        assert len(row["prompt"].split()) <= 60, row["id"]
    constrained = [row for row in rows if row.get("instruction_id_list")]
    assert len(constrained) * 3 >= len(rows)
    assert any("reference" in row for row in rows)


def test_example_constraints_are_accepted_by_the_verifier() -> None:
    constrained = [row for row in _load_examples() if row.get("instruction_id_list")]
    for row in constrained:
        ids, kwargs = row["instruction_id_list"], row["kwargs"]
        assert len(ids) == len(kwargs), row["id"]
        results = verify_constraints("A plain placeholder response.", ids, kwargs)
        assert len(results) == len(ids) and all(isinstance(r, bool) for r in results)
        assert all(describe(iid, kw) for iid, kw in zip(ids, kwargs, strict=True))
