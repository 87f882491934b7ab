"""Test helpers: a deterministic fake backend for unit tests of pipeline logic (never data).

Importing this module registers it as ``backend: fake`` (``prefsynth.backends.register``);
the shipped registry does not know it.

Generation requests get a text derived from a hash of the request. Judge requests (recognised
by ``<text N>`` lines in the last message) get UltraFeedback-format ratings derived from each
shown text, so ratings follow the response and not its position; a request that carries a
``response_format`` is answered in JSON. Options (``FakeOptions``) steer failure modes:

- ``fail_rate``: fraction of requests answered with an error (chosen by hash, so stable);
- ``garble_first``: judge answers are unparseable on the first attempt (tests re-asks);
- ``rating``: ``"hash"`` (default) or ``"length"`` (longer text rates higher), or ``"tie"``;
  it changes answers, so it is part of the request key (the other two are failures);
- ``latency``: each request takes up to this many seconds (by hash) and is handed to
  ``on_result`` when done, so answers arrive out of order, as from a live API.
It accepts every endpoint key, as it stands in for any backend.
``FakeBackend.calls`` counts requests per backend name across instances (for "no repeat" tests).
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import orjson
from pydantic import Field

from prefsynth.backends import register
from prefsynth.backends.base import (
    BackendOptions,
    BaseBackend,
    ResultSink,
    key_option,
    parse_options,
)
from prefsynth.config import ModelSpec
from prefsynth.records import ChatRequest, ChatResult, JudgeTag, Usage, stable_hash

# the UltraFeedback layout: "<text 1> ...", up to the next "<text N>" or the "### Output" line
_TEXT = re.compile(r"<text (\d+)> ?(.*?)(?=\n<text \d+> |\n+### Output|\Z)", re.S)


class FakeOptions(BackendOptions):
    fail_rate: float = Field(0.0, ge=0, le=1)
    garble_first: bool = False
    rating: Literal["hash", "length", "tie"] = key_option("hash")
    latency: float = Field(0.0, ge=0)


class FakeBackend(BaseBackend):
    batch_size = 16
    max_concurrency = 4
    calls: ClassVar[Counter[str]] = Counter()
    streams: ClassVar[bool] = True
    Options = FakeOptions
    endpoint_fields = frozenset(ModelSpec.ENDPOINT_FIELDS)

    def __init__(self, spec: ModelSpec, store: Any = None) -> None:
        self.name = spec.name
        self.spec = spec
        self.opts = parse_options(FakeOptions, spec)

    def _rating(self, text: str) -> int:
        mode = self.opts.rating
        if mode == "tie":
            return 3
        if mode == "length":
            return min(5, 1 + len(text) // 40)
        return 1 + int(stable_hash(text, 8), 16) % 5

    def _judge(self, req: ChatRequest, texts: list[tuple[int, str]]) -> str:
        attempt = req.tag.attempt if isinstance(req.tag, JudgeTag) else 0
        if self.opts.garble_first and attempt == 0:
            return "I think they are all fine."
        if req.response_format is not None:
            items = [{"text": n, "rationale": f"text {n} ok", "rating": self._rating(t)}
                     for n, t in texts]
            return orjson.dumps({"ratings": items}).decode()
        return "\n\n".join(
            f"#### Output for Text {n}\nRating: {self._rating(t)}\nRationale: text {n} reviewed."
            for n, t in texts
        )

    def _one(self, req: ChatRequest) -> ChatResult:
        FakeBackend.calls[self.name] += 1
        h = int(stable_hash([req.key, "fail"], 8), 16) / 0xFFFFFFFF
        if h < self.opts.fail_rate:
            return ChatResult(req.key, error="fake: injected failure")
        last = req.messages[-1]["content"].rpartition("## Annotation")[2]
        texts = [(int(n), t) for n, t in _TEXT.findall(last)]
        if texts:
            text = self._judge(req, texts)
        else:
            words = ["answer", "from", self.spec.model, stable_hash(req.key, 6)]
            text = " ".join(words * (1 + int(stable_hash(req.key, 4), 16) % 6))
        usage = Usage(sum(len(m["content"]) for m in req.messages) // 4, len(text) // 4)
        return ChatResult(req.key, text=text, finish_reason="stop", usage=usage)

    async def complete(self, requests: Sequence[ChatRequest],
                       on_result: ResultSink | None = None) -> list[ChatResult]:
        if not self.opts.latency:
            return [self._one(r) for r in requests]  # all at once: ``on_result`` is optional

        async def one(req: ChatRequest) -> ChatResult:
            share = int(stable_hash([req.key, "latency"], 4), 16) / 0xFFFF
            await asyncio.sleep(self.opts.latency * share)
            res = self._one(req)
            if on_result is not None:
                on_result(res)
            return res

        return list(await asyncio.gather(*(one(r) for r in requests)))

    async def aclose(self) -> None:
        return None


register("fake", "prefsynth.testing:FakeBackend")
