"""The rating parser: mapping by text number, tolerance of real judge formats, and never
inventing a rating."""

from __future__ import annotations

import json

import pytest

from prefsynth.stages.judge.parse import parse_judgment, parse_ratings, parse_structured

CLEAN = """#### Output for Text 1
Rating: 4
Rationale: Mostly aligned, minor deviation in length.

#### Output for Text 2
Rating: 2
Rationale: Addresses only one aspect of the task.
"""

HELPFULNESS = """#### Output for Text 1
Type: 1, 2
Rationale: Clear and relevant with useful background.
Rating: 4
Rationale: Accurate and informative, but misses one detail.

#### Output for Text 2
Type: None
Rationale: Off-topic.
Rating: 1
Rationale: Contains fabricated content.
"""


def test_clean_gpt4_output() -> None:
    assert parse_ratings(CLEAN, "instruction_following", 2) == [4, 2]
    ratings, why = parse_judgment(CLEAN, "instruction_following", 2)
    assert ratings == [4, 2]
    assert why == ["Mostly aligned, minor deviation in length.",
                   "Addresses only one aspect of the task."]


def test_helpfulness_takes_the_rating_rationale_not_the_type_rationale() -> None:
    ratings, why = parse_judgment(HELPFULNESS, "helpfulness", 2)
    assert ratings == [4, 1]
    assert why == ["Accurate and informative, but misses one detail.",
                   "Contains fabricated content."]


def test_maps_by_text_number_not_by_order() -> None:
    text = ("#### Output for Text 3\nRating: 1\nRationale: c\n\n"
            "#### Output for Text 1\nRating: 5\nRationale: a\n\n"
            "#### Output for Text 2\nRating: 3\nRationale: b\n")
    ratings, why = parse_judgment(text, "truthfulness", 3)
    assert ratings == [5, 3, 1]
    assert why == ["a", "b", "c"]


def test_missing_section_is_none_not_a_number() -> None:
    text = "#### Output for Text 1\nRating: 4\nRationale: a\n\n#### Output for Text 3\nRating: 2\n"
    assert parse_ratings(text, "helpfulness", 4) == [4, None, 2, None]


def test_text_numbers_above_n_are_ignored() -> None:
    text = CLEAN + "\n#### Output for Text 3\nRating: 5\nRationale: hallucinated text\n"
    assert parse_ratings(text, "honesty", 2) == [4, 2]


def test_preamble_is_ignored_and_does_not_shift_ratings() -> None:
    text = ("Sure! Here is my assessment of the texts.\n\nRating: 3 is the middle of the "
            "scale.\n\n" + CLEAN)
    assert parse_ratings(text, "instruction_following", 2) == [4, 2]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("Rating: 4", 4),
        ("**Rating:** 4", 4),
        ("**Rating: 4**", 4),
        ("*Rating*: 4", 4),
        ("- **Rating**: 4", 4),
        ("Rating: 4/5", 4),
        ("Rating: 4 / 5", 4),
        ("Rating: 4 out of 5", 4),
        ("Rating: 5 (Excellent)", 5),
        ("Rating: [4]", 4),
        ("Rating: 4.", 4),
        ("Rating: 4.0", 4),
        ("Rating: **3** - Partial Compliance", 3),
        ("Rating: Almost There (4)", 4),
        ("Rating - 2", 2),
        ("Score: 5", 5),
        ("Rating: Five", 5),
        ("Rating: `1`", 1),
    ],
)
def test_rating_spellings(line: str, expected: int) -> None:
    text = f"### Output for Text 1\n{line}\nRationale: because.\n"
    assert parse_ratings(text, "helpfulness", 1) == [expected]


@pytest.mark.parametrize(
    "line",
    [
        "Rating: [Rating for text 1]",  # echoed placeholder: the 1 is not a rating
        "Rating: 8/10",  # another scale
        "Rating: 4/10",
        "Rating: 4.5",
        "Rating: 3-4",
        "Rating: 4 or 5",
        "Rating: 6",
        "Rating: 0",
        "Rating: 80%",
        "Rating: One of the better answers",
        "Rating:",
        "Rationale: no rating given at all",
    ],
)
def test_unacceptable_ratings_are_none(line: str) -> None:
    text = f"#### Output for Text 1\n{line}\nRationale: x\n"
    assert parse_ratings(text, "helpfulness", 1) == [None]


