"""Benchmark: how often each judge-output parser gets the ratings right, and how often it
invents a wrong one.

Corpus: ``bench/data/judge_outputs.jsonl``, judge answers in the formats judges really produce
(clean GPT-4 style, bold markdown, ``4/5``, out-of-order sections, preambles, missing sections,
truncation, CRLF, N/A, tables, garbage), each with the ratings the judge actually gave
(``null`` where it gave none usable).

Three parsers run on the same corpus:

* ``prefsynth``: :func:`prefsynth.stages.judge.parse.parse_ratings`.
* ``open-instruct``: a re-implementation of allenai/open-instruct
  ``scripts/synth_pref/utils/ultrafeedback_template.py::parser`` followed by
  ``parse_preferences.py::get_rating``, the Tulu 3 pipeline: split on blank lines, one regex
  per chunk, ratings by position, an unmatched chunk or a rating without digits becomes
  ``"1"``, and ``get_rating`` turns anything ``int()`` rejects ("N/A") into ``-1``; the
  binarizer keeps the first ``n`` (``mean_ratings[:4]``).
* ``distilabel``: a re-implementation of argilla-io/distilabel
  ``steps/tasks/ultrafeedback.py`` ``_format_ratings_rationales_output`` /
  ``_format_types_ratings_rationales_output``: the same split and regexes, ``None`` for an
  unmatched chunk, N/A -> ``None``; an exception (a rating with no digit) makes the whole
  output ``None``, as distilabel's task wrapper does.

Per text slot: *wrong* = the parser returned a rating that differs from the truth (the
dangerous case: it silently corrupts the preference pair), *missing* = the truth has a rating
and the parser returned none (safe: the judge can be re-asked). *exact* = every slot of the
sample right. Run: ``.venv/bin/python bench/judge_parse.py``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from prefsynth.stages.judge.parse import parse_ratings

CORPUS = Path(__file__).parent / "data" / "judge_outputs.jsonl"
Slot = int | str | None
Parser = Callable[[str, str, int], list[Slot]]

_PLAIN = re.compile(r"Rating: (.+?)\nRationale: (.+)", re.DOTALL)
_TYPED = re.compile(r"Type: (.+?)\nRationale: (.+?)\nRating: (.+?)\nRationale: (.+)", re.DOTALL)
_DIGITS = re.compile(r"\b\d+\b")


def _fit(values: list[Slot], n: int) -> list[Slot]:
    """First ``n`` values, padded with ``None`` (a short list is NaN-padded upstream)."""
    return (values + [None] * n)[:n]


def open_instruct(text: str, aspect: str, n: int) -> list[Slot]:
    """Tulu 3's parser + ``get_rating``, re-implemented (see module docstring)."""
    typed = aspect in ("truthfulness", "helpfulness")
    strings: list[str] = []
    for chunk in text.split("\n\n"):
        m = (_TYPED if typed else _PLAIN).search(chunk)
        if m is None:
            strings.append("1")
            continue
        raw = m.group(3 if typed else 1)
        found = _DIGITS.findall(raw)
        rating = found[0] if found else "1"
        if not typed and raw == "N/A":
            rating = "N/A"
        strings.append(rating)

    def get_rating(s: str) -> int:
        try:
            return int(s)
        except ValueError:
            return -1

    return _fit([get_rating(s) for s in strings], n)


def distilabel(text: str, aspect: str, n: int) -> list[Slot]:
    """distilabel's UltraFeedback ``format_output``, re-implemented (see module docstring)."""
    typed = aspect in ("truthfulness", "helpfulness")
    out: list[Slot] = []
    try:
        for chunk in text.split("\n\n"):
            m = (_TYPED if typed else _PLAIN).search(chunk) if chunk else None
            if m is None:
                out.append(None)
                continue
            raw = m.group(3 if typed else 1)
            if typed:  # the "types" field is parsed first and raises the same way
                t = m.group(1)
                _ = None if t in ("None", "N/A") else int(_DIGITS.findall(t)[0])
            out.append(None if raw in ("None", "N/A") else int(_DIGITS.findall(raw)[0]))
    except (IndexError, ValueError):
        return [None] * n
    return _fit(out, n)


def ours(text: str, aspect: str, n: int) -> list[Slot]:
    return parse_ratings(text, aspect, n)


PARSERS: dict[str, Parser] = {"prefsynth": ours, "open-instruct": open_instruct,
                              "distilabel": distilabel}


def score(parser: Parser, samples: list[dict]) -> dict[str, float]:
    """Exact-sample, wrong-slot and missing-slot rates, plus parse time per sample."""
    exact = wrong = missing = slots = 0
    start = time.perf_counter()
    for s in samples:
        got = parser(s["output"], s["aspect"], s["n"])
        truth = s["expected"]
        exact += got == truth
        for g, t in zip(got, truth, strict=True):
            slots += 1
            if g is None and t is not None:
                missing += 1
            elif g != t:
                wrong += 1
    elapsed = time.perf_counter() - start
    return {"exact": exact / len(samples), "wrong": wrong / slots, "missing": missing / slots,
            "wrong_n": wrong, "slots": slots, "us": 1e6 * elapsed / len(samples)}


def _ratio(a: float, b: float) -> str:
    if b == 0:
        return "n/a" if a == 0 else "inf"
    return f"{a / b:.2f}x"


def main() -> int:
    samples = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()
               if line.strip()]
    results = {name: score(p, samples) for name, p in PARSERS.items()}
    slots = results["prefsynth"]["slots"]
    print(f"corpus: {len(samples)} judge outputs, {slots} rated texts ({CORPUS.name})\n")
    print(f"{'parser':<14} {'exact':>7} {'wrong':>14} {'missing':>8} {'us/sample':>10}")
    for name, r in results.items():
        print(f"{name:<14} {r['exact']:>7.1%} {r['wrong']:>7.1%} ({r['wrong_n']:>3}) "
              f"{r['missing']:>8.1%} {r['us']:>10.1f}")
    o = results["prefsynth"]
    print("\nprefsynth vs baseline: exact-match ratio (higher is better), "
          "wrong-number ratio (lower is better)")
    for name in ("open-instruct", "distilabel"):
        b = results[name]
        print(f"  vs {name:<14} exact {_ratio(o['exact'], b['exact']):>6}   "
              f"wrong {_ratio(o['wrong'], b['wrong']):>6}  "
              f"({o['wrong_n']} vs {b['wrong_n']} wrong slots)")

    print("\nexact match by category")
    cats = sorted({s["category"] for s in samples}, key=[s["category"] for s in samples].index)
    print(f"  {'category':<18} {'n':>3} " + " ".join(f"{p:>13}" for p in PARSERS))
    for cat in cats:
        sub = [s for s in samples if s["category"] == cat]
        row = [sum(p(s["output"], s["aspect"], s["n"]) == s["expected"] for s in sub)
               for p in PARSERS.values()]
        print(f"  {cat:<18} {len(sub):>3} " + " ".join(f"{v:>13}" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
