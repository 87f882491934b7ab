"""The individual IFEval checks, as pure functions ``check(response, kwargs) -> bool``.

Each check reimplements the semantics of the matching class in Google's IFEval
(``instruction_following_eval/instructions.py``) without its heavy dependencies: no nltk
(words are ``\\w+`` runs exactly as IFEval's ``RegexpTokenizer``, sentences come from a small
rule-based splitter below), and ``langdetect`` only where a language has to be identified.
Where this module departs from IFEval on purpose, the check's docstring says so and why.

The public entry points (``verify_constraints``, ``describe``) live in ``prefsynth.stages.constraints.verifier``;
this module only knows how to check one constraint with already-cleaned kwargs.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

RELATIONS = ("less than", "at least")
CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


class KwargError(ValueError):
    """A constraint's kwargs are missing or malformed; ``constraints`` adds the id and re-raises."""


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr`` cut to ``limit`` characters: an error message stays one short line even when
    the offending value is a megabyte of text."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- kwargs access


def get_int(kw: Mapping[str, Any], name: str) -> int:
    """An integer kwarg; JSON round trips may turn ints into floats or strings, so coerce."""
    if name not in kw:
        raise KwargError(f"missing kwarg '{name}'")
    value = kw[name]
    try:
        if isinstance(value, bool) or int(float(value)) != float(value):
            raise ValueError
        return int(float(value))
    except (TypeError, ValueError, OverflowError):
        raise KwargError(f"kwarg '{name}' must be an integer, got {short_repr(value)}") from None


def get_str(kw: Mapping[str, Any], name: str) -> str:
    """A non-empty string kwarg (IFEval strips these before use, so do we)."""
    value = kw.get(name)
    if not isinstance(value, str) or not value.strip():
        raise KwargError(f"kwarg '{name}' must be a non-empty string, got {short_repr(value)}")
    return value.strip()


def get_str_list(kw: Mapping[str, Any], name: str) -> list[str]:
    """A list of strings; a bare string is accepted as a one-element list."""
    value = kw.get(name)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        raise KwargError(f"kwarg '{name}' must be a non-empty list of strings, got {short_repr(value)}")
    if not all(isinstance(v, str) and v.strip() for v in value):
        raise KwargError(f"kwarg '{name}' must contain only non-empty strings, got {short_repr(value)}")
    return [v.strip() for v in value]


def get_letter(kw: Mapping[str, Any], name: str) -> str:
    """One letter, lowercased: IFEval counts letters case-insensitively."""
    value = get_str(kw, name).lower()
    if len(value) != 1 or not value.isalpha():
        raise KwargError(f"kwarg '{name}' must be a single letter, got {short_repr(value)}")
    return value


def get_relation(kw: Mapping[str, Any], name: str) -> str:
    """IFEval's two comparison relations; anything else is a data error, not a silent pass."""
    value = kw.get(name)
    if value not in RELATIONS:
        raise KwargError(f"kwarg '{name}' must be one of {RELATIONS}, got {short_repr(value)}")
    return str(value)


def compare(actual: int, relation: str, threshold: int) -> bool:
    """``less than`` is strict (<), ``at least`` is >=, as in IFEval."""
    return actual < threshold if relation == "less than" else actual >= threshold


# --------------------------------------------------------------------------- text helpers

_WORD = re.compile(r"\w+")
# A sentence ends at a run of terminal punctuation (plus closing quotes/brackets) that is
# followed by whitespace or the end of the text: "3.14" and "example.com" never split.
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*(?=\s|$)")
_BLANK_LINE = re.compile(r"\n\s*\n")
_ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "sr", "jr", "st", "vs", "etc", "inc", "ltd", "co", "corp",
    "mt", "no", "fig", "approx", "dept", "est", "cf", "al", "jan", "feb", "mar", "apr", "jun",
    "jul", "aug", "sep", "sept", "oct", "nov", "dec", "e.g", "i.e", "a.m", "p.m", "u.s", "u.k",
    "ph.d",
})  # fmt: skip


def count_words(text: str) -> int:
    """Words are ``\\w+`` runs, exactly IFEval's ``RegexpTokenizer(r"\\w+")``."""
    return len(_WORD.findall(text))


