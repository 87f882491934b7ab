"""``executor: ray``: the same run on a (local) Ray cluster gives the same dataset as the local
executor, survives a killed worker and a killed driver without asking an answered request again,
shares a model's rate limit between its workers, and fails in one line where it cannot run.

Every test here uses the session's one cluster (``ray_cluster``) and the module skips, in one
line, where ray is missing; the ones that run the real llama.cpp server are marked slow. The
parts that need no cluster are in ``test_executor_ray_parts.py``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml

from prefsynth.backends import register
from prefsynth.config import parse_config
from prefsynth.core.pipeline import Run, run
from prefsynth.output.writer import OutputWriter
from prefsynth.records import Usage
from prefsynth.testing import FakeBackend
from tests.conftest import EXAMPLE_PROMPTS, ROOT, fake_config, write_config
from tests.servers.counting_server import CountingServer
from tests.servers.llama_server import free_port

ray = pytest.importorskip("ray", reason="ray is not installed (pip install 'prefsynth[ray]')")

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
    filter(None, [str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH")]))}
ENV.pop("RAY_ADDRESS", None)


class DriverOnlyFake(FakeBackend):
    """A backend that keeps state with the driver, like ``openai-batch``."""

    shippable = False


register("fake-driver", "tests.core.test_executor_ray:DriverOnlyFake")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefsynth.cli", *args]


def _tables(out: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: pq.read_table(out / name / "train.parquet").to_pylist()
            for name in ("pairs", "annotations", "judgments")}


@pytest.fixture(scope="module")
def server() -> Iterator[CountingServer]:
    s = CountingServer()
    s.start()
    try:
        yield s
    finally:
        s.stop()


def _endpoint(url: str, **extra: Any) -> dict[str, Any]:
    return {"backend": "openai", "base_url": url, "timeout": 30.0, "max_retries": 6, **extra}


# ---------------------------------------------------------------------- on the local cluster


def _served_config(tmp_path: Path, url: str = "http://127.0.0.1:9/v1") -> Path:
    """A config the CLI can load (no fake backend): every model at ``url``."""
    cfg = fake_config(tmp_path)
    for m in [*cfg["models"], cfg["judge"]]:
        m.update(_endpoint(url))
    return write_config(tmp_path, cfg)


def test_bad_ray_address_is_one_line(tmp_path: Path, ray_cluster: str) -> None:
    cfg = _served_config(tmp_path)
    t0 = time.monotonic()
    p = subprocess.run(_cli("run", str(cfg), "--ray-address", f"127.0.0.1:{free_port()}",
                            "--limit", "2"), capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 5, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prefsynth: error: ray.address: no Ray "
                                                   "cluster answers at 127.0.0.1:"), lines
    assert time.monotonic() - t0 < 60  # ray.init alone would retry for minutes
    p = subprocess.run(_cli("run", str(cfg), "--ray-address", "no-port-here", "--limit", "2"),
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        "prefsynth: error: ray.address: 'no-port-here' is not HOST:PORT, ray://HOST:PORT or auto"]


def test_fake_run_on_ray_equals_local_and_batch_like_judge_stays_on_driver(
        tmp_path: Path, ray_cluster: str) -> None:
    over = {"seed": 5, "judge": {"name": "judge", "backend": "fake-driver", "model": "fj",
                                 "license": "openai", "options": {"garble_first": True}}}
    local = run(parse_config(fake_config(tmp_path / "local", **over)), limit=8)
    cfg = parse_config(fake_config(tmp_path / "ray", executor="ray",
                                   ray={"workers": 2, "shard_requests": 3}, **over))
    runner = Run(cfg, limit=8)
    writer = OutputWriter(cfg)
    result = asyncio.run(runner.execute(writer.add, keep=False))
    writer.close(result.summary, result.prompt_stats, runner.plan.curation)
    assert _tables(tmp_path / "ray" / "out") == _tables(tmp_path / "local" / "out")
    assert result.summary.stages["generate"].answered == 32
    assert result.summary.reasks == local.summary.reasks > 0  # re-asks went the same way
    # the pool ran on workers, the judge (shippable = False) on the driver
    assert set(runner.executor.pools) == {"a", "b", "c", "d"}  # type: ignore[attr-defined]
    # `prefsynth status` reads the same store the same way: done/failed/pending per model
    from prefsynth.tools.status import compute_status

    local_cfg = parse_config(fake_config(tmp_path / "local", **over))
    assert compute_status(cfg, 8).lines() == compute_status(local_cfg, 8).lines()
    # a rerun on Ray asks nothing: every key is in the store
    again = run(cfg, limit=8, export=False)
    assert again.summary.stages["generate"].cached == 32
    assert again.summary.stages["generate"].answered == 0


def test_a_backend_no_worker_can_build_fails_before_any_work(tmp_path: Path,
                                                             ray_cluster: str) -> None:
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "ghost_backend.py").write_text(
        "from prefsynth.testing import FakeBackend\n\nclass Ghost(FakeBackend):\n    pass\n")
    sys.path.insert(0, str(mod))
    try:
        import ghost_backend  # noqa: F401  (the driver can import it; the workers cannot)
    finally:
        sys.path.remove(str(mod))
    (mod / "ghost_backend.py").unlink()
    register("ghost", "ghost_backend:Ghost")
    models = fake_config(tmp_path)["models"]
    models[0]["backend"] = "ghost"
    cfg = parse_config(fake_config(tmp_path, models=models, executor="ray"))
    from prefsynth.errors import BackendError

    with pytest.raises(BackendError, match=r"^models\.0: backend 'ghost' cannot run on a Ray "
                                           r"worker: cannot import ghost_backend:Ghost"):
        run(cfg, limit=2)
    assert not (tmp_path / "out" / ".prefsynth" / "store.sqlite").exists() or \
        sqlite3.connect(tmp_path / "out" / ".prefsynth" / "store.sqlite").execute(
            "SELECT COUNT(*) FROM requests").fetchone()[0] == 0

    # a backend that cannot start on a worker (no API key there) fails the same way
    models = fake_config(tmp_path)["models"]
    models[1] = {"name": "b", "model": "m", "license": "mit",
                 **_endpoint("http://127.0.0.1:9/v1", api_key_env="PREFSYNTH_NO_SUCH_KEY")}
    cfg = parse_config(fake_config(tmp_path, models=models, executor="ray"))
    with pytest.raises(BackendError, match=r"^models\.1: environment variable "
                                           r"PREFSYNTH_NO_SUCH_KEY is not set"):
        run(cfg, limit=2)


class _KillOnce:
    """Progress that kills a worker of ``model`` (by its Ray name) on its first answers."""

    def __init__(self, model: str) -> None:
        self.model, self.killed = model, ""

    def start(self, stage: str, total: int, done: int) -> None:
        pass

    def advance(self, ok: int, failed: int, usage: Usage, model: str) -> None:
        if model == self.model and not self.killed:
            for entry in ray.util.list_named_actors(all_namespaces=True):
                if f"/{self.model}/" in entry["name"]:
                    ray.kill(ray.get_actor(entry["name"], namespace=entry["namespace"]))
                    self.killed = entry["name"]
                    return

    def finish(self) -> None:
        pass


def test_a_killed_worker_costs_only_its_shards_in_flight(tmp_path: Path, ray_cluster: str,
                                                         server: CountingServer) -> None:
    server.reset()
    server.delay = 0.05
    models = fake_config(tmp_path)["models"]
    models[0] = {"name": "a", "model": "served", "license": "mit",
                 **_endpoint(server.base_url, max_concurrency=2)}
    cfg = fake_config(tmp_path / "ray", models=models, executor="ray",
                      ray={"shard_requests": 3, "shards_in_flight": 2})
    progress = _KillOnce("a")
    try:
        result = run(parse_config(cfg), limit=12, progress=progress)
    finally:
        server.delay = 0.0
    assert progress.killed, "no worker of model a was found to kill"
    assert result.summary.stages["generate"].answered == 48
    resent = sum(server.by_body.values()) - len(server.by_body)
    assert len(server.by_body) == 12 and resent <= 3 * 2  # at most the shards in flight
    # the dataset is the local executor's
    local = fake_config(tmp_path / "local", models=models)
    run(parse_config(local), limit=12)
    assert _tables(tmp_path / "ray" / "out") == _tables(tmp_path / "local" / "out")


def test_two_workers_share_one_rate_limit(tmp_path: Path, ray_cluster: str,
                                          server: CountingServer) -> None:
    """60 requests per minute for the model, not per worker; a 429 pauses both workers."""
    server.reset()
    server.reject, server.retry_after = 1, "4"
    models = fake_config(tmp_path)["models"]
    models[0] = {"name": "a", "model": "served", "license": "mit",
                 **_endpoint(server.base_url, requests_per_minute=60, max_concurrency=2)}
    cfg = fake_config(tmp_path, models=models, executor="ray",
                      ray={"workers_per_model": {"a": 2}, "shard_requests": 1,
                           "shards_in_flight": 2})
    run(parse_config(cfg), limit=10, export=False)
    sent = sorted(server.arrivals)
    assert len(sent) == 10 and len(server.rejected) == 1
    # one budget: 11 sends (the 429 included) at 1/s, never two within less than 1.5 s of
    # each other's neighbour (two budgets would send every half second)
    every = sorted([*sent, *server.rejected])
    assert min(b - a for a, b in zip(every, every[2:], strict=False)) >= 1.5, every
    # the 429 (Retry-After: 4) paused both: at most the one send the other worker had leased
    t429 = server.rejected[0]
    assert sum(1 for t in sent if t429 < t < t429 + 3.8) <= 1, (t429, sent)


def test_data_llm_option_streams_a_ray_data_pipeline_into_the_store(
        tmp_path: Path, ray_cluster: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``ray.data_llm``: the Dataset plumbing (Arrow shards in, ``iter_batches`` out, committed
    as they come) with a stand-in for vLLM's engine, which needs a GPU."""
    from prefsynth.core.executor import ray_data_llm

    def engine(row: dict[str, Any]) -> dict[str, Any]:  # by value: workers need no tests/
        text = "echo " + row["messages"][-1]["content"][:24]
        return {**row, "generated_text": text, "num_input_tokens": 7,
                "num_generated_tokens": len(text.split())}

    monkeypatch.setattr(ray_data_llm.DataLLMPool, "_processor", lambda self: lambda ds: ds.map(
        ray_data_llm._preprocess).map(engine).map(ray_data_llm._postprocess))
    cfg = parse_config(fake_config(tmp_path, executor="ray",
                                   ray={"data_llm": ["a"], "shard_requests": 4}))
    result = run(cfg, limit=6)
    gens = [g for g in result.records.generations if g.model == "a"]
    assert len(gens) == 6
    assert all(g.error is None and g.text and g.text.startswith("echo ") for g in gens)
    assert result.summary.stages["generate"].answered == 24
    again = run(cfg, limit=6, export=False)
    assert again.summary.stages["generate"].cached == 24