def test_rating_value_on_the_next_line() -> None:
    text = "#### Output for Text 1\n**Rating:**\n\n4\n\n**Rationale:** fine\n"
    assert parse_ratings(text, "helpfulness", 1) == [4]


@pytest.mark.parametrize(
    "header",
    ["#### Output for Text {i}", "Output for Text {i}", "**Text {i}**", "Text {i}:",
     "### Text {i}", "**Output for Text {i}:**", "Text {i} (response):", "<text {i}>",
     "## Evaluation of Text {i}", "Text #{i}"],
)
def test_header_spellings(header: str) -> None:
    text = "\n\n".join(f"{header.format(i=i)}\nRating: {6 - i}\nRationale: r{i}" for i in (1, 2))
    ratings, why = parse_judgment(text, "honesty", 2)
    assert ratings == [5, 4]
    assert why == ["r1", "r2"]


def test_inline_header_with_rating() -> None:
    text = "Text 1: Rating 4 — solid.\nText 2: 2/5\n**Text 3** (Rating: 3)\nText 4: N/A"
    assert parse_ratings(text, "honesty", 4) == [4, 2, 3, "N/A"]
    assert parse_ratings(text, "helpfulness", 4) == [4, 2, 3, None]


def test_rationale_mentioning_another_text_does_not_open_a_section() -> None:
    text = ("#### Output for Text 1\nRating: 4\nRationale: Good.\n"
            "Text 2 is weaker than this one.\n\n"
            "#### Output for Text 2\nRating: 2\nRationale: Weak.\n")
    ratings, why = parse_judgment(text, "helpfulness", 2)
    assert ratings == [4, 2]
    assert why[0] == "Good.\nText 2 is weaker than this one."


def test_conflicting_duplicates_give_none_but_agreeing_ones_are_kept() -> None:
    text = (CLEAN + "\n#### Output for Text 1\nRating: 5\nRationale: changed my mind\n"
            "\n#### Output for Text 2\nRating: 2\nRationale: same\n")
    assert parse_ratings(text, "helpfulness", 2) == [None, 2]
    two_in_one = "#### Output for Text 1\nRating: 4\nRating: 3\nRationale: x\n"
    assert parse_ratings(two_in_one, "helpfulness", 1) == [None]


def test_summary_list_conflicting_with_sections_poisons_that_text() -> None:
    text = CLEAN + "\nRatings:\n- Text 1: 4\n- Text 2: 3\n"
    assert parse_ratings(text, "instruction_following", 2) == [4, None]


def test_honesty_na_and_na_elsewhere() -> None:
    text = ("#### Output for Text 1\nRating: N/A\nRationale: creative writing\n\n"
            "#### Output for Text 2\nRating: **n/a**\nRationale: poem\n\n"
            "#### Output for Text 3\nRating: 5\nRationale: fine\n")
    assert parse_ratings(text, "honesty", 3) == ["N/A", "N/A", 5]
    assert parse_ratings(text, "helpfulness", 3) == [None, None, 5]
    assert parse_ratings(text, "helpfulness", 3, allow_na=True) == ["N/A", "N/A", 5]
    assert parse_ratings(text, "honesty", 3, allow_na=False) == [None, None, 5]


def test_windows_line_endings_blank_lines_and_trailing_prose() -> None:
    text = ("Evaluation below.\r\n\r\n\r\n#### Output for Text 1\r\n**Rating:** 3\r\n"
            "**Rationale:** First paragraph.\r\n\r\nSecond paragraph.\r\n\r\n\r\n"
            "#### Output for Text 2\r\nRating: 5\r\nRationale: Great.\r\n\r\n---\r\n"
            "Overall, Text 2 is the strongest response. Rating: 1 would be unfair to it.\r\n")
    ratings, why = parse_judgment(text, "truthfulness", 2)
    assert ratings == [3, 5]
    assert why == ["First paragraph.\n\nSecond paragraph.", "Great."]