def _ends_with_abbreviation(prefix: str) -> bool:
    """True when the period just after ``prefix`` closes an abbreviation or an initial."""
    match = re.search(r"(\S+)$", prefix)
    if match is None:
        return False
    token = match.group(1).lstrip("(\"'\u201c\u2018").lower()
    return token in _ABBREVIATIONS or (len(token) == 1 and token.isalpha())


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences without nltk.

    IFEval counts sentences with nltk's punkt model. This rule-based stand-in agrees with it on
    ordinary prose: it splits after ``.``, ``!`` or ``?`` followed by whitespace, but not after
    common abbreviations (``Dr.``, ``e.g.``, ``etc.``) or single-letter initials, and never
    inside numbers or URLs. One deliberate difference: a blank line also ends a sentence, so a
    heading or list item without a final period is not glued to the next paragraph. Fragments
    without any letter or digit (a stray ``...``) are not sentences.
    """
    sentences: list[str] = []
    for block in _BLANK_LINE.split(text):
        start = 0
        for match in _BOUNDARY.finditer(block):
            if match.group().rstrip("\"'\u201d\u2019)]") == "." and _ends_with_abbreviation(
                block[start : match.start()]
            ):
                continue
            sentences.append(block[start : match.end()].strip())
            start = match.end()
        sentences.append(block[start:].strip())
    return [s for s in sentences if _WORD.search(s)]


@functools.cache
def _langdetect() -> Any | None:
    """The ``langdetect`` module seeded for determinism, or None when it is not installed.

    Imported lazily because it loads ~50 language profiles on first use; seeded because its
    default is random and a verifier must give the same answer twice.
    """
    try:
        import langdetect  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        return None
    langdetect.DetectorFactory.seed = 0
    return langdetect


def langdetect_available() -> bool:
    """Whether language checks can run (``pip install langdetect``)."""
    return _langdetect() is not None


def _is_language(text: str, language: str) -> bool:
    """IFEval's rule: detected language must match; text langdetect cannot read passes."""
    module = _langdetect()
    if module is None:
        return False
    try:
        return bool(module.detect(text) == language)
    except module.LangDetectException:
        return True


# --------------------------------------------------------------------------- the checks


def response_language(response: str, kw: Mapping[str, Any]) -> bool:
    """The whole response is in ``language`` (ISO 639-1). False without ``langdetect``."""
    return _is_language(response, get_str(kw, "language"))


def number_sentences(response: str, kw: Mapping[str, Any]) -> bool:
    """Sentence count compared with ``num_sentences`` by ``relation``."""
    count = len(split_sentences(response))
    return compare(count, get_relation(kw, "relation"), get_int(kw, "num_sentences"))


def number_placeholders(response: str, kw: Mapping[str, Any]) -> bool:
    """At least ``num_placeholders`` square-bracket placeholders such as ``[address]``."""
    return len(re.findall(r"\[.*?\]", response)) >= get_int(kw, "num_placeholders")


def number_bullet_lists(response: str, kw: Mapping[str, Any]) -> bool:
    """Exactly ``num_bullets`` markdown bullets, counted with IFEval's two line patterns."""
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == get_int(kw, "num_bullets")


def constrained_response(response: str, kw: Mapping[str, Any]) -> bool:
    """The response contains one of IFEval's three fixed answers ("My answer is yes." ...)."""
    return any(option in response.strip() for option in CONSTRAINED_OPTIONS)


def number_highlighted_sections(response: str, kw: Mapping[str, Any]) -> bool:
    """At least ``num_highlights`` non-empty ``*highlighted*`` spans (``**x**`` counts too)."""
    count = sum(1 for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip())
    count += sum(
        1
        for h in re.findall(r"\*\*[^\n\*]*\*\*", response)
        if h.removeprefix("**").removesuffix("**").strip()
    )
    return count >= get_int(kw, "num_highlights")


def multiple_sections(response: str, kw: Mapping[str, Any]) -> bool:
    """At least ``num_sections`` sections, each opened by ``section_spliter`` and a number."""
    pattern = r"\s?" + re.escape(get_str(kw, "section_spliter")) + r"\s?\d+\s?"
    return len(re.split(pattern, response)) - 1 >= get_int(kw, "num_sections")


def number_paragraphs(response: str, kw: Mapping[str, Any]) -> bool:
    """Exactly ``num_paragraphs`` paragraphs separated by the markdown divider ``***``.

    As in IFEval, an empty paragraph at either end is ignored but one in the middle fails.
    """
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == get_int(kw, "num_paragraphs")


def postscript(response: str, kw: Mapping[str, Any]) -> bool:
    """A line starting with ``postscript_marker`` (``P.S.``/``P.P.S`` matched loosely)."""
    marker = get_str(kw, "postscript_marker")
    if marker == "P.P.S":
        pattern = r"\s*p\.\s?p\.\s?s.*$"
    elif marker == "P.S.":
        pattern = r"\s*p\.\s?s\..*$"
    else:
        pattern = r"\s*" + re.escape(marker.lower()) + r".*$"
    return bool(re.findall(pattern, response.lower(), flags=re.MULTILINE))


def keywords_existence(response: str, kw: Mapping[str, Any]) -> bool:
    """Every keyword appears, case-insensitively (substring match, as in IFEval)."""
    return all(
        re.search(re.escape(k), response, flags=re.IGNORECASE) for k in get_str_list(kw, "keywords")
    )


def keywords_frequency(response: str, kw: Mapping[str, Any]) -> bool:
    """Case-insensitive occurrences of ``keyword`` compared with ``frequency`` by ``relation``."""
    count = len(re.findall(re.escape(get_str(kw, "keyword")), response, flags=re.IGNORECASE))
    return compare(count, get_relation(kw, "relation"), get_int(kw, "frequency"))


