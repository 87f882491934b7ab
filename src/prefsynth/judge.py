"""Judge: comparisons, one request per (comparison, aspect), ratings parsed back.

Responses are shuffled before judging (seeded per prompt and permutation) and the order is
recorded, so position bias does not follow model identity. Ratings are mapped back to models
through that order. Parsing is outside the request key: re-parsing costs no model call. A
judgment that does not yield exactly one valid rating per text is asked again with a new
``attempt`` index (a new key and sampler seed), up to ``judge.max_reasks`` times, and is then
recorded as failed with its raw output kept — never turned into a number.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence

from prefsynth.config import JudgeSpec
from prefsynth.generate import build_request
from prefsynth.judge_templates import aspect_scale, judgment_schema, render_judge_messages
from prefsynth.parse import parse_judgment, parse_structured
from prefsynth.records import (
    ChatRequest,
    ChatResult,
    Comparison,
    Dropped,
    Generation,
    Judgment,
    Prompt,
    Rating,
)
from prefsynth.seeding import rng_for, seed_for


def _orders(seed: int, prompt_id: str, k: int, n: int) -> list[list[int]]:
    """``n`` distinct shuffled orders of ``k`` responses (as distinct as k! allows)."""
    rng = rng_for(seed, "order", prompt_id)
    all_orders = [list(p) for p in itertools.permutations(range(k))] if k <= 6 else []
    if all_orders:
        rng.shuffle(all_orders)
        return [all_orders[i % len(all_orders)] for i in range(n)]
    out = []
    for _ in range(n):
        order = list(range(k))
        rng.shuffle(order)
        out.append(order)
    return out


def comparisons(prompts: Sequence[Prompt], generations: Sequence[Generation],
                assignment: Mapping[str, list[str]], seed: int, permutations: int = 1
                ) -> tuple[list[Comparison], list[Dropped]]:
    """Comparisons for prompts whose every picked model answered; the rest are dropped."""
    gens = {(g.prompt_id, g.model): g for g in generations}
    comps: list[Comparison] = []
    dropped: list[Dropped] = []
    for p in prompts:
        models = assignment[p.id]
        got = [gens.get((p.id, m)) for m in models]
        if any(g is None or g.error == "pending" for g in got):
            dropped.append(Dropped(p.id, "generation_pending"))
            continue
        if any(g is None or g.text is None for g in got):
            dropped.append(Dropped(p.id, "generation_failed"))
            continue
        texts = [g.text or "" for g in got if g is not None]
        for i, order in enumerate(_orders(seed, p.id, len(models), permutations)):
            comps.append(Comparison(p.id, list(models), texts, order, i))
    return comps, dropped


def judge_requests(comps: Sequence[Comparison], prompts: Mapping[str, Prompt], spec: JudgeSpec,
                   seed: int, attempt: int, only: set[tuple[str, str, int]] | None = None
                   ) -> list[ChatRequest]:
    """One request per (comparison, aspect); ``only`` limits to (prompt, aspect, permutation)."""
    structured = spec.mode == "structured"
    custom = spec.templates_dir
    reqs = []
    for c in comps:
        prompt = prompts[c.prompt_id]
        shown = [c.texts[i] for i in c.order]
        for aspect in spec.aspects:
            if only is not None and (c.prompt_id, aspect, c.permutation) not in only:
                continue
            render = functools.partial(render_judge_messages, aspect, prompt.text, shown,
                                       prompt.reference, structured=structured,
                                       custom_dir=custom)
            messages = render()
            fmt = None
            if structured:
                lo, hi, na = aspect_scale(aspect, custom_dir=custom)
                fmt = judgment_schema(len(shown), na, lo, hi)
            # attempt 0 keeps the run seed; a re-ask samples again with another seed
            s = seed_for(seed, "judge", c.prompt_id, aspect, c.permutation, attempt)
            reqs.append(build_request(spec, messages, s, fmt, build=render,
                                      prompt_id=c.prompt_id, aspect=aspect,
                                      permutation=c.permutation, attempt=attempt))
    return reqs


def needs_reask(j: Judgment) -> bool:
    """An answer that came back but did not give one valid rating per text (or was cut off):
    worth asking again. A failed request is not — the next run retries that one."""
    return j.error is not None and j.error.startswith(("unparseable", "truncated"))


def to_judgment(req: ChatRequest, comp: Comparison, result: ChatResult | None,
                spec: JudgeSpec) -> Judgment:
    """Parse one judge answer into ratings per model (mapped back through the order)."""
    aspect = str(req.tag["aspect"])
    k = len(comp.models)
    base = Judgment(comp.prompt_id, aspect, comp.models, [None] * k, [None] * k, comp.order,
                    attempts=int(req.tag["attempt"]) + 1, permutation=comp.permutation,
                    judge=spec.name)
    if result is None:
        base.error = "pending"
        return base
    base.raw = result.text
    if not result.ok:
        base.error = f"request failed: {result.error}"
        return base
    text = result.text or ""
    lo, hi, na = aspect_scale(aspect, custom_dir=spec.templates_dir)
    parse = parse_structured if spec.mode == "structured" else parse_judgment
    shown_r, shown_why = parse(text, aspect, k, lo=lo, hi=hi, allow_na=na)
    ratings: list[Rating] = [None] * k
    why: list[str | None] = [None] * k
    for pos, idx in enumerate(comp.order):
        ratings[idx] = shown_r[pos]
        why[idx] = shown_why[pos]
    base.ratings, base.rationales = ratings, why
    found = sum(r is not None for r in ratings)
    if found != k:
        base.error = f"unparseable: found {found} of {k} ratings"
    elif result.finish_reason == "length" and spec.mode == "structured":
        base.error = "truncated: judge hit max_tokens"
    return base
