"""Judgments: one judge request per (comparison, aspect, permutation), ratings parsed back.

Ratings are mapped back to models through the order the comparison recorded. Parsing is outside the request key: re-parsing costs no model call. A
judgment that does not yield exactly one valid rating per text is asked again with a new
``attempt`` index (a new key and sampler seed), up to ``judge.max_reasks`` times, and is then
recorded as failed with its raw output kept — never turned into a number.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

from prefsynth.config import JudgeSpec
from prefsynth.core.keys import build_request
from prefsynth.records import (
    ChatRequest,
    ChatResult,
    Comparison,
    JudgeTag,
    Judgment,
    Prompt,
    Rating,
    RequestState,
)
from prefsynth.seeding import seed_for
from prefsynth.stages.judge.parse import parse_judgment, parse_structured
from prefsynth.stages.judge.rubrics import aspect_scale, judgment_schema, render_judge_messages


def judge_requests(comps: Sequence[Comparison], prompts: Mapping[str, Prompt], spec: JudgeSpec,
                   seed: int, attempt: int, only: set[tuple[str, str, int]] | None = None
                   ) -> list[ChatRequest]:
    """One request per (comparison, aspect); ``only`` limits to (prompt, aspect, permutation).
    The requests are lazy: a round holds every key of a shard, not every rendered rubric."""
    return [judge_request(c, prompts[c.prompt_id], aspect, spec, seed, attempt)
            for c in comps for aspect in spec.aspects
            if only is None or (c.prompt_id, aspect, c.permutation) in only]


def judge_request(c: Comparison, prompt: Prompt, aspect: str, spec: JudgeSpec, seed: int,
                  attempt: int, *, keep: bool = False) -> ChatRequest:
    """The request for one (comparison, aspect) at ``attempt``. With ``keep`` the messages
    rendered for the key stay on the request until it is sent (``ChatRequest.release``):
    rendered once, for a caller that builds each request just before it goes out."""
    structured = spec.mode == "structured"
    shown = [c.texts[i] for i in c.order]
    render = functools.partial(render_judge_messages, aspect, prompt.text, shown,
                               prompt.reference, structured=structured,
                               custom_dir=spec.templates_dir)
    fmt = None
    if structured:
        lo, hi, na = aspect_scale(aspect, custom_dir=spec.templates_dir)
        fmt = judgment_schema(len(shown), na, lo, hi)
    # attempt 0 keeps the run seed; a re-ask samples again with another seed
    s = seed_for(seed, "judge", c.prompt_id, aspect, c.permutation, attempt)
    return build_request(spec, render(), s, fmt, build=render, keep=keep,
                         tag=JudgeTag(c.prompt_id, aspect, c.permutation, attempt))


def reask_due(j: Judgment, spec: JudgeSpec) -> bool:
    """The re-ask rule, judgment by judgment: an answer worth asking again (``needs_reask``)
    that has not used up ``spec.max_reasks``. ``JudgeRounds`` and the streaming pipeline
    (``core.stream``) both follow it, so both ask the same keys."""
    return needs_reask(j) and j.attempts <= spec.max_reasks


def stage_of(attempt: int) -> str:
    """The store's stage name for a judge request at ``attempt``."""
    return "judge" if attempt == 0 else f"judge-reask{attempt}"


class JudgeRounds:
    """One judge's re-ask rounds over a shard's comparisons, written once and driven from
    outside: the pipeline answers each round through the executor, ``prefsynth status``
    through store look-ups. Either way the same keys are asked in the same rounds::

        while reqs := rounds.requests():
            rounds.take(answers_to(reqs))

    Round 0 asks every (comparison, aspect); each later round asks only the judgments whose
    answer came back but did not parse (``needs_reask``), up to ``spec.max_reasks`` times.
    """

    def __init__(self, comps: Sequence[Comparison], prompts: Mapping[str, Prompt],
                 spec: JudgeSpec, seed: int) -> None:
        self.comps, self.prompts, self.spec, self.seed = comps, prompts, spec, seed
        self.by_comp = {(c.prompt_id, c.permutation): c for c in comps}
        self.final: dict[tuple[str, str, int], Judgment] = {}
        self.attempt = 0
        self.reasks = 0  # re-ask requests answered (or failed): not those still pending
        self._only: set[tuple[str, str, int]] | None = None
        self._asked: list[ChatRequest] | None = None

    @property
    def stage(self) -> str:
        """The store's stage name for this round's requests."""
        return stage_of(self.attempt)

    def requests(self) -> list[ChatRequest]:
        """This round's requests; empty once every judgment is final."""
        if self._asked is None:
            done = self.attempt > self.spec.max_reasks or self._only == set()
            self._asked = [] if done else judge_requests(
                self.comps, self.prompts, self.spec, self.seed, self.attempt, self._only)
        return self._asked

    def take(self, results: Mapping[str, ChatResult]) -> None:
        """This round's answers (key -> result; a missing key is pending): judgments are
        parsed, and the unparseable ones make up the next round."""
        retry: set[tuple[str, str, int]] = set()
        for r in self.requests():
            assert isinstance(r.tag, JudgeTag)
            j = to_judgment(r, self.by_comp[(r.tag.prompt_id, r.tag.permutation)],
                            results.get(r.key), self.spec)
            self.final[r.tag.slot] = j
            if reask_due(j, self.spec):
                retry.add(r.tag.slot)
        if self.attempt:
            self.reasks += sum(r.key in results for r in self.requests())
        self.attempt += 1
        self._only, self._asked = retry, None

    @property
    def judgments(self) -> list[Judgment]:
        """Each (comparison, aspect)'s last judgment, in the order first asked."""
        return list(self.final.values())


def needs_reask(j: Judgment) -> bool:
    """An answer that came back but did not give one valid rating per text (or was cut off):
    worth asking again. A failed request is not — the next run retries that one."""
    return j.error is not None and j.error.startswith(("unparseable", "truncated"))


def to_judgment(req: ChatRequest, comp: Comparison, result: ChatResult | None,
                spec: JudgeSpec) -> Judgment:
    """Parse one judge answer into ratings per model (mapped back through the order)."""
    assert isinstance(req.tag, JudgeTag)
    aspect = req.tag.aspect
    k = len(comp.models)
    base = Judgment(comp.prompt_id, aspect, comp.models, [None] * k, [None] * k, comp.order,
                    attempts=req.tag.attempt + 1, permutation=comp.permutation,
                    judge=spec.name)
    if result is None or result.pending:
        base.error, base.state = "pending", RequestState.PENDING
        return base
    base.raw = result.text
    if not result.ok:
        base.error, base.state = f"request failed: {result.error}", RequestState.FAILED
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
