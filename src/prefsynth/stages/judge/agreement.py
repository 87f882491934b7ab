"""Agreement between judges of a panel: Spearman's rho and Kendall's tau-b per aspect.

Pure Python (no scipy): panels are small and the data is a few thousand ratings. Ratings are
paired by (prompt, model); N/A and missing ratings are left out of a pair, never imputed.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence

from prefsynth.records import Judgment


def _ranks(xs: Sequence[float]) -> list[float]:
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    ranks = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _pearson(a: Sequence[float], b: Sequence[float]) -> float | None:
    n = len(a)
    ma, mb = sum(a) / n, sum(b) / n
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    va = sum((x - ma) ** 2 for x in a)
    vb = sum((y - mb) ** 2 for y in b)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else None


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rho with average ranks for ties; None when either side is constant."""
    if len(a) < 2:
        return None
    return _pearson(_ranks(a), _ranks(b))


def kendall_tau_b(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Kendall's tau-b (tie-corrected); None when either side is constant."""
    conc = disc = ties_a = ties_b = 0
    for i, j in itertools.combinations(range(len(a)), 2):
        da, db = a[i] - a[j], b[i] - b[j]
        if da == 0 and db == 0:
            continue
        if da == 0:
            ties_a += 1
        elif db == 0:
            ties_b += 1
        elif (da > 0) == (db > 0):
            conc += 1
        else:
            disc += 1
    denom = math.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
    return (conc - disc) / denom if denom else None


def judge_agreement(judgments: Sequence[Judgment]) -> list[dict[str, object]]:
    """Per aspect and pair of judges: n paired ratings, Spearman rho, Kendall tau-b."""
    # judge -> aspect -> (prompt, model) -> ratings over permutations
    acc: dict[str, dict[str, dict[tuple[str, str], list[int]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list)))
    for j in judgments:
        if j.error:
            continue
        for m, r in zip(j.models, j.ratings, strict=True):
            if isinstance(r, int):
                acc[j.judge][j.aspect][(j.prompt_id, m)].append(r)
    out: list[dict[str, object]] = []
    for ja, jb in itertools.combinations(sorted(acc), 2):
        for aspect in sorted(set(acc[ja]) & set(acc[jb])):
            xa, xb = acc[ja][aspect], acc[jb][aspect]
            keys = sorted(set(xa) & set(xb))
            a = [sum(xa[k]) / len(xa[k]) for k in keys]
            b = [sum(xb[k]) / len(xb[k]) for k in keys]
            out.append({"aspect": aspect, "judges": [ja, jb], "n": len(keys),
                        "spearman": spearman(a, b), "kendall_tau_b": kendall_tau_b(a, b)})
    return out
