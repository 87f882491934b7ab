"""The parts of ``executor: ray`` that need no cluster: shards and answers as Arrow rows, the
shared rate budget and the ``openai`` backend's hook into it, and the one-line error where the
ray extra is missing (the tests that need a Ray cluster are in ``test_executor_ray.py``)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prefsynth.core.executor.arrow import (
    requests_from,
    requests_table,
    results_from,
    results_table,
)
from prefsynth.core.executor.ray_limits import Budget, SharedGate
from prefsynth.records import ChatRequest, ChatResult, GenerationTag, JudgeTag, RequestState, Usage
from tests.conftest import ROOT, fake_config, write_config
from tests.servers.counting_server import CountingServer

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
    filter(None, [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")]))}


@pytest.fixture(scope="module")
def server() -> Iterator[CountingServer]:
    s = CountingServer()
    s.start()
    try:
        yield s
    finally:
        s.stop()


def test_shards_travel_as_arrow_sorted_by_prompt_length() -> None:
    reqs = [ChatRequest("k-long", "m", [{"role": "user", "content": "x" * 90}],
                        {"temperature": 1.0, "seed": 3}, tag=GenerationTag("p1", "a")),
            ChatRequest("k-lazy", "m", [], {"seed": 4}, {"schema": {"type": "object"}},
                        tag=JudgeTag("p2", "honesty", 1, 2),
                        build=lambda: [{"role": "user", "content": "rubric"}])]
    table = requests_table(reqs)
    assert table.column("key").to_pylist() == ["k-lazy", "k-long"]  # shortest prompt first
    assert reqs[1].messages == []  # a lazy request is released again once encoded
    back = {r.key: r for r in requests_from(table)}
    assert back["k-lazy"].messages == [{"role": "user", "content": "rubric"}]
    assert back["k-lazy"].tag == JudgeTag("p2", "honesty", 1, 2)
    assert back["k-lazy"].response_format == {"schema": {"type": "object"}}
    assert back["k-long"].params == {"temperature": 1.0, "seed": 3}
    assert back["k-long"].tag == GenerationTag("p1", "a")

    results = [ChatResult("a", "text", "stop", Usage(3, 4)),
               ChatResult("b", error="timeout: gave up", attempts=3),
               ChatResult.waiting("c", "batch in flight")]
    assert results_from(results_table(results)) == results
    assert [r.state for r in results_from(results_table(results))] == [
        RequestState.ANSWERED, RequestState.FAILED, RequestState.PENDING]


class _LocalBudget:
    """A ``Budget`` called in-process the way a worker calls the actor (``.remote``)."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        outer = self

        class _Method:
            def __init__(self, name: str) -> None:
                self.name = name

            def remote(self, *args: Any) -> Any:
                value = getattr(outer.budget, self.name)(*args)
                future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                future.set_result(value)
                return future

        self.lease, self.cooldown = _Method("lease"), _Method("cooldown")


def test_two_gates_on_one_budget_send_at_its_rate_not_twice_it() -> None:
    budget = _LocalBudget(Budget(requests_per_minute=600, tokens_per_minute=None))  # 10/s

    async def main() -> list[float]:
        gates = [SharedGate(budget, 600, None, lease_seconds=0.3) for _ in range(2)]
        sends: list[float] = []

        async def send(gate: SharedGate) -> None:
            await gate.acquire(0)
            sends.append(time.time())

        await asyncio.gather(*(send(g) for g in gates for _ in range(10)))
        return sorted(sends)

    sends = asyncio.run(main())
    assert len(sends) == 20
    assert sends[-1] - sends[0] >= 19 / 10 * 0.95  # 20 sends at 10/s, not 20/s
    # zero burst: no window of a second holds more than the rate allows (+1 for the edge)
    assert max(sum(1 for t in sends if s <= t < s + 1.0) for s in sends) <= 11


def test_a_cooldown_moves_every_later_lease() -> None:
    b = Budget(requests_per_minute=60, tokens_per_minute=6000)
    start, end = b.lease("requests", 1)
    assert end - start == pytest.approx(1.0)
    until = b.cooldown(5.0)
    s2, _ = b.lease("requests", 1)
    s3, _ = b.lease("tokens", 100)
    assert s2 >= until and s3 >= until


def test_openai_backend_sends_through_a_shared_gate_and_reports_429s(
        server: CountingServer) -> None:
    """``share_limits``: every send waits on the gate (not the backend's own pacer), and a 429
    is reported to it with the pause the server asked for."""
    from prefsynth.backends.openai_compat import OpenAIBackend
    from prefsynth.config import ModelSpec

    class Gate:
        def __init__(self) -> None:
            self.acquired: list[int] = []
            self.cooled: list[float] = []

        async def acquire(self, tokens: int) -> None:
            self.acquired.append(tokens)

        def cooldown(self, seconds: float) -> None:
            self.cooled.append(seconds)

    server.reset()
    server.reject, server.retry_after = 1, "0.2"
    spec = ModelSpec(name="a", backend="openai", model="m", base_url=server.base_url,
                     requests_per_minute=1, tokens_per_minute=10**6)  # 1/min: would take minutes
    gate = Gate()

    async def main() -> list[ChatResult]:
        backend = OpenAIBackend(spec)
        backend.share_limits(gate)
        try:
            return await backend.complete([ChatRequest(f"k{i}", "m", [
                {"role": "user", "content": f"q{i}"}], {"max_tokens": 8}) for i in range(3)])
        finally:
            await backend.aclose()

    t0 = time.monotonic()
    results = asyncio.run(main())
    assert all(r.ok for r in results) and time.monotonic() - t0 < 10
    assert len(gate.acquired) == 4 and all(t > 8 for t in gate.acquired)  # 3 + the retry
    assert gate.cooled == [pytest.approx(0.2)]


def test_missing_ray_extra_is_one_line(tmp_path: Path) -> None:
    hide = tmp_path / "hide" / "ray"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'ray'\", name='ray')\n")
    cfg = fake_config(tmp_path)
    for m in [*cfg["models"], cfg["judge"]]:
        m.update({"backend": "openai", "base_url": "http://127.0.0.1:9/v1"})
    cfg_path = write_config(tmp_path, cfg)
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hide"), ENV["PYTHONPATH"]])}
    p = subprocess.run([sys.executable, "-m", "prefsynth.cli", "run", str(cfg_path),
                        "--executor", "ray", "--limit", "2"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 4
    assert p.stderr.strip().splitlines() == [
        "prefsynth: error: executor: ray needs an optional dependency: "
        "pip install 'prefsynth[ray]'"]
