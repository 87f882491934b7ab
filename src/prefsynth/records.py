"""Typed records passed between stages. One dataclass per stage output, all in this module.

Stages are plain functions from these records to these records; nothing here calls a model
or touches disk. Pydantic is kept at the edges (config, HTTP payloads), not here.
"""

from __future__ import annotations

import enum
import hashlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

Message = dict[str, str]  # {"role": "user" | "assistant" | "system", "content": "..."}
Rating = int | str | None  # 1..5, "N/A", or None (missing — never turned into a number)


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of the canonical JSON of ``obj``: same content, same hash, any process."""
    data = orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()[:length]


@dataclass(slots=True)
class Prompt:
    """One prompt. ``id`` is a content hash unless the input supplied one."""

    id: str
    messages: list[Message]
    source: str = ""
    reference: str | None = None  # a reference answer, when the dataset carries one
    instruction_ids: list[str] = field(default_factory=list)  # IFEval-style constraints
    constraint_kwargs: list[dict[str, Any]] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The last user turn: what the judge shows as the instruction."""
        for m in reversed(self.messages):
            if m["role"] == "user":
                return m["content"]
        return self.messages[-1]["content"]


class RequestState(enum.Enum):
    """Where one request stands. Only answered and failed results reach the store; a pending
    one (a Batch API job still running, or not asked yet) is asked again by the next run."""

    ANSWERED = "answered"
    FAILED = "failed"
    PENDING = "pending"


@dataclass(slots=True, frozen=True)
class GenerationTag:
    """Which (prompt, pool model) a generation request answers. Not part of the key."""

    prompt_id: str
    model: str


@dataclass(slots=True, frozen=True)
class JudgeTag:
    """Which (prompt, aspect, permutation) a judge request rates, and its re-ask attempt."""

    prompt_id: str
    aspect: str
    permutation: int
    attempt: int

    @property
    def slot(self) -> tuple[str, str, int]:
        """The judgment this request fills, whatever its attempt."""
        return (self.prompt_id, self.aspect, self.permutation)


RequestTag = GenerationTag | JudgeTag


@dataclass(slots=True)
class ChatRequest:
    """One chat completion to ask a backend for. ``key`` identifies it in the store.

    A judge request's messages are a rendered rubric with every response in it, several KB
    each: holding millions at once would not fit in memory. Such requests are *lazy*: their
    key is computed from the rendered messages, then ``messages`` is left empty and ``build``
    re-renders them; the executor materialises them just before a chunk is sent and drops
    them after (``materialize`` / ``release``).
    """

    key: str
    model: str
    messages: list[Message]
    params: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, max_tokens, seed
    response_format: dict[str, Any] | None = None  # a JSON schema for structured output
    tag: RequestTag | None = None  # the caller's bookkeeping, not part of the key
    build: Callable[[], list[Message]] | None = None  # re-creates messages of a lazy request

    def materialize(self) -> None:
        if self.build is not None and not self.messages:
            self.messages = self.build()

    def release(self) -> None:
        if self.build is not None:
            self.messages = []


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _Answer:
    """What a model's answer and the records made from it share: a ``state`` that, left out,
    follows from the fields — text and no error is answered, anything else failed."""

    __slots__ = ()
    text: str | None
    error: str | None
    state: RequestState | None

    def __post_init__(self) -> None:
        if self.state is None:
            ok = self.error is None and self.text is not None
            # a slot of each dataclass below, which mypy cannot see from here
            self.state = RequestState.ANSWERED if ok else RequestState.FAILED  # type: ignore[misc]

    @property
    def pending(self) -> bool:
        return self.state is RequestState.PENDING


@dataclass(slots=True)
class ChatResult(_Answer):
    """A backend's answer: text, or an error. One bad request never raises through a batch.

    ``state`` says where the request stands; ``error`` is the reason, for a person. Left out,
    the state follows from the fields: text and no error is answered, anything else failed.
    """

    key: str
    text: str | None = None
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    error: str | None = None
    attempts: int = 1
    state: RequestState | None = None

    @property
    def ok(self) -> bool:
        return self.state is RequestState.ANSWERED

    @classmethod
    def waiting(cls, key: str, why: str) -> ChatResult:
        """Not answered yet (a batch job in flight): never stored, asked again next run."""
        return cls(key, error=why, state=RequestState.PENDING)


