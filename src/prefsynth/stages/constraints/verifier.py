"""Verifiable instruction constraints, IFEval style, in pure Python.

Tulu 3 built part of its preference data from prompts that carry machine-checkable
constraints ("answer in under 50 words", "use exactly 3 bullet points"), using the
instruction ids and kwargs of Google's IFEval. prefsynth keeps those constraints on each
``Prompt`` (``instruction_ids`` + ``constraint_kwargs``) so a pipeline can check responses
deterministically, next to or instead of an LLM judge, and a dataset card can state them.

The ids and kwarg names are IFEval's, exactly, so IFEval/Tulu data loads as is. All 25 of
IFEval's registered instruction types are supported; checks live in ``constraints_checks``.
``language:response_language`` (and the English part of the two ``change_case:english_*``
checks) needs the pure-Python, offline ``langdetect`` package: without it
``response_language`` is always False and the ``english_*`` checks test the letter case only.

Kwargs follow IFEval's conventions: entries whose value is ``None`` are dropped (datasets
stored in columnar formats pad every kwargs dict with every key), extra keys are ignored,
and a missing or malformed required kwarg is an ``InputError`` rather than a silent pass.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from prefsynth.errors import InputError
from prefsynth.stages.constraints import checks as c

Check = Callable[[str, Mapping[str, Any]], bool]
Getter = Callable[[Mapping[str, Any], str], Any]

__all__ = [
    "SUPPORTED",
    "check_constraint",
    "describe",
    "langdetect_available",
    "verify_constraint",
    "verify_constraints",
]

langdetect_available = c.langdetect_available

# ISO 639-1 codes IFEval draws languages from, for human-readable descriptions.
LANGUAGE_NAMES: Mapping[str, str] = {
    "en": "English", "es": "Spanish", "pt": "Portuguese", "ar": "Arabic", "hi": "Hindi",
    "fr": "French", "ru": "Russian", "de": "German", "ja": "Japanese", "it": "Italian",
    "bn": "Bengali", "uk": "Ukrainian", "th": "Thai", "ur": "Urdu", "ta": "Tamil",
    "te": "Telugu", "bg": "Bulgarian", "ko": "Korean", "pl": "Polish", "he": "Hebrew",
    "fa": "Persian", "vi": "Vietnamese", "ne": "Nepali", "sw": "Swahili", "kn": "Kannada",
    "mr": "Marathi", "gu": "Gujarati", "pa": "Punjabi", "ml": "Malayalam", "fi": "Finnish",
}  # fmt: skip

_INT, _STR, _LIST, _REL = c.get_int, c.get_str, c.get_str_list, c.get_relation
_LETTER = c.get_letter

# id -> (check, description template, required kwargs with their parsers). The templates
# paraphrase IFEval's own instruction texts, so a card reads like the prompt did.
_SPEC: dict[str, tuple[Check, str, tuple[tuple[str, Getter], ...]]] = {
    "keywords:existence": (
        c.keywords_existence, "Include the keywords {keywords} in the response.",
        (("keywords", _LIST),)),
    "keywords:frequency": (
        c.keywords_frequency, "The word {keyword} should appear {relation} {frequency} times.",
        (("keyword", _STR), ("frequency", _INT), ("relation", _REL))),
    "keywords:forbidden_words": (
        c.forbidden_words, "Do not include the words {forbidden_words} in the response.",
        (("forbidden_words", _LIST),)),
    "keywords:letter_frequency": (
        c.letter_frequency,
        "The letter {letter} should appear {let_relation} {let_frequency} times.",
        (("letter", _LETTER), ("let_frequency", _INT), ("let_relation", _REL))),
    "language:response_language": (
        c.response_language,
        "The entire response should be in {language}, no other language is allowed.",
        (("language", _STR),)),
    "length_constraints:number_sentences": (
        c.number_sentences, "The response should contain {relation} {num_sentences} sentences.",
        (("num_sentences", _INT), ("relation", _REL))),
    "length_constraints:number_paragraphs": (
        c.number_paragraphs,
        "The response should have {num_paragraphs} paragraphs, separated by the markdown "
        "divider ***.",
        (("num_paragraphs", _INT),)),
    "length_constraints:number_words": (
        c.number_words, "Answer with {relation} {num_words} words.",
        (("num_words", _INT), ("relation", _REL))),
    "length_constraints:nth_paragraph_first_word": (
        c.nth_paragraph_first_word,
        "The response should have {num_paragraphs} paragraphs separated by blank lines, and "
        "paragraph {nth_paragraph} must start with the word {first_word}.",
        (("num_paragraphs", _INT), ("nth_paragraph", _INT), ("first_word", _STR))),
    "detectable_content:number_placeholders": (
        c.number_placeholders,
        "The response must contain at least {num_placeholders} placeholders in square "
        "brackets, such as [address].",
        (("num_placeholders", _INT),)),
    "detectable_content:postscript": (
        c.postscript, "End the response with a postscript starting with {postscript_marker}.",
        (("postscript_marker", _STR),)),
    "detectable_format:number_bullet_lists": (
        c.number_bullet_lists, "Use exactly {num_bullets} markdown bullet points.",
        (("num_bullets", _INT),)),
    "detectable_format:constrained_response": (
        c.constrained_response,
        "Answer with one of the following options: "
        + ", ".join(f"'{o}'" for o in c.CONSTRAINED_OPTIONS),
        ()),
    "detectable_format:number_highlighted_sections": (
        c.number_highlighted_sections,
        "Highlight at least {num_highlights} sections with markdown, i.e. *highlighted section*.",
        (("num_highlights", _INT),)),
    "detectable_format:multiple_sections": (
        c.multiple_sections,
        "The response must have {num_sections} sections, each starting with "
        "{section_spliter} X.",
        (("section_spliter", _STR), ("num_sections", _INT))),
    "detectable_format:json_format": (
        c.json_format, "The entire output should be valid JSON (markdown code fences allowed).",
        ()),
    "detectable_format:title": (
        c.title, "The answer must contain a title in double angular brackets, such as <<title>>.",
        ()),
    "combination:two_responses": (
        c.two_responses, "Give two different responses separated by six asterisks: ******.", ()),
    "combination:repeat_prompt": (
        c.repeat_prompt, "First repeat the request word for word ({prompt_to_repeat}), then "
        "give the answer.",
        (("prompt_to_repeat", _STR),)),
    "startend:end_checker": (
        c.end_checker, "Finish the response with the exact phrase {end_phrase}.",
        (("end_phrase", _STR),)),
    "startend:quotation": (
        c.quotation, "Wrap the entire response in double quotation marks.", ()),
    "change_case:english_capital": (
        c.english_capital, "The entire response should be in English and in capital letters.",
        ()),
    "change_case:english_lowercase": (
        c.english_lowercase,
        "The entire response should be in English and in lowercase letters, no capitals.", ()),
    "change_case:capital_word_frequency": (
        c.capital_word_frequency,
        "Words in all capital letters should appear {capital_relation} {capital_frequency} "
        "times.",
        (("capital_frequency", _INT), ("capital_relation", _REL))),
    "punctuation:no_comma": (c.no_comma, "Do not use any commas in the response.", ()),
}  # fmt: skip

SUPPORTED: frozenset[str] = frozenset(_SPEC)


def check_constraint(instruction_id: Any, kwargs: Any = None) -> dict[str, Any]:
    """The cleaned kwargs of one constraint, or ``InputError`` naming what is wrong.

    None-valued kwargs are dropped (IFEval's convention) and every required kwarg is parsed up
    front, rather than when a check happens to read it, so bad data fails the same way whatever
    the response looks like. The prompt loader calls this on every row, so an unknown id or a
    bad kwarg stops the run before any model is paid for, not after judging.
    """
    if not isinstance(instruction_id, str) or instruction_id not in _SPEC:
        raise InputError(f"unknown constraint instruction id: {c.short_repr(instruction_id)}")
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise InputError(f"constraint {instruction_id!r}: kwargs must be a dict, "
                         f"got {c.short_repr(kwargs)}")
    cleaned = {k: v for k, v in (kwargs or {}).items() if v is not None}
    try:
        for name, getter in _SPEC[instruction_id][2]:
            getter(cleaned, name)
    except c.KwargError as err:
        raise InputError(f"constraint {instruction_id!r}: {err}") from None
    return cleaned


def verify_constraint(
    response: str, instruction_id: str, kwargs: Mapping[str, Any] | None = None
) -> bool:
    """Whether ``response`` follows one IFEval constraint. Raises ``InputError`` on bad input."""
    cleaned = check_constraint(instruction_id, kwargs)
    return _SPEC[instruction_id][0](response, cleaned)


def verify_constraints(
    response: str,
    instruction_ids: Sequence[str],
    kwargs: Sequence[Mapping[str, Any] | None] | None = None,
) -> list[bool]:
    """One bool per instruction id, in order: IFEval's strict per-instruction verdicts.

    ``kwargs`` is aligned with ``instruction_ids`` (IFEval's ``kwargs`` column); it may be
    omitted when no constraint takes arguments. Raises ``InputError`` for an unknown id,
    misaligned lists or bad kwargs, since those are data problems a user must fix.
    """
    if isinstance(instruction_ids, str):
        raise InputError("instruction_ids must be a list of ids, not a single string")
    kw_list: Sequence[Mapping[str, Any] | None] = (
        [None] * len(instruction_ids) if kwargs is None else kwargs
    )
    if len(kw_list) != len(instruction_ids):
        raise InputError(
            f"{len(instruction_ids)} instruction ids but {len(kw_list)} kwargs entries"
        )
    return [
        verify_constraint(response, iid, kw)
        for iid, kw in zip(instruction_ids, kw_list, strict=True)
    ]


def _show(value: Any) -> str:
    """Quote strings and join lists so descriptions read naturally in a dataset card."""
    if isinstance(value, list):
        return ", ".join(_show(v) for v in value)
    if isinstance(value, str):
        short = value if len(value) <= 80 else value[:77] + "..."
        return f"'{short}'"
    return str(value)


def describe(instruction_id: str, kwargs: Mapping[str, Any] | None = None) -> str:
    """A human sentence for one constraint, e.g. for dataset cards and reports.

    ``describe("length_constraints:number_words", {"relation": "less than", "num_words": 50})``
    gives ``"Answer with less than 50 words."``. Raises ``InputError`` like the verifier.
    """
    cleaned = check_constraint(instruction_id, kwargs)
    _, template, params = _SPEC[instruction_id]
    values = {  # relations and numbers read better unquoted
        name: str(getter(cleaned, name)) if getter in (_REL, _INT) else _show(getter(cleaned, name))
        for name, getter in params
    }
    if instruction_id == "language:response_language":
        code = _STR(cleaned, "language")
        values["language"] = LANGUAGE_NAMES.get(code, code)
    return template.format(**values)
