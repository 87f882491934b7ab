"""Parse judge output into one rating (and rationale) per text.

Why not upstream's regex: open-instruct's ``synth_pref`` parser splits on blank lines and maps
ratings by position, so a preamble shifts every rating by one, and whatever it cannot read
becomes ``1`` — a real-looking rating nobody gave. Here ratings are mapped by the text
*number* the judge wrote (``#### Output for Text 3``), anything doubtful (conflicting
duplicates, out-of-range values, ``8/10`` on a 1..5 scale, ``3-4``) becomes ``None``, and a
missing rating is never turned into a number. ``None`` lets the judge stage re-ask.

Scales are generic (``lo``..``hi``); ``N/A`` is accepted only where allowed (by default only
for the honesty aspect, as in UltraFeedback).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

Rating = int | str | None
NA = "N/A"
_INVALID = object()  # a rating was written but is not acceptable: poisons that text

_WORDS = {w: i for i, w in enumerate(
    ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"])}
# Leading decoration a line may carry: markdown headings, bullets, quotes, list numbers.
_LEAD = re.compile(r"^(?:\s|[#>*_•+\-]|\d+[.)]\s)*")
_HEADER = re.compile(
    r"^(?:output|evaluation|assessment|annotation|feedback|rating)s?\s+(?:for|of)\s+"
    r"(?=(?:<\s*)?text)|^", re.IGNORECASE)
_TEXT_N = re.compile(r"(?:<\s*)?text\s*(?:#|no\.?\s*)?(\d{1,3})\b\s*>?", re.IGNORECASE)
_LABEL = re.compile(
    r"^(?:final\s+|overall\s+)?(?:rating|score)"
    r"(?:\s+for\s+(?:text\s*)?(\d{1,3}))?\s*(?:\([^)]*\))?\s*"
    r"(?:[:=：]|[-–—](?=\s)|\bis\b|(?=\s*(?:\d|n\s*/\s*a)))\s*(.*)$",
    re.IGNORECASE)
_RATIONALE = re.compile(
    r"^(?:rationale|reason(?:ing)?|justification|explanation)(?:\s+for\s+[\w ]{1,30}?)?"
    r"\s*[:：]\s*(.*)$", re.IGNORECASE)
_OTHER_LABEL = re.compile(r"^(?:type|types)\s*[:：]", re.IGNORECASE)
_STOP = re.compile(r"^(?:-{3,}|\*{3,}|_{3,}|={3,})\s*$|^(?:overall|in summary|summary|in "
                   r"conclusion|conclusion|final ranking|ranking)\b", re.IGNORECASE)
_NUM = re.compile(r"(\d+(?:[.,]\d+)?)\s*(%)?(?:\s*(?:/|out\s+of\b|of\b)\s*(\d+))?",
                  re.IGNORECASE)
_RANGE_AFTER = re.compile(r"^\s*(?:-|–|—|to\b|or\b|and\b)\s*\d")
_NAME_THEN_NUM = re.compile(r"^[A-Za-z][A-Za-z '/&\-]{0,40}\(\s*(\d{1,3})\s*\)\s*\.?$")
_NA = re.compile(r"^(?:n\s*/\s*a|not\s+applicable)\b", re.IGNORECASE)


def _clean(line: str) -> str:
    """Drop emphasis/code markers and leading decoration, so ``- **Rating:** 4`` reads as
    ``Rating: 4``. Underscores inside words survive (only ``_`` runs next to spaces go)."""
    line = line.replace("\u00a0", " ").replace("`", "")
    line = re.sub(r"\*+", "", line)
    line = re.sub(r"(?<!\w)_+|_+(?!\w)", "", line)
    return _LEAD.sub("", line).strip()


def _value(raw: str, lo: int, hi: int, allow_na: bool) -> object:
    """What one ``Rating:`` value says: an int, ``"N/A"``, ``_INVALID`` (a rating was given
    but cannot be accepted) or ``None`` (nothing rating-like, e.g. an echoed placeholder)."""
    s = re.sub(r"[\[\]*_`\"']", "", raw).strip().lstrip("({").strip()
    if not s:
        return None
    if _NA.match(s):
        return NA if allow_na else _INVALID
    word = re.match(r"([A-Za-z]+)\b(?=\s*(?:$|[.(/\-–—]|out\s+of\b))", s)
    if word and word.group(1).lower() in _WORDS:
        s = str(_WORDS[word.group(1).lower()]) + s[word.end():]
    m = _NUM.match(s)
    if m is None:
        named = _NAME_THEN_NUM.match(s)
        if named is None or re.search(r"\b(?:text|rating)\b", s, re.IGNORECASE):
            return None
        m = _NUM.match(named.group(1))
        assert m is not None
    number, percent, denom = m.groups()
    if percent or _RANGE_AFTER.match(s[m.end():]):
        return _INVALID
    if denom is not None and int(denom) != hi:
        return _INVALID
    number = number.replace(",", ".")
    if "." in number:
        whole, frac = number.split(".")
        if frac.strip("0"):
            return _INVALID
        number = whole
    val = int(number)
    return val if lo <= val <= hi else _INVALID


@dataclass
class _Section:
    ratings: list[object] = field(default_factory=list)
    rationale_after: list[str] = field(default_factory=list)
    rationale_any: list[str] = field(default_factory=list)


def _header(raw: str, clean: str) -> tuple[int, str] | None:
    """``(text number, rest of line)`` when the line opens a text's section.

    A line *starting* with "Text 2" is only a header when it looks like one (markdown heading,
    bold, "Output for", ``<text 2>``, or nothing but punctuation / a rating after the number),
    so a rationale saying "Text 2 is better than Text 1" does not open a section.
    """
    pre = _HEADER.match(clean)
    assert pre is not None
    m = _TEXT_N.match(clean, pre.end())
    if m is None:
        return None
    rest = clean[m.end():].strip()
    stripped = raw.lstrip()
    strong = pre.end() > 0 or stripped.startswith(("#", "**", "__", "<")) or "<" in m.group(0)
    tail = re.sub(r"^\([^)]*\)", "", rest).strip(" :.-–—)")
    if strong or not tail or _LABEL.match(tail) or _bare_value(tail):
        return int(m.group(1)), rest
    return None


def _bare_value(s: str) -> bool:
    """A header remainder that is only a rating, as in ``Text 1: 4/5``."""
    return re.fullmatch(r"\d{1,3}(?:\s*/\s*\d{1,3})?(?:\s*\([^)]*\))?\.?|n\s*/\s*a", s.strip(),
                        re.IGNORECASE) is not None


def _scan(text: str, lo: int, hi: int, allow_na: bool) -> tuple[dict[int, _Section], _Section]:
    """Split into sections by text number; also return the part before any header."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    preamble = _Section()
    sections: dict[int, _Section] = {}
    current = preamble
    explicit: list[tuple[int, object]] = []
    capture: list[str] | None = None  # rationale lines being collected

    def close_capture() -> None:
        nonlocal capture
        if capture is not None:
            body = "\n".join(capture).strip()
            if body:
                target = current.rationale_after if current.ratings else current.rationale_any
                target.append(body)
                if target is current.rationale_after:
                    current.rationale_any.append(body)
        capture = None

    def add_rating(value_text: str, idx: int, number: str | None) -> None:
        value = _value(value_text, lo, hi, allow_na)
        if value is None and not value_text.strip() and idx + 1 < len(lines):
            nxt = next((ln for ln in lines[idx + 1:] if ln.strip()), "")
            if _bare_value(_clean(nxt)):
                value = _value(_clean(nxt), lo, hi, allow_na)
        if value is None:
            return
        if number is not None:
            explicit.append((int(number), value))
        else:
            current.ratings.append(value)

    for idx, raw in enumerate(lines):
        clean = _clean(raw)
        head = _header(raw, clean) if clean else None
        if head is not None:
            close_capture()
            current = sections.setdefault(head[0], _Section())
            rest = head[1].lstrip(" :-–—(")
            label = _LABEL.match(rest)
            if label:
                add_rating(label.group(2), idx, label.group(1))
            elif _bare_value(rest):
                add_rating(rest, idx, None)
            continue
        label = _LABEL.match(clean)
        rationale = _RATIONALE.match(clean)
        if label or rationale or _OTHER_LABEL.match(clean):
            close_capture()
            if label:
                add_rating(label.group(2), idx, label.group(1))
            elif rationale:
                capture = [rationale.group(1)]
        elif capture is not None:
            bare = raw.strip()
            if _STOP.match(bare) or (clean and (_STOP.match(clean) or bare.startswith("#"))):
                close_capture()
            else:
                capture.append(raw.strip())
    close_capture()
    for number, value in explicit:
        sections.setdefault(number, _Section()).ratings.append(value)
    return sections, preamble


