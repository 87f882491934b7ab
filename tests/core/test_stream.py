"""The streaming shard (``core.stream``) against the staged path, with the fake backend:
the same dataset byte for byte, the same keys, resume asking only what is missing, judge
requests out while generations are still in flight, and the staged path kept wherever a
backend or the executor cannot stream."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, ClassVar

import pytest

from prefsynth.backends import backend_class, register
from prefsynth.config import parse_config
from prefsynth.core.executor import LocalExecutor
from prefsynth.core.pipeline import Run, run
from prefsynth.core.plan import Plan
from prefsynth.errors import BackendError
from prefsynth.records import ChatResult, Comparison, GenerationTag, Prompt, Usage
from prefsynth.stages.judge.judgments import judge_request, judge_requests
from prefsynth.testing import FakeBackend
from tests.conftest import fake_config

DATA = ("pairs", "annotations", "judgments")


class LoggedFake(FakeBackend):
    """The fake backend, logging each request's tag as it is handed over and as it is
    answered (keys as ``fake``)."""

    key_family = "fake"
    log: ClassVar[list[Any]] = []

    async def complete(self, requests: Any, on_result: Any = None) -> list[ChatResult]:
        LoggedFake.log.extend(("sent", r.tag) for r in requests)
        tags = {r.key: r.tag for r in requests}

        def done(res: ChatResult) -> None:
            LoggedFake.log.append(("done", tags[res.key]))
            on_result(res)

        return await super().complete(requests, done)


class StagedFake(FakeBackend):
    """A backend that cannot stream (as a Batch API or a whole-GPU one): keys as ``fake``."""

    key_family = "fake"
    streams = False


register("fake-logged", "tests.core.test_stream:LoggedFake")
register("fake-staged", "tests.core.test_stream:StagedFake")


def _hard(tmp_path: Path) -> dict[str, Any]:
    """Two judges (one garbles its first answers: re-asks), failing generations, IFEval
    checks, several shards and answers out of order."""
    raw = fake_config(tmp_path, shard_size=7)
    raw["models"][0]["options"] = {"fail_rate": 0.2, "latency": 0.004}
    raw["models"][1]["options"] = {"latency": 0.004}
    raw["judge"]["options"] = {"garble_first": True, "latency": 0.003}
    raw["judge"]["max_reasks"] = 2
    raw["panel"] = [{"name": "judge2", "backend": "fake", "model": "fj2", "license": "mit",
                     "options": {"rating": "length", "fail_rate": 0.1}}]
    raw["pairs"] = {"constraints": "verify"}
    return raw


def _on_policy(tmp_path: Path) -> dict[str, Any]:
    raw = fake_config(tmp_path, on_policy="b", responses_per_prompt=2, shard_size=5)
    raw["judge"].update(permutations=2, mode="structured")
    raw["judge"]["options"] = {"latency": 0.002}
    return raw


def _twins(tmp_path: Path) -> dict[str, Any]:
    """A panel judge that asks exactly the main judge's keys: each is asked once."""
    raw = fake_config(tmp_path, shard_size=6)
    raw["judge"]["options"] = {"latency": 0.003}
    raw["panel"] = [{**raw["judge"], "name": "twin"}]
    return raw


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes()
            for name in DATA for p in sorted((out / name).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("make", [_hard, _on_policy, _twins])
def test_streamed_dataset_is_byte_identical_to_staged(tmp_path: Path, make: Any) -> None:
    staged_raw, streamed_raw = make(tmp_path / "staged"), make(tmp_path / "streamed")
    staged = run(parse_config(staged_raw), stream=False, limit=30)
    streamed = run(parse_config(streamed_raw), limit=30)
    a, b = _files(Path(staged_raw["output"])), _files(Path(streamed_raw["output"]))
    assert a and a == b
    assert streamed.summary.reasks == staged.summary.reasks
    stages_a, stages_b = staged.summary.stages, streamed.summary.stages
    if make is _twins:  # a shared key is asked once, by whichever judge gets to it first
        assert {k: c.total for k, c in stages_a.items()} == {k: c.total for k, c in stages_b.items()}
        assert sum(c.answered for c in stages_a.values()) == sum(
            c.answered for c in stages_b.values())
    else:
        assert stages_a == stages_b
    assert streamed.summary.by_model == staged.summary.by_model
    fa = json.loads((Path(staged_raw["output"]) / "run.json").read_text())
    fb = json.loads((Path(streamed_raw["output"]) / "run.json").read_text())
    for key in ("pairs", "dropped", "models", "judge", "position_means", "failed_requests"):
        assert fa[key] == fb[key], key


def test_streaming_asks_the_staged_keys_and_a_rerun_asks_nothing(tmp_path: Path) -> None:
    raw = _hard(tmp_path)
    raw["models"][0]["options"] = {"latency": 0.004}  # no failures: nothing to retry
    raw["panel"][0]["options"] = {"rating": "length"}
    cfg = parse_config(raw)
    run(cfg, stream=False, limit=20)
    before = sum(FakeBackend.calls.values())
    again = run(cfg, limit=20)  # streamed, on the staged run's store
    assert sum(FakeBackend.calls.values()) == before
    assert all(c.cached == c.total for c in again.summary.stages.values())


def test_resume_after_failures_asks_only_the_missing_keys(tmp_path: Path) -> None:
    raw = _hard(tmp_path)
    first = run(parse_config(raw), limit=20)
    assert first.summary.stages["generate"].failed > 0
    raw["models"][0]["options"] = {"latency": 0.004}  # the failing model now answers
    raw["panel"][0]["options"] = {"rating": "length"}  # fail_rate is not keyed
    before = sum(FakeBackend.calls.values())
    second = run(parse_config(raw), limit=20)
    asked = sum(FakeBackend.calls.values()) - before
    assert asked == sum(c.total - c.cached for c in second.summary.stages.values()) > 0
    assert all(c.failed == 0 for c in second.summary.stages.values())
    clean = _hard(tmp_path / "clean")
    clean["models"][0]["options"] = {"latency": 0.004}
    clean["panel"][0]["options"] = {"rating": "length"}
    run(parse_config(clean), limit=20)
    assert _files(Path(raw["output"])) == _files(Path(clean["output"]))


def test_judge_requests_go_out_while_generations_are_in_flight(tmp_path: Path) -> None:
    raw = fake_config(tmp_path, shard_size=10)
    for m in raw["models"]:
        m.update(backend="fake-logged", options={"latency": 0.02})
    raw["judge"].update(backend="fake-logged", options={"latency": 0.02})
    LoggedFake.log.clear()
    run(parse_config(raw), limit=20)
    log = LoggedFake.log
    one = _first_ids(raw, 10)

    def where(event: str, judge: bool, first: bool) -> list[int]:
        return [i for i, (e, t) in enumerate(log) if e == event
                and isinstance(t, GenerationTag) != judge and (t.prompt_id in one) == first]

    # the first shard's judging starts before its last generation is answered...
    assert min(where("sent", True, True)) < max(where("done", False, True))
    # ...and the second shard's generations go out before the first shard's judging ends
    assert min(where("sent", False, False)) < max(where("done", True, True))


def _first_ids(raw: dict[str, Any], n: int) -> set[str]:
    return {p.id for p in Plan(parse_config(raw), n).prompts}


class Recorder:
    def __init__(self) -> None:
        self.total: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        self.stage = ""

    def start(self, stage: str, total: int, done: int) -> None:
        self.stage = stage
        self.total[stage] = self.total.get(stage, 0) + total
        self.seen[stage] = self.seen.get(stage, 0) + done

    def advance(self, ok: int, failed: int, usage: Usage, model: str) -> None:
        self.seen[self.stage] += ok + failed

    def finish(self) -> None:
        pass


def test_progress_counts_every_request_of_each_stage(tmp_path: Path) -> None:
    raw = _hard(tmp_path)
    progress = Recorder()
    result = run(parse_config(raw), limit=15, progress=progress)
    assert progress.total == progress.seen
    judged = sum(c.total for k, c in result.summary.stages.items() if k.startswith("judge"))
    assert progress.total["generate"] == result.summary.stages["generate"].total
    assert sum(v for k, v in progress.total.items() if k.startswith("judge")) == judged


def test_streaming_only_where_executor_and_every_backend_can(tmp_path: Path) -> None:
    assert Run(parse_config(fake_config(tmp_path))).streams
    assert not Run(parse_config(fake_config(tmp_path)), stream=False).streams
    staged = fake_config(tmp_path)
    staged["panel"] = [{"name": "j2", "backend": "fake-staged", "model": "fj2",
                        "license": "mit"}]
    assert not Run(parse_config(staged)).streams

    class NoStream(LocalExecutor):
        streams = False

    assert not Run(parse_config(fake_config(tmp_path)), executor=NoStream()).streams
    for name in ("openai-batch", "anthropic-batch", "vllm"):
        assert not backend_class(name).streams, name
    for name in ("openai", "anthropic"):
        assert backend_class(name).streams, name


def test_a_mixed_run_stays_staged_and_writes_the_same_dataset(tmp_path: Path) -> None:
    raw = _hard(tmp_path / "a")
    mixed = _hard(tmp_path / "b")
    mixed["panel"][0]["backend"] = "fake-staged"  # same keys, cannot stream
    run(parse_config(raw), limit=12)
    run(parse_config(mixed), limit=12)
    assert _files(Path(raw["output"])) == _files(Path(mixed["output"]))


def test_stream_requests_are_rendered_once_and_dropped_once_sent(tmp_path: Path) -> None:
    cfg = parse_config(fake_config(tmp_path))
    p = Prompt("p1", [{"role": "user", "content": "Say hi."}])
    c = Comparison("p1", ["a", "b"], ["hi", "hello"], [1, 0], 0)
    kept = judge_request(c, p, "helpfulness", cfg.judge, 7, 0, keep=True)
    lazy, = judge_requests([c], {"p1": p}, cfg.judge, 7, 0,
                           only={("p1", "helpfulness", 0)})
    assert kept.key == lazy.key and kept.messages and not lazy.messages
    sent = kept.messages
    kept.materialize()
    assert kept.messages is sent  # no second render
    kept.release()
    assert kept.messages == []


def test_a_refused_key_stops_a_streamed_run(tmp_path: Path) -> None:
    class Refusing(FakeBackend):
        async def complete(self, requests: Any, on_result: Any = None) -> list[ChatResult]:
            if any(not isinstance(r.tag, GenerationTag) for r in requests):
                raise BackendError("judge: HTTP 401")
            return await super().complete(requests, on_result)

    raw = fake_config(tmp_path, shard_size=5)
    raw["models"][0]["options"] = {"latency": 0.01}
    cfg = parse_config(raw)

    class Exec(LocalExecutor):
        def backend(self, spec: Any, store: Any) -> Any:
            return Refusing(spec) if spec.name == "judge" else super().backend(spec, store)

    runner = Run(cfg, limit=20, executor=Exec())
    assert runner.streams
    with pytest.raises(BackendError, match="HTTP 401"):
        asyncio.run(runner.execute())


def test_a_run_tunes_the_collector_and_restores_it(tmp_path: Path) -> None:
    import gc

    seen: list[tuple[int, int]] = []

    class Probe(Recorder):
        def start(self, stage: str, total: int, done: int) -> None:
            seen.append((gc.get_threshold()[0], gc.get_freeze_count()))
            super().start(stage, total, done)

    before = gc.get_threshold()
    run(parse_config(fake_config(tmp_path)), limit=4, progress=Probe())
    assert seen and all(t > before[0] and frozen > 0 for t, frozen in seen)
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
