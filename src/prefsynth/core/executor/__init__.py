"""Executors decide where a stage's requests run; the stages never know which one does.

``local`` runs them on one asyncio loop in this process; ``ray`` (``core.executor.ray``, the
ray extra) on the actors of a Ray cluster. The pipeline picks one by ``cfg.executor`` and
talks to it through ``Executor``. Every executor reports progress through ``Progress`` (the
CLI renders it; library code never prints) and counts through ``records.StageCounts``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from prefsynth.records import ChatRequest, ChatResult, StageCounts, Usage

if TYPE_CHECKING:
    from prefsynth.backends.base import Backend
    from prefsynth.config import Config, ModelSpec
    from prefsynth.core.executor.feed import Feed
    from prefsynth.core.store import Store


class Progress(Protocol):
    """What an executor reports; the CLI renders it."""

    def start(self, stage: str, total: int, done: int) -> None: ...

    def advance(self, ok: int, failed: int, usage: Usage, model: str) -> None: ...

    def finish(self) -> None: ...


class NoProgress:
    def start(self, stage: str, total: int, done: int) -> None:
        pass

    def advance(self, ok: int, failed: int, usage: Usage, model: str) -> None:
        pass

    def finish(self) -> None:
        pass


class Executor(Protocol):
    """Where requests run. ``backend`` makes what a stage's work maps a model to (the backend
    itself, or a handle on workers that build it); ``run_stage`` answers a stage's requests
    (stored answers are never asked again) and returns key -> result and the stage's counts;
    ``aclose`` ends whatever the executor started.

    ``streams``: the executor also answers requests one by one as they are submitted
    (``feed``), so the pipeline can stream a shard (``core.stream``) instead of running it
    stage by stage. An executor that does not (Ray) raises ``TypeError`` from ``feed``."""

    streams: bool

    def backend(self, spec: ModelSpec, store: Store) -> Backend: ...

    async def run_stage(self, stage: str, work: Mapping[str, tuple[Backend, Sequence[ChatRequest]]],
                        store: Store, progress: Progress | None = None, *, collect: bool = True
                        ) -> tuple[dict[str, ChatResult], StageCounts]: ...

    def feed(self, store: Store, progress: Progress) -> Feed: ...

    async def aclose(self) -> None: ...


class LocalExecutor:
    """``executor: local``: backends in this process, ``core.executor.local.run_stage``;
    it streams (``core.executor.feed``)."""

    streams = True

    def backend(self, spec: ModelSpec, store: Store) -> Backend:
        from prefsynth.backends import create_backend

        return create_backend(spec, store=store)

    async def run_stage(self, stage: str, work: Mapping[str, tuple[Backend, Sequence[ChatRequest]]],
                        store: Store, progress: Progress | None = None, *, collect: bool = True
                        ) -> tuple[dict[str, ChatResult], StageCounts]:
        from prefsynth.core.executor.local import run_stage

        return await run_stage(stage, work, store, progress, collect=collect)

    def feed(self, store: Store, progress: Progress) -> Feed:
        from prefsynth.core.executor.feed import Feed

        return Feed(store, progress)

    async def aclose(self) -> None:
        return None


def executor_for(cfg: Config) -> Executor:
    """The executor ``cfg.executor`` names (``ray`` fails in one line without the extra)."""
    if cfg.executor == "ray":
        from prefsynth.core.executor.ray import RayExecutor

        return RayExecutor(cfg)
    return LocalExecutor()


__all__ = ["Executor", "LocalExecutor", "NoProgress", "Progress", "executor_for"]
