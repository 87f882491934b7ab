"""The local executor commits each result as the backend hands it over, on a timer, without
waiting for the chunk's slowest request; every result is counted once however it arrives."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from prefsynth.backends.base import BaseBackend, ResultSink
from prefsynth.core.executor.local import FLUSH_SECONDS, run_stage
from prefsynth.core.store import Store
from prefsynth.errors import BackendError
from prefsynth.records import ChatRequest, ChatResult


class Trickle(BaseBackend):
    """Hands the first half of a chunk to ``on_result`` at once, then holds the whole chunk
    (the slowest request) until ``release`` is set; returns every result, streamed or not."""

    name = "trickle"
    batch_size = 8
    max_concurrency = 1

    def __init__(self, fail_after_half: bool = False) -> None:
        self.release = asyncio.Event()
        self.fail_after_half = fail_after_half

    async def complete(self, requests: Sequence[ChatRequest],
                       on_result: ResultSink | None = None) -> list[ChatResult]:
        results = [ChatResult(r.key, f"answer {r.key}", "stop") for r in requests]
        for res in results[: len(results) // 2]:
            if on_result is not None:
                on_result(res)
        if self.fail_after_half:
            raise BackendError("trickle: HTTP 401")
        await self.release.wait()
        return results


def _requests(n: int) -> list[ChatRequest]:
    return [ChatRequest(f"k{i}", "m", [{"role": "user", "content": str(i)}]) for i in range(n)]


def _rows(path: Path) -> int:
    """Committed rows, as another process (a rerun) would see them."""
    db = sqlite3.connect(path)
    try:
        return int(db.execute("SELECT COUNT(*) FROM requests").fetchone()[0])
    finally:
        db.close()


def test_streamed_answers_are_committed_while_the_chunk_is_still_out(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"

    async def main() -> None:
        backend = Trickle()
        with Store(path) as store:
            stage = asyncio.create_task(
                run_stage("generate", {"m": (backend, _requests(8))}, store))
            await asyncio.sleep(FLUSH_SECONDS + 0.3)  # no new result arrives meanwhile
            assert _rows(path) == 4
            backend.release.set()
            results, counts = await stage
        assert counts.answered == 8 and counts.failed == 0  # streamed + returned: once each
        assert sorted(results) == [f"k{i}" for i in range(8)]
        assert _rows(path) == 8

    asyncio.run(main())


def test_answers_streamed_before_a_backend_error_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"

    async def main() -> None:
        with Store(path) as store:
            try:
                await run_stage("judge", {"m": (Trickle(fail_after_half=True), _requests(8))},
                                store)
            except BackendError:
                pass
            else:
                raise AssertionError("the BackendError must stop the stage")

    asyncio.run(main())
    assert _rows(path) == 4