# ---------------------------------------------------------------- the real llama.cpp server


def _quickstart(url: str, out: Path, **over: Any) -> dict[str, Any]:
    """examples/quickstart.yaml with its pool and judge at a llama.cpp server."""
    cfg = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    cfg["prompts"]["path"] = str(EXAMPLE_PROMPTS)
    for m in [*cfg["models"], cfg["judge"]]:
        m.update(_endpoint(url, max_concurrency=2))
        m["model"] = "smollm2"
        m.pop("options", None)
    for m in cfg["models"]:
        m["params"]["max_tokens"] = 48
    cfg["judge"]["params"]["max_tokens"] = 240
    cfg["judge"]["options"] = {"response_format_style": "json_object"}
    cfg["output"] = str(out)
    cfg.update(over)
    return cfg


LIMIT = 5


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, llama_server: str) -> Path:
    """The local executor's output for the quickstart at the llama.cpp server."""
    out = tmp_path_factory.mktemp("local") / "out"
    run(parse_config(_quickstart(llama_server, out)), limit=LIMIT)
    return out


@pytest.mark.slow
def test_quickstart_on_ray_gives_the_local_pairs(tmp_path: Path, ray_cluster: str,
                                                 llama_server: str, reference: Path) -> None:
    out = tmp_path / "ray"
    result = run(parse_config(_quickstart(llama_server, out, executor="ray")), limit=LIMIT)
    assert result.summary.stages["generate"].failed == 0
    assert _tables(out) == _tables(reference)