def _decide(values: list[object]) -> Rating:
    """Exactly one distinct acceptable value, else ``None``."""
    if not values or any(v is _INVALID for v in values):
        return None
    distinct = set(values)
    if len(distinct) != 1:
        return None
    only = distinct.pop()
    return only if isinstance(only, (int, str)) else None


def _na_default(aspect: str, allow_na: bool | None) -> bool:
    return aspect == "honesty" if allow_na is None else allow_na


def parse_judgment(text: str, aspect: str, n: int, *, lo: int = 1, hi: int = 5,
                   allow_na: bool | None = None) -> tuple[list[Rating], list[str | None]]:
    """Ratings and rationales for texts 1..n, mapped by the text number the judge wrote.

    ``None`` marks a text with no acceptable rating (missing, conflicting, out of range).
    Sections numbered above ``n`` are ignored. With ``n == 1`` and no section header, the
    single ``Rating:`` line of the answer is used. The rationale is the one written after the
    rating (helpfulness/truthfulness also have a type rationale before it), else the first.

    Strong judges sometimes answer in JSON unasked; when the UltraFeedback format yields no
    rating at all, a ``{"ratings": [...]}`` object in the answer (fenced or bare) is read as
    :func:`parse_structured` reads it, rather than costing a re-ask.
    """
    if n < 1:
        return [], []
    na = _na_default(aspect, allow_na)
    sections, preamble = _scan(text or "", lo, hi, na)
    if n == 1 and 1 not in sections and preamble.ratings:
        sections[1] = preamble
    ratings: list[Rating] = []
    rationales: list[str | None] = []
    for i in range(1, n + 1):
        sec = sections.get(i)
        ratings.append(_decide(sec.ratings) if sec else None)
        why = (sec.rationale_after or sec.rationale_any) if sec else []
        rationales.append(why[0] if why else None)
    if all(r is None for r in ratings):
        return _from_json_objects(text or "", n, lo, hi, na) or (ratings, rationales)
    return ratings, rationales


