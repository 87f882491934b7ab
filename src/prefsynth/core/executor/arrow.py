"""Requests and results as Arrow tables: what travels between a driver and its Ray workers.

A shard of requests is one table of ``key`` and ``request`` (the orjson of what a backend
needs: model, messages, sampling parameters, response format, tag), sorted by prompt length so
that a worker's batches hold prompts of similar size. A lazy request (a judge rubric) is
rendered only while its shard is encoded, so the driver holds rendered messages for the shards
in flight and no more. Results come back as tables of ``ChatResult`` columns, a few KB per
hundred answers, and are decoded on the driver straight into the store. No Ray import here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson
import pyarrow as pa

from prefsynth.records import (
    ChatRequest,
    ChatResult,
    GenerationTag,
    JudgeTag,
    RequestState,
    RequestTag,
    Usage,
)

REQUESTS = pa.schema([("key", pa.string()), ("request", pa.binary())])
RESULTS = pa.schema([
    ("key", pa.string()),
    ("text", pa.string()),
    ("finish_reason", pa.string()),
    ("prompt_tokens", pa.int64()),
    ("completion_tokens", pa.int64()),
    ("error", pa.string()),
    ("attempts", pa.int64()),
    ("state", pa.string()),
])


def _tag(tag: RequestTag | None) -> list[Any] | None:
    if isinstance(tag, GenerationTag):
        return ["g", tag.prompt_id, tag.model]
    if isinstance(tag, JudgeTag):
        return ["j", tag.prompt_id, tag.aspect, tag.permutation, tag.attempt]
    return None


def _untag(raw: list[Any] | None) -> RequestTag | None:
    if raw is None:
        return None
    if raw[0] == "g":
        return GenerationTag(raw[1], raw[2])
    return JudgeTag(raw[1], raw[2], int(raw[3]), int(raw[4]))


def _prompt_chars(messages: Sequence[dict[str, str]]) -> int:
    return sum(len(m.get("content") or "") for m in messages)


def requests_table(requests: Sequence[ChatRequest]) -> pa.Table:
    """One shard: its requests encoded, shortest prompt first. Lazy requests are rendered for
    the encoding and released again (the table holds their messages, the requests do not)."""
    rows: list[tuple[int, str, bytes]] = []
    for r in requests:
        r.materialize()
        body = orjson.dumps({"model": r.model, "messages": r.messages, "params": r.params,
                             "response_format": r.response_format, "tag": _tag(r.tag)})
        rows.append((_prompt_chars(r.messages), r.key, body))
        r.release()
    rows.sort(key=lambda row: row[0])
    return pa.table([pa.array([k for _, k, _ in rows], pa.string()),
                     pa.array([b for _, _, b in rows], pa.binary())], schema=REQUESTS)


def requests_from(table: pa.Table) -> list[ChatRequest]:
    """The worker's side of ``requests_table``."""
    out: list[ChatRequest] = []
    for key, body in zip(table.column("key").to_pylist(), table.column("request").to_pylist(),
                         strict=True):
        d = orjson.loads(body)
        out.append(ChatRequest(key=key, model=d["model"], messages=d["messages"],
                               params=d["params"], response_format=d["response_format"],
                               tag=_untag(d["tag"])))
    return out


def results_table(results: Sequence[ChatResult]) -> pa.Table:
    """Answers as one Arrow table (the worker returns these as they come)."""
    state = [(r.state or RequestState.FAILED).value for r in results]
    return pa.table([
        pa.array([r.key for r in results], pa.string()),
        pa.array([r.text for r in results], pa.string()),
        pa.array([r.finish_reason for r in results], pa.string()),
        pa.array([r.usage.prompt_tokens for r in results], pa.int64()),
        pa.array([r.usage.completion_tokens for r in results], pa.int64()),
        pa.array([r.error for r in results], pa.string()),
        pa.array([r.attempts for r in results], pa.int64()),
        pa.array(state, pa.string()),
    ], schema=RESULTS)


def results_from(table: pa.Table) -> list[ChatResult]:
    """The driver's side of ``results_table``."""
    cols = [table.column(name).to_pylist() for name in RESULTS.names]
    return [ChatResult(key, text, finish, Usage(pt, ct), error, attempts, RequestState(state))
            for key, text, finish, pt, ct, error, attempts, state in zip(*cols, strict=True)]


__all__ = ["REQUESTS", "RESULTS", "requests_from", "requests_table", "results_from",
           "results_table"]
