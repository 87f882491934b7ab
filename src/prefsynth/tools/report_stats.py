"""The numbers behind ``prefsynth report``: small pure functions over the exported rows.

Kept apart from the figures and the HTML so each number can be unit-tested on a hand-built
list of dicts. Inputs are the rows of the output folder's parquet files (see ``export.py``):
judgment ratings are strings (``"1".."5"``, ``"N/A"``) or ``None`` (missing), and a missing
rating is never turned into a number here either.

Confidence intervals are percentile bootstraps that resample *prompts*. Every per-model
statistic below has at most one value per (prompt, model) — ratings are already averaged over
permutations in the annotations — so resampling a model's values is resampling its prompts.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Row = Mapping[str, Any]


def numeric(r: object) -> int | None:
    """A stored rating as an int, or None for ``N/A``/missing/garbage."""
    if isinstance(r, bool):
        return None
    if isinstance(r, int):
        return r
    if isinstance(r, str) and r.strip().lstrip("-").isdigit():
        return int(r.strip())
    return None


def bootstrap_ci(values: Sequence[float], n: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile bootstrap CI of the mean; (None, None) without data.

    Seeded so the same output folder always renders the same report.
    """
    if not values:
        return None, None
    if len(values) == 1 or n <= 0:
        v = float(values[0]) if len(values) == 1 else sum(values) / len(values)
        return v, v
    import numpy as np

    arr = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(arr), size=(n, len(arr)))
    means = arr[idx].mean(axis=1)
    alpha = (1.0 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _se(values: Sequence[float]) -> float:
    """Standard error of the mean (0 for fewer than two values)."""
    n = len(values)
    if n < 2:
        return 0.0
    m = sum(values) / n
    return (sum((v - m) ** 2 for v in values) / (n - 1) / n) ** 0.5


def pair_models(pairs_rows: Iterable[Row]) -> dict[str, tuple[str, str]]:
    """prompt id -> (chosen model, rejected model). ``Pair.id`` is the prompt id."""
    return {str(p["id"]): (str(p["chosen_model"]), str(p["rejected_model"])) for p in pairs_rows}


def leaderboard(annotations_rows: Sequence[Row], pairs_rows: Sequence[Row],
                n_boot: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """One row per model, best mean score first.

    - ``score``: mean aggregated judge score of its responses (unscored ones excluded);
    - ``win_rate``: times chosen / times its response competed for a prompt that produced a
      pair (with k responses per prompt, chance is 1/k);
    - ``pair_win_rate``: times chosen / times it was in a pair (chosen or rejected).
    Each comes with a 95% bootstrap CI (``*_lo``, ``*_hi``) over prompts.
    """
    pairs = pair_models(pairs_rows)
    scores: dict[str, list[float]] = defaultdict(list)
    wins: dict[str, list[float]] = defaultdict(list)
    pair_wins: dict[str, list[float]] = defaultdict(list)
    responses: Counter[str] = Counter()
    for r in annotations_rows:
        m = str(r["model"])
        responses[m] += 1
        if r.get("score") is not None:
            scores[m].append(float(r["score"]))
        pm = pairs.get(str(r["prompt_id"]))
        if pm is not None:
            wins[m].append(float(pm[0] == m))
            if m in pm:
                pair_wins[m].append(float(pm[0] == m))
    out = []
    for m in sorted(responses):
        row: dict[str, Any] = {"model": m, "responses": responses[m], "scored": len(scores[m]),
                               "competed": len(wins[m]), "in_pairs": len(pair_wins[m]),
                               "chosen": int(sum(wins[m]))}
        for key, vals in (("score", scores[m]), ("win_rate", wins[m]),
                          ("pair_win_rate", pair_wins[m])):
            row[key] = _mean(vals)
            row[f"{key}_lo"], row[f"{key}_hi"] = bootstrap_ci(vals, n_boot, seed)
        out.append(row)
    out.sort(key=lambda r: (r["score"] is None, -(r["score"] or 0.0), r["model"]))
    return out


def _last_content(messages: object) -> str | None:
    if isinstance(messages, list) and messages:
        last = messages[-1]
        if isinstance(last, Mapping):
            c = last.get("content")
            return c if isinstance(c, str) else None
    return None


def length_stats(pairs_rows: Sequence[Row]) -> dict[str, Any]:
    """Chosen vs rejected response length (characters and words) over pairs.

    A judge that rewards length shows ``chosen_longer`` well above 0.5.
    """
    chosen_chars: list[int] = []
    rejected_chars: list[int] = []
    chosen_words: list[int] = []
    rejected_words: list[int] = []
    for p in pairs_rows:
        c, r = _last_content(p.get("chosen")), _last_content(p.get("rejected"))
        if c is None or r is None:
            continue
        chosen_chars.append(len(c))
        rejected_chars.append(len(r))
        chosen_words.append(len(c.split()))
        rejected_words.append(len(r.split()))
    n = len(chosen_chars)
    longer = sum(c > r for c, r in zip(chosen_chars, rejected_chars, strict=True))
    equal = sum(c == r for c, r in zip(chosen_chars, rejected_chars, strict=True))
    return {
        "n": n, "chosen_chars": chosen_chars, "rejected_chars": rejected_chars,
        "chosen_words": chosen_words, "rejected_words": rejected_words,
        "chosen_longer": longer / n if n else None,
        "equal_length": equal / n if n else None,
        "mean_chosen_chars": _mean(chosen_chars), "mean_rejected_chars": _mean(rejected_chars),
        "mean_chosen_words": _mean(chosen_words), "mean_rejected_words": _mean(rejected_words),
    }


def position_stats(judgment_rows: Sequence[Row]) -> dict[str, list[dict[str, Any]]]:
    """aspect -> one entry per shown position (1-based): mean numeric rating, its standard
    error, numeric count, N/A count and missing count. Position ``i`` shows ``models[order[i]]``.

    Failed judgments are skipped, like ``run.json``'s ``position_means``: a half-parsed answer
    says more about the parser than about the position.
    """
    acc: dict[str, dict[int, list[int]]] = defaultdict(lambda: defaultdict(list))
    other: dict[str, dict[int, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
    width: dict[str, int] = defaultdict(int)
    for j in judgment_rows:
        if j.get("error"):
            continue
        aspect, ratings, order = str(j["aspect"]), list(j["ratings"]), list(j["order"])
        width[aspect] = max(width[aspect], len(order))
        for pos, idx in enumerate(order):
            raw = ratings[idx]
            v = numeric(raw)
            if v is not None:
                acc[aspect][pos].append(v)
            else:
                other[aspect][pos]["missing" if raw is None else "na"] += 1
    return {a: [{"position": pos + 1, "mean": _mean(acc[a][pos]), "se": _se(acc[a][pos]),
                 "n": len(acc[a][pos]), "na": other[a][pos]["na"],
                 "missing": other[a][pos]["missing"]}
                for pos in range(width[a])] for a in width}


def rating_distribution(judgment_rows: Sequence[Row]) -> dict[str, dict[str, int]]:
    """aspect -> counts of each rating label (``"1"``..``"5"``, ``"N/A"``, ``"missing"``), over
    every judge answer including failed ones (their missing ratings are the point)."""
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for j in judgment_rows:
        for r in j["ratings"]:
            v = numeric(r)
            out[str(j["aspect"])][str(v) if v is not None else
                                  ("missing" if r is None else "N/A")] += 1
    labels = [str(i) for i in range(1, 6)]
    result = {}
    for aspect, counts in out.items():
        extra = sorted((k for k in counts if k not in labels and k not in ("N/A", "missing")),
                       key=int)
        result[aspect] = {k: counts.get(k, 0) for k in [*labels, *extra, "N/A", "missing"]}
    return result


def _rates(rows: Sequence[Row]) -> dict[str, Any]:
    n = len(rows)
    failed = sum(bool(j.get("error")) for j in rows)
    reasked = sum(int(j.get("attempts") or 1) > 1 for j in rows)
    return {"n": n, "failed": failed, "reasked": reasked,
            "failure_rate": failed / n if n else None, "reask_rate": reasked / n if n else None}


def error_kind(error: str) -> str:
    """``"unparseable: found 2 of 4 ratings"`` -> ``"unparseable"`` (as ``run.json`` counts)."""
    return error.split(":")[0].strip() or "unknown"


def judge_stats(judgment_rows: Sequence[Row]) -> dict[str, Any]:
    """Failure rate (judgment recorded with an error) and re-ask rate (``attempts > 1``: the
    first answer was unusable and the judge was asked again), overall and per aspect, plus the
    count of each error kind."""
    by_aspect: dict[str, list[Row]] = defaultdict(list)
    for j in judgment_rows:
        by_aspect[str(j["aspect"])].append(j)
    kinds = Counter(error_kind(str(j["error"])) for j in judgment_rows if j.get("error"))
    examples: dict[str, str] = {}
    for j in judgment_rows:
        if j.get("error"):
            examples.setdefault(error_kind(str(j["error"])), str(j["error"]))
    return {"overall": _rates(judgment_rows),
            "aspects": {a: _rates(rows) for a, rows in by_aspect.items()},
            "errors": [{"kind": k, "count": c, "example": examples[k]}
                       for k, c in kinds.most_common()]}


def sample_pairs(pairs_rows: Sequence[Row], k: int, seed: int = 0) -> list[Row]:
    """A seeded sample of ``k`` pairs, in their dataset order."""
    if k >= len(pairs_rows):
        return list(pairs_rows)
    idx = sorted(random.Random(seed).sample(range(len(pairs_rows)), k))
    return [pairs_rows[i] for i in idx]