def parse_ratings(text: str, aspect: str, n: int, *, lo: int = 1, hi: int = 5,
                  allow_na: bool | None = None) -> list[Rating]:
    """One entry per text: an int in ``lo..hi``, ``"N/A"`` (honesty only unless
    ``allow_na``), or ``None`` where no valid rating was found. Reads the UltraFeedback text
    format, or a ``{"ratings": [...]}`` JSON answer. See :func:`parse_judgment`."""
    return parse_judgment(text, aspect, n, lo=lo, hi=hi, allow_na=allow_na)[0]


def _json_payload(text: str) -> Any:
    s = (text or "").strip()
    fence = re.search(r"```(?:json|JSON)?\s*\n?(.*?)```", s, re.DOTALL)
    if fence:
        s = fence.group(1).strip()
    try:
        return json.loads(s)
    except RecursionError:  # nested too deep for the decoder: not an answer
        return None
    except ValueError:
        start = min((i for i in (s.find("{"), s.find("[")) if i >= 0), default=-1)
        end = max(s.rfind("}"), s.rfind("]"))
        if start < 0 or end <= start:
            return None
        try:
            return json.loads(s[start:end + 1])
        except (ValueError, RecursionError):
            return None


def _json_rating(v: Any, lo: int, hi: int, allow_na: bool) -> Rating:
    if isinstance(v, bool):
        return None
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, str):
        got = _value(v, lo, hi, allow_na) if re.fullmatch(
            r"\s*(?:\d+|n\s*/\s*a)\s*", v, re.IGNORECASE) else None
        return got if isinstance(got, (int, str)) else None
    return v if isinstance(v, int) and lo <= v <= hi else None