def test_single_text_without_header() -> None:
    assert parse_ratings("Rating: 4\nRationale: Fine answer.", "honesty", 1) == [4]
    assert parse_judgment("I think:\n\n**Rating:** 2\n**Rationale:** Wrong.", "honesty",
                          1) == ([2], ["Wrong."])
    # without a header and n > 1 nothing can be mapped safely
    assert parse_ratings("Rating: 4\n\nRating: 2", "honesty", 2) == [None, None]


def test_explicit_rating_for_text_label() -> None:
    text = "Rating for Text 2: 3\nRating for Text 1: 5\n"
    assert parse_ratings(text, "helpfulness", 2) == [5, 3]


def test_garbage_and_empty() -> None:
    assert parse_ratings("I cannot evaluate these texts.", "helpfulness", 4) == [None] * 4
    assert parse_ratings("", "helpfulness", 2) == [None, None]
    assert parse_judgment("", "helpfulness", 0) == ([], [])


def test_echoed_format_then_real_answer() -> None:
    text = ("### Output\n#### Output for Text 1\nRating: [Rating for text 1]\n"
            "Rationale: [Rationale for the rating in short sentences]\n\n" + CLEAN)
    assert parse_ratings(text, "instruction_following", 2) == [4, 2]


def test_custom_scale() -> None:
    text = "#### Output for Text 1\nRating: 8/10\n\n#### Output for Text 2\nRating: 11\n"
    assert parse_ratings(text, "style", 2, lo=1, hi=10) == [8, None]
    assert parse_ratings("#### Text 1\nRating: 0", "style", 1, lo=0, hi=3) == [0]


# --- JSON answers in text mode --------------------------------------------------------------

JSON_ANSWER = json.dumps({"ratings": [
    {"text": 2, "rationale": "Off-topic.", "rating": 1},
    {"text": 1, "rationale": "Accurate.", "rating": 4},
]}, indent=2)


def test_text_mode_reads_a_fenced_json_answer() -> None:
    """Strong judges answer in JSON unasked; text mode used to return nothing (a re-ask)."""
    fenced = f"Here is my evaluation:\n```json\n{JSON_ANSWER}\n```\nHope this helps."
    assert parse_ratings(fenced, "honesty", 2) == [4, 1]
    assert parse_judgment(fenced, "honesty", 2) == ([4, 1], ["Accurate.", "Off-topic."])
    assert parse_ratings(f"```\n{JSON_ANSWER}\n```", "honesty", 2) == [4, 1]


def test_text_mode_reads_a_bare_json_object() -> None:
    assert parse_ratings(JSON_ANSWER, "honesty", 2) == [4, 1]
    inline = 'My ratings: {"ratings": [{"text": 1, "rating": "N/A"}, {"text": 2, "rating": 3}]}.'
    assert parse_ratings(inline, "honesty", 2) == ["N/A", 3]
    assert parse_ratings('{"rationales": ["a", "b"], "ratings": [5, 2]}', "honesty", 2) == [5, 2]


def test_text_mode_json_has_the_structured_validation() -> None:
    body = json.dumps({"ratings": [{"text": 1, "rating": 7}, {"text": 2, "rating": "N/A"},
                                   {"text": 3, "rating": True}, {"text": 3, "rating": 2}]})
    assert parse_ratings(body, "helpfulness", 3) == [None, None, None]
    assert parse_ratings(body, "style", 3, lo=1, hi=10, allow_na=True) == [7, "N/A", None]


def test_text_mode_json_objects_must_agree() -> None:
    one = json.dumps({"ratings": [4, 2]})
    assert parse_ratings(f"{one}\nTo repeat: {one}", "honesty", 2) == [4, 2]
    other = json.dumps({"ratings": [4, 3]})
    assert parse_ratings(f"{one}\nOn reflection: {other}", "honesty", 2) == [4, None]
    short = json.dumps({"ratings": [4]})
    assert parse_ratings(f"{one} {short}", "honesty", 2) == [4, None]