def _answered(store: Path, stage: str) -> int:
    if not store.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
        n = db.execute("SELECT COUNT(*) FROM requests WHERE error IS NULL AND stage LIKE ?",
                       (f"{stage}%",)).fetchone()[0]
        db.close()
        return int(n)
    except sqlite3.Error:
        return 0


def _counts(stdout: str, stage: str) -> tuple[int, int, int, int]:
    m = re.search(rf"^{stage}: (\d+) requests, (\d+) from store, (\d+) answered, (\d+) failed",
                  stdout, re.M)
    assert m, stdout
    return int(m[1]), int(m[2]), int(m[3]), int(m[4])


def _wait(cond: Any, proc: subprocess.Popen[bytes], timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    assert cond(), "timed out"


@pytest.mark.slow
def test_killed_worker_then_killed_driver_resume_without_repeats(
        tmp_path: Path, ray_cluster: str, llama_server: str, fault_proxy: Any,
        reference: Path) -> None:
    fault_proxy.configure()  # no faults: it only counts what reaches the server
    out = tmp_path / "killed"
    cfg = write_config(tmp_path, _quickstart(fault_proxy.base_url, out))
    store = out / ".prefsynth" / "store.sqlite"
    argv = _cli("run", str(cfg), "--ray-address", ray_cluster, "--limit", str(LIMIT))
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _answered(store, "generate") >= 2, proc)
        workers = [e for e in ray.util.list_named_actors(all_namespaces=True)
                   if e["name"].startswith("prefsynth/")]
        assert workers
        ray.kill(ray.get_actor(workers[0]["name"], namespace=workers[0]["namespace"]))
        _wait(lambda: _answered(store, "judge") >= 3, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    gen_done, judge_done = _answered(store, "generate"), _answered(store, "judge")
    time.sleep(3)  # the dead driver's workers go with it; let a last request land
    fault_proxy.configure()

    resumed = subprocess.run(argv, capture_output=True, text=True, env=ENV, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    total, cached, new, failed = _counts(resumed.stdout, "generate")
    assert (cached, new, failed) == (gen_done, total - gen_done, 0)
    _, jcached, jnew, jfailed = _counts(resumed.stdout, "judge")
    assert jcached >= judge_done
    # the server saw exactly the requests the store did not have: nothing answered twice
    assert fault_proxy.counts.get("ok", 0) == new + jnew + jfailed
    assert _tables(out) == _tables(reference)