@dataclass(slots=True)
class Generation(_Answer):
    """One response from one pool model to one prompt. ``state`` is its request's: left out,
    it follows from the fields like ``ChatResult``'s (text and no error: answered)."""

    prompt_id: str
    model: str
    text: str | None
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    error: str | None = None
    state: RequestState | None = None

    @classmethod
    def waiting(cls, prompt_id: str, model: str) -> Generation:
        """Not answered yet: written out with the error ``"pending"``, asked again next run."""
        return cls(prompt_id, model, None, error="pending", state=RequestState.PENDING)


@dataclass(slots=True)
class Comparison:
    """The responses one judge request sees. ``order[i]`` is the index (into ``models``) of
    the response shown as text ``i+1``, so position bias does not follow model identity."""

    prompt_id: str
    models: list[str]
    texts: list[str]
    order: list[int]
    permutation: int = 0


@dataclass(slots=True)
class Judgment:
    """One aspect's ratings for one comparison, indexed like ``Comparison.models`` (not by
    position): ``ratings[i]`` is the rating of ``models[i]``'s response."""

    prompt_id: str
    aspect: str
    models: list[str]
    ratings: list[Rating]
    rationales: list[str | None]
    order: list[int]
    raw: str | None = None
    error: str | None = None
    attempts: int = 1
    permutation: int = 0
    judge: str = ""
    #: its last request's state: answered (parsed, or not: see ``error``), failed, pending
    state: RequestState = RequestState.ANSWERED

    @property
    def pending(self) -> bool:
        return self.state is RequestState.PENDING


@dataclass(slots=True)
class Pair:
    """A binarized preference pair in the Tulu 3 column layout."""

    id: str
    prompt: str
    chosen: list[Message]
    rejected: list[Message]
    chosen_rating: float
    rejected_rating: float
    chosen_model: str
    rejected_model: str
    source: str


@dataclass(slots=True)
class Dropped:
    """A prompt that produced no pair, and why (counted by reason in the card)."""

    prompt_id: str
    reason: str


@dataclass(slots=True)
class StageCounts:
    """One stage's requests (for one model, or all): how many, where their answers came from."""

    total: int = 0
    cached: int = 0
    answered: int = 0
    failed: int = 0
    pending: int = 0
    usage: Usage = field(default_factory=Usage)
    errors: Counter[str] = field(default_factory=Counter)  # failure kind -> count

    def add(self, other: StageCounts) -> None:
        self.total += other.total
        self.cached += other.cached
        self.answered += other.answered
        self.failed += other.failed
        self.pending += other.pending
        self.usage.prompt_tokens += other.usage.prompt_tokens
        self.usage.completion_tokens += other.usage.completion_tokens
        self.errors.update(other.errors)


