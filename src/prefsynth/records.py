"""Typed records passed between stages. One dataclass per stage output, all in this module.

Stages are plain functions from these records to these records; nothing here calls a model
or touches disk. Pydantic is kept at the edges (config, HTTP payloads), not here.
"""

from __future__ import annotations

import hashlib
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
    tag: dict[str, Any] = field(default_factory=dict)  # caller bookkeeping, not part of the key
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


@dataclass(slots=True)
class ChatResult:
    """A backend's answer: text, or an error. One bad request never raises through a batch."""

    key: str
    text: str | None = None
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    error: str | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


@dataclass(slots=True)
class Generation:
    """One response from one pool model to one prompt."""

    prompt_id: str
    model: str
    text: str | None
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    error: str | None = None


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
