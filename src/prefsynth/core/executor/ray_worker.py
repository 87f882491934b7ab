"""The worker side of ``executor: ray``: what runs inside each Ray actor.

A ``ModelWorker`` builds one model's backend from its ``ModelSpec`` (plain pydantic, shipped
by value) and the backend's ``"module:Class"`` (shipped by name, so a backend registered at run
time in the driver is found on the worker too). It never sees the store: it answers shards of
requests (Arrow tables, ``core.executor.arrow``) and streams the answers back as Arrow tables,
every ``flush_rows`` answers or ``flush_seconds``, whichever comes first, so a worker that dies
loses what it had not sent back yet, and the driver's progress moves as answers come.

Inside a shard it drives the backend as the local executor does: chunks of ``batch_size``,
``max_concurrency`` of them at once, a backend bug turned into error results for its chunk.
A ``PrefsynthError`` (the backend cannot work at all: HTTP 401, a dead engine) stops the shard
and travels to the driver as ``WorkerFatal``, which re-raises it there as the same class.
No import of Ray here: the driver wraps these classes with ``ray.remote``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pyarrow as pa

from prefsynth import errors
from prefsynth.config import ModelSpec
from prefsynth.core.executor.arrow import requests_from, results_table
from prefsynth.core.executor.ray_limits import SharedGate
from prefsynth.errors import PrefsynthError
from prefsynth.records import ChatRequest, ChatResult

log = logging.getLogger(__name__)

FLUSH_ROWS = 256
FLUSH_SECONDS = 0.5


class WorkerFatal(Exception):
    """A ``PrefsynthError`` raised on a worker, in a form that pickles: its class name and
    its one-line message. ``error()`` rebuilds it on the driver."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(kind, message)
        self.kind, self.message = kind, message

    @classmethod
    def of(cls, e: PrefsynthError) -> WorkerFatal:
        return cls(type(e).__name__, str(e))

    def error(self) -> PrefsynthError:
        kind = getattr(errors, self.kind, None)
        if not (isinstance(kind, type) and issubclass(kind, PrefsynthError)):
            kind = errors.BackendError
        err = kind.__new__(kind)  # not kind(...): MissingExtraError takes other arguments
        Exception.__init__(err, self.message)
        return err

    def __str__(self) -> str:
        return self.message


def load_class(target: str) -> Any:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def probe(spec: ModelSpec, target: str) -> str | None:
    """Run on a worker before any work: can this model's backend be built there? ``None`` if
    so, else why not, in one line. It is built once and closed, as the local executor builds
    every backend before any work: a missing API key fails now, not after a stage."""
    try:
        cls = load_class(target)
    except Exception as e:
        return f"cannot import {target} on a Ray worker ({type(e).__name__}: {e})"
    if not cls.shippable:
        return f"{target} declares shippable = False: it runs on the driver only"
    try:
        backend = cls(spec, store=None)
        asyncio.run(backend.aclose())
    except PrefsynthError as e:
        return str(e)
    except Exception as e:
        return f"cannot start on a Ray worker ({type(e).__name__}: {e})"
    return None


class ModelWorker:
    """One model's backend in a Ray actor (see the module docstring)."""

    def __init__(self, spec: ModelSpec, target: str, budget: Any = None,
                 flush_rows: int = FLUSH_ROWS, flush_seconds: float = FLUSH_SECONDS) -> None:
        self.spec = spec
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self.fatal: WorkerFatal | None = None
        self.backend: Any = None
        try:
            cls = load_class(target)
            self.backend = cls(spec, store=None)
            if budget is not None and cls.shares_limits:
                self.backend.share_limits(SharedGate(budget, spec.requests_per_minute,
                                                     spec.tokens_per_minute))
        except PrefsynthError as e:  # reported by ready(), as one line on the driver
            self.fatal = WorkerFatal.of(e)
        except Exception as e:
            self.fatal = WorkerFatal("BackendError", f"{spec.where}: cannot start on a "
                                     f"Ray worker: {type(e).__name__}: {e}")

    def ready(self) -> dict[str, Any]:
        """Where the worker runs and how it wants to be fed; raises if its backend failed."""
        if self.fatal is not None:
            raise self.fatal
        return {"batch_size": max(1, int(self.backend.batch_size)),
                "max_concurrency": max(1, int(self.backend.max_concurrency)),
                "host": socket.gethostname(), "pid": os.getpid()}

    async def run(self, table: pa.Table) -> AsyncIterator[pa.Table]:
        """Answer one shard, yielding the answers as Arrow tables while they come."""
        if self.fatal is not None:
            raise self.fatal
        requests = requests_from(table)
        size = self.backend.batch_size
        chunks = [requests[i : i + size] for i in range(0, len(requests), size)]
        chunks.reverse()  # pop() from the end: shortest prompts first
        done: asyncio.Queue[list[ChatResult] | BaseException | None] = asyncio.Queue()

        async def lane() -> None:
            while chunks:
                chunk = chunks.pop()
                try:
                    done.put_nowait(await self._complete(chunk))
                except BaseException as e:
                    done.put_nowait(e)
                    return

        lanes = [asyncio.create_task(lane()) for _ in range(self.backend.max_concurrency)]
        finished = asyncio.ensure_future(asyncio.gather(*lanes, return_exceptions=True))
        finished.add_done_callback(lambda _: done.put_nowait(None))
        buffer: list[ChatResult] = []
        last = time.monotonic()
        try:
            while True:
                timeout = max(0.0, last + self.flush_seconds - time.monotonic()) if buffer \
                    else None
                try:
                    item = await asyncio.wait_for(done.get(), timeout)
                except TimeoutError:
                    item = []
                if item is None:
                    break
                if isinstance(item, BaseException):
                    raise item
                buffer += item
                due = time.monotonic() - last >= self.flush_seconds
                if buffer and (len(buffer) >= self.flush_rows or due):
                    yield results_table(buffer)
                    buffer, last = [], time.monotonic()
            if buffer:
                yield results_table(buffer)
        finally:
            for t in lanes:
                t.cancel()
            with contextlib.suppress(BaseException):
                await finished

    async def _complete(self, chunk: list[ChatRequest]) -> list[ChatResult]:
        try:
            results: list[ChatResult] = await self.backend.complete(chunk)
            return results
        except PrefsynthError as e:
            raise WorkerFatal.of(e) from None
        except Exception as e:  # a backend bug must not lose the rest of the shard
            log.exception("backend %s failed on a chunk", self.spec.name)
            return [ChatResult(r.key, error=f"backend error: {type(e).__name__}: {e}")
                    for r in chunk]

    async def aclose(self) -> None:
        if self.backend is not None:
            await self.backend.aclose()


__all__ = ["FLUSH_ROWS", "FLUSH_SECONDS", "ModelWorker", "WorkerFatal", "load_class", "probe"]