@dataclass(slots=True)
class RunSummary:
    """The counts of a run, or of one shard of it: the one type that adds shards together.

    The pipeline fills one per shard (``core.summary.summarize``); the run's is their sum.
    ``run.json``, the card, the CLI summary and ``prefsynth status`` all read it. Every field is
    additive, so a million-prompt run folds shard by shard without holding its records.
    """

    stages: dict[str, StageCounts] = field(default_factory=dict)  # "generate", "judge", ...
    #: ("generate" | "judge", model) -> where its planned requests stand at the end: answered
    #: (now or from the store), failed (by kind), pending; a judge's are final judgments.
    #: ``prefsynth status`` counts the same from the store alone.
    by_model: dict[tuple[str, str], StageCounts] = field(default_factory=dict)
    dropped: Counter[str] = field(default_factory=Counter)  # reason -> prompts
    reasks: int = 0
    pending: bool = False
    pairs: int = 0
    pairs_num_bytes: int = 0
    judgments: int = 0
    responses: Counter[str] = field(default_factory=Counter)  # model -> answered responses
    failed: Counter[str] = field(default_factory=Counter)  # model -> failed responses
    chosen: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    sources: Counter[str] = field(default_factory=Counter)  # prompt source -> pairs
    judge_errors: Counter[str] = field(default_factory=Counter)  # failure kind -> judgments
    #: aspect -> shown position (0-based) -> [sum, count] of numeric ratings
    position: dict[str, dict[int, list[int]]] = field(default_factory=dict)

    def add(self, other: RunSummary) -> None:
        for name, counts in other.stages.items():
            self.stages.setdefault(name, StageCounts()).add(counts)
        for key, counts in other.by_model.items():
            self.by_model.setdefault(key, StageCounts()).add(counts)
        for counter in ("dropped", "responses", "failed", "chosen", "rejected", "sources",
                        "judge_errors"):
            getattr(self, counter).update(getattr(other, counter))
        self.reasks += other.reasks
        self.pending = self.pending or other.pending
        self.pairs += other.pairs
        self.pairs_num_bytes += other.pairs_num_bytes
        self.judgments += other.judgments
        for aspect, by_pos in other.position.items():
            mine = self.position.setdefault(aspect, {})
            for pos, (total, n) in by_pos.items():
                acc = mine.setdefault(pos, [0, 0])
                acc[0] += total
                acc[1] += n

    def dropped_by_reason(self) -> dict[str, int]:
        return dict(self.dropped.most_common())


@dataclass(slots=True)
class ShardResult:
    """Every record of one shard of prompts, and its summary. The pipeline yields these one
    by one; the output writer consumes them, so no stage holds more than a shard."""

    prompts: list[Prompt] = field(default_factory=list)
    assignment: dict[str, list[str]] = field(default_factory=dict)
    generations: list[Generation] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    judgments: list[Judgment] = field(default_factory=list)
    pairs: list[Pair] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    constraint_results: dict[tuple[str, str], list[bool]] = field(default_factory=dict)
    summary: RunSummary = field(default_factory=RunSummary)

    def extend(self, other: ShardResult) -> None:
        """Append another shard's records (a run kept whole, for the library and tests).
        Counts are not records: the run's summary is ``RunSummary.add`` of the shards'."""
        self.prompts.extend(other.prompts)
        self.assignment.update(other.assignment)
        self.generations.extend(other.generations)
        self.comparisons.extend(other.comparisons)
        self.judgments.extend(other.judgments)
        self.pairs.extend(other.pairs)
        self.dropped.extend(other.dropped)
        self.constraint_results.update(other.constraint_results)


# --- prompt curation (stages/curate): why a prompt was removed before the model mix --------


@dataclass(slots=True)
class Removal:
    """One prompt removed by curation, and why. ``reason`` is ``near_dup`` (then
    ``matched_prompt_id`` is the kept prompt it copies), ``eval_overlap`` (then ``eval_set``,
    ``eval_id`` and ``ratio``: the share of that eval instance's tokens its n-grams cover) or
    ``sampled_out`` (left out by source-balanced sampling)."""

    prompt_id: str
    reason: str
    eval_set: str | None = None
    eval_id: str | None = None
    ratio: float | None = None
    matched_prompt_id: str | None = None


@dataclass(slots=True)
class CurationStats:
    """Prompts in and out of curation, by removal reason. Additive, like ``RunSummary``:
    shards of prompts curated apart add up to the whole run's counts."""

    prompts_in: int = 0  # after exact-duplicate removal at load
    exact_dup: int = 0  # counted by stages.prompts.load_prompts
    near_dup: int = 0
    eval_overlap: Counter[str] = field(default_factory=Counter)  # eval set -> prompts
    sampled_out: int = 0
    kept: int = 0

    def add(self, other: CurationStats) -> None:
        self.prompts_in += other.prompts_in
        self.exact_dup += other.exact_dup
        self.near_dup += other.near_dup
        self.eval_overlap.update(other.eval_overlap)
        self.sampled_out += other.sampled_out
        self.kept += other.kept

    def count(self, removal: Removal) -> None:
        if removal.reason == "near_dup":
            self.near_dup += 1
        elif removal.reason == "eval_overlap":
            self.eval_overlap[removal.eval_set or ""] += 1
        elif removal.reason == "sampled_out":
            self.sampled_out += 1