def parse_structured(text: str, aspect: str, n: int, lo: int = 1, hi: int = 5,
                     allow_na: bool | None = None) -> tuple[list[Rating], list[str | None]]:
    """Ratings and rationales from structured (JSON) judge output.

    Accepts ``{"ratings": [{"text", "rationale", "rating"}, ...]}`` (our schema), a bare list
    of such items, or distilabel's ``{"ratings": [4, 3], "rationales": [...]}``. Items go to
    the text named by their ``text`` field when it is a valid, unused number, else to their
    list position. Anything invalid, or two items for one text, gives ``None`` for that text.
    """
    return _from_payload(_json_payload(text), n, lo, hi, _na_default(aspect, allow_na))


def _from_json_objects(text: str, n: int, lo: int, hi: int, na: bool
                       ) -> tuple[list[Rating], list[str | None]] | None:
    """Text mode's JSON fallback: every ``{"ratings": [...]}`` object in the answer, fenced
    or bare, read like structured output; ``None`` when there is none. A text keeps its
    rating only when every object gives it the same one (an object that leaves it out or
    rates it invalidly is a disagreement too), as conflicting sections do in the text format."""
    found = [_from_payload(obj, n, lo, hi, na) for obj in _json_objects(text)]
    if not found:
        return None
    first = found[0][0]
    ratings = [first[i] if all(got[0][i] == first[i] for got in found) else None
               for i in range(n)]
    rationales = [next((got[1][i] for got in found if got[1][i] is not None), None)
                  for i in range(n)]
    return ratings, rationales


_OBJECT_START = re.compile(r'\{\s*"')
_MAX_OBJECT_TRIES = 20  # a failed decode may read to the end of the text: keep this linear


def _json_objects(text: str) -> list[dict[str, Any]]:
    """The JSON objects with a ``ratings`` list found in ``text``, outermost first, in order.
    Decoding starts at each ``{"``, so fences, preambles and trailing prose do not matter;
    a bare list is not taken (in prose, ``[1, 2]`` is too likely to mean something else)."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    pos, tries = 0, 0
    while tries < _MAX_OBJECT_TRIES and (m := _OBJECT_START.search(text, pos)) is not None:
        tries += 1
        try:
            obj, end = decoder.raw_decode(text, m.start())
        except (ValueError, RecursionError):  # not JSON, or nested too deep for the decoder
            pos = m.start() + 1
            continue
        if isinstance(obj, dict) and isinstance(obj.get("ratings"), list):
            found.append(obj)
        pos = end
    return found


def _from_payload(data: Any, n: int, lo: int, hi: int, na: bool
                  ) -> tuple[list[Rating], list[str | None]]:
    """Ratings and rationales from one decoded JSON answer (see :func:`parse_structured`)."""
    ratings: list[Rating] = [None] * max(n, 0)
    rationales: list[str | None] = [None] * max(n, 0)
    items = data.get("ratings") if isinstance(data, dict) else data
    if not isinstance(items, list) or n < 1:
        return ratings, rationales
    side = data.get("rationales") if isinstance(data, dict) else None
    by_text: dict[int, list[tuple[Rating, str | None]]] = {}
    for pos, item in enumerate(items):
        if isinstance(item, dict):
            num = item.get("text")
            ok_num = isinstance(num, int) and not isinstance(num, bool) and 1 <= num <= n
            slot = num if ok_num else pos + 1
            why = item.get("rationale")
            value = _json_rating(item.get("rating"), lo, hi, na)
        else:
            slot, value = pos + 1, _json_rating(item, lo, hi, na)
            why = side[pos] if isinstance(side, list) and pos < len(side) else None
        if isinstance(slot, int) and 1 <= slot <= n:
            by_text.setdefault(slot, []).append((value, why if isinstance(why, str) else None))
    for slot, got in by_text.items():
        if len(got) == 1:
            ratings[slot - 1], rationales[slot - 1] = got[0]
    return ratings, rationales