def test_text_mode_json_fallback_only_when_the_text_format_gives_nothing() -> None:
    mixed = CLEAN + '\n{"ratings": [1, 1]}\n'
    assert parse_ratings(mixed, "honesty", 2) == [4, 2]


@pytest.mark.parametrize("text", [
    '```json\n{"ratings": [{"text": 1, "rating": 4}, {"text": 2, "rati',  # truncated
    "[4, 2]",  # a bare list in prose is not taken as ratings
    '{"scores": [4, 2]}',
    '{"ratings": "4, 2"}',
    '{"ratings": [{"text": 1, "rationale": "...", "rating": ...}]}',  # an echoed format
])
def test_text_mode_json_that_is_not_an_answer(text: str) -> None:
    assert parse_judgment(text, "honesty", 2) == ([None, None], [None, None])


def test_json_nested_too_deep_is_no_answer_not_a_crash() -> None:
    """The JSON decoder raises RecursionError (not ValueError) past ~1000 levels."""
    text = '{"ratings": [' * 100_000
    assert parse_judgment(text, "honesty", 2) == ([None, None], [None, None])
    assert parse_structured(text, "honesty", 2) == ([None, None], [None, None])
    assert parse_structured("```json\n" + text + "\n```", "honesty", 2)[0] == [None, None]


# --- structured output -------------------------------------------------------------------


def _payload(items: list[dict[str, object]]) -> str:
    return json.dumps({"ratings": items})


def test_structured_by_text_field_and_fence() -> None:
    body = _payload([
        {"text": 2, "rationale": "b", "rating": 3},
        {"text": 1, "rationale": "a", "rating": 5},
    ])
    assert parse_structured(body, "helpfulness", 2) == ([5, 3], ["a", "b"])
    fenced = f"Here you go:\n```json\n{body}\n```\n"
    assert parse_structured(fenced, "helpfulness", 2) == ([5, 3], ["a", "b"])


def test_structured_position_fallback_and_invalid_values() -> None:
    body = _payload([
        {"rationale": "a", "rating": 4},
        {"text": 9, "rationale": "b", "rating": 7},
        {"text": 3, "rationale": "c", "rating": "N/A"},
        {"text": 4, "rationale": "d", "rating": True},
    ])
    ratings, why = parse_structured(body, "helpfulness", 4)
    assert ratings == [4, None, None, None]
    assert why == ["a", "b", "c", "d"]
    assert parse_structured(body, "honesty", 4)[0] == [4, None, "N/A", None]


def test_structured_duplicates_and_strings() -> None:
    body = _payload([
        {"text": 1, "rationale": "a", "rating": "4"},
        {"text": 2, "rationale": "b", "rating": 2},
        {"text": 2, "rationale": "c", "rating": 2},
    ])
    assert parse_structured(body, "helpfulness", 2) == ([4, None], ["a", None])


def test_structured_scale_and_allow_na() -> None:
    body = _payload([{"text": 1, "rationale": "a", "rating": 9},
                     {"text": 2, "rationale": "b", "rating": "N/A"}])
    assert parse_structured(body, "style", 2, lo=1, hi=10, allow_na=True) == (
        [9, "N/A"], ["a", "b"])
    assert parse_structured(body, "style", 2, lo=1, hi=5)[0] == [None, None]


def test_structured_distilabel_shape_and_garbage() -> None:
    body = json.dumps({"ratings": [4, 2], "rationales": ["a", "b"]})
    assert parse_structured(body, "honesty", 2) == ([4, 2], ["a", "b"])
    assert parse_structured("not json {", "honesty", 2) == ([None, None], [None, None])
    assert parse_structured('{"ratings": "4"}', "honesty", 1) == ([None], [None])
    assert parse_structured('{"ratings": [{"text": 1, "rating": 4.0, "rationale": "x"}]}',
                            "honesty", 1) == ([4], ["x"])
