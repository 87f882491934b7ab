"""Executors decide where a stage's requests run; the stages never know which one does.

``local`` runs them on one asyncio loop in this process. Every executor reports progress
through ``Progress`` (the CLI renders it; library code never prints) and counts through
``records.StageCounts``.
"""

from __future__ import annotations

from typing import Protocol

from prefsynth.records import Usage


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


__all__ = ["NoProgress", "Progress"]