def number_words(response: str, kw: Mapping[str, Any]) -> bool:
    """Word count compared with ``num_words`` by ``relation``."""
    return compare(count_words(response), get_relation(kw, "relation"), get_int(kw, "num_words"))


def json_format(response: str, kw: Mapping[str, Any]) -> bool:
    """The whole response parses as JSON, optionally inside a ```` ```json ```` fence."""
    value = response.strip()
    for prefix in ("```json", "```Json", "```JSON", "```"):
        if value.startswith(prefix):
            value = value[len(prefix) :]
            break
    value = value.removesuffix("```").strip()
    try:
        json.loads(value)
    except ValueError:
        return False
    return True


def nth_paragraph_first_word(response: str, kw: Mapping[str, Any]) -> bool:
    """Exactly ``num_paragraphs`` paragraphs split on ``\\n\\n``; paragraph ``nth_paragraph``
    starts with ``first_word`` (case-insensitive, leading quotes and trailing punctuation cut).

    IFEval counts only non-empty paragraphs but then indexes the raw split list, so a stray
    extra blank line shifts which paragraph it inspects; here the index is into the non-empty
    paragraphs, which is what the instruction means. Identical when no blank run is doubled.
    """
    paragraphs = [p.strip() for p in response.split("\n\n") if p.strip()]
    nth = get_int(kw, "nth_paragraph")
    expected = get_str(kw, "first_word").lower()
    if not 1 <= nth <= len(paragraphs):
        return False
    word = paragraphs[nth - 1].split()[0].lstrip("'\"")
    first = re.split(r"[.,?!'\"]", word, maxsplit=1)[0].lower()
    return len(paragraphs) == get_int(kw, "num_paragraphs") and first == expected


def forbidden_words(response: str, kw: Mapping[str, Any]) -> bool:
    """None of ``forbidden_words`` appears as a whole word, case-insensitively."""
    return not any(
        re.search(r"\b" + re.escape(w) + r"\b", response, flags=re.IGNORECASE)
        for w in get_str_list(kw, "forbidden_words")
    )


def two_responses(response: str, kw: Mapping[str, Any]) -> bool:
    """Exactly two different non-empty answers separated by ``******``."""
    parts = response.split("******")
    answers = []
    for index, part in enumerate(parts):
        if part.strip():
            answers.append(part.strip())
        elif index not in (0, len(parts) - 1):
            return False
    return len(answers) == 2 and answers[0] != answers[1]


def repeat_prompt(response: str, kw: Mapping[str, Any]) -> bool:
    """The response starts with ``prompt_to_repeat`` verbatim (case-insensitive)."""
    return response.strip().lower().startswith(get_str(kw, "prompt_to_repeat").lower())


def end_checker(response: str, kw: Mapping[str, Any]) -> bool:
    """The response ends with ``end_phrase`` (case-insensitive; wrapping quotes ignored)."""
    return response.strip().strip('"').lower().endswith(get_str(kw, "end_phrase").lower())


def title(response: str, kw: Mapping[str, Any]) -> bool:
    """A non-empty title in double angular brackets, such as ``<<poem of joy>>``."""
    return any(t.lstrip("<").rstrip(">").strip() for t in re.findall(r"<<[^\n]+>>", response))


def letter_frequency(response: str, kw: Mapping[str, Any]) -> bool:
    """Case-insensitive count of ``letter`` compared with ``let_frequency`` by ``let_relation``."""
    letter = get_letter(kw, "letter")
    count = response.lower().count(letter)
    return compare(count, get_relation(kw, "let_relation"), get_int(kw, "let_frequency"))


def english_capital(response: str, kw: Mapping[str, Any]) -> bool:
    """All capital letters, and English when ``langdetect`` is installed to tell.

    IFEval also requires English via langdetect; without it the case test alone decides,
    because the case is what the instruction is really about and it needs no model.
    """
    return response.isupper() and (not langdetect_available() or _is_language(response, "en"))


def english_lowercase(response: str, kw: Mapping[str, Any]) -> bool:
    """No capital letters, and English when ``langdetect`` is installed (see above)."""
    return response.islower() and (not langdetect_available() or _is_language(response, "en"))


def no_comma(response: str, kw: Mapping[str, Any]) -> bool:
    """No ASCII comma anywhere in the response."""
    return "," not in response


def capital_word_frequency(response: str, kw: Mapping[str, Any]) -> bool:
    """All-caps words counted and compared with ``capital_frequency`` by ``capital_relation``.

    IFEval tokenizes with nltk's ``word_tokenize``; here a word is a ``\\w+`` run with inner
    hyphens kept (``WELL-KNOWN`` is one word), which, like nltk, splits ``I'm`` into ``I`` + ``m``.
    """
    words = re.findall(r"\w+(?:-\w+)*", response)
    count = sum(1 for w in words if w.isupper())
    return compare(count, get_relation(kw, "capital_relation"), get_int(kw, "capital_frequency"))


def quotation(response: str, kw: Mapping[str, Any]) -> bool:
    """The whole response is wrapped in double quotation marks."""
    value = response.strip()
    return len(value) > 1 and value[0] == '"' and value[-1] == '"'
