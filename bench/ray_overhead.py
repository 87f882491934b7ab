"""Benchmark: what ``executor: ray`` costs per request, against the local executor.

The same N requests (20,000 by default) go to the loopback server that answers at once
(``bench/instant_server.py``) through ``run_stage`` of

1. ``local`` — the local executor, an ``OpenAIBackend`` in the driver process;
2. ``ray x1`` — the Ray executor with one worker (a Ray actor building its own OpenAIBackend);
3. ``ray x2`` — the same with two workers;

each in a fresh driver process with a fresh SQLite store, after a warm-up stage that also
starts the workers, with ``collect=False`` (answers go to the store only, as in a sharded run).
All drivers join one local Ray cluster started by this script (``--num-cpus`` logical CPUs).
Reported per row: wall time and requests/s; CPU per request in the driver (its
``time.process_time``, Ray's threads in it included), in the workers (their ``/proc`` times) and
in Ray's own processes (raylet, GCS, ...: every other process under this script, via psutil);
the driver's peak RSS growth while the stage ran. Each row checks that every answer is in the
store and that a rerun sends no request. ``ray x2`` also runs at N/4 to show that the driver's
memory does not grow with N (shards in flight are bounded, not the request count).

At the end: Ray's CPU per request against the local executor's, and the arithmetic of the
driver at scale: a driver costing d µs of CPU per request answers at most 1e6/d requests/s
on one core, against 100 workers x 100 req/s = 10,000 req/s.

Run: ``.venv/bin/python bench/ray_overhead.py [--requests 20000] [--concurrency 64]``;
``--quick`` is 2,000 requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SERVER = HERE / "instant_server.py"
MODEL = "bench-model"
MODES = ("local", "ray1", "ray2")
LABELS = {"local": "local executor", "ray1": "ray, 1 worker", "ray2": "ray, 2 workers"}


def _stats(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/stats", timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rss_parts() -> dict[str, float]:
    """Resident MiB by kind now: ``anon`` (the heap) and ``shmem`` (shared memory mapped in:
    Ray's object store pages the driver wrote shards into)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssShmem:")):
                key, value = line.split(":")
                out[key[3:].lower()] = int(value.split()[0]) / 1024.0
    return out


def _proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _config(base: str, conc: int, workers: int) -> Any:
    from prefsynth.config import parse_config

    model = {"name": "bench", "backend": "openai", "model": MODEL, "base_url": base + "/v1",
             "max_concurrency": conc, "license": "mit"}
    return parse_config({
        "name": "ray-overhead", "prompts": {"path": str(HERE.parent / "examples" /
                                                        "prompts.jsonl")},
        "models": [model, {**model, "name": "other"}], "responses_per_prompt": 2,
        "judge": {**model, "name": "judge"}, "output": tempfile.mkdtemp(),
        "executor": "ray" if workers else "local", "ray": {"workers": max(1, workers)},
    })


def _requests(spec: Any, n: int, prefix: str) -> list[Any]:
    from prefsynth.core.keys import build_request
    from prefsynth.records import GenerationTag

    return [build_request(spec, [
        {"role": "system", "content": "You are a helpful, concise assistant."},
        {"role": "user", "content": f"{prefix}Question {i}: in two sentences, why is the sky "
                                    "blue and why are sunsets red?"}],
        i, tag=GenerationTag(f"p{i}", "bench")) for i in range(n)]


async def _row(out: dict[str, Any], base: str, n: int, conc: int, workers: int,
               address: str | None, trace: bool = False) -> None:
    from prefsynth.core.executor import executor_for
    from prefsynth.core.store import Store

    cfg = _config(base, conc, workers)
    if address:
        cfg.ray.address = address
    spec = cfg.model("bench")
    executor = executor_for(cfg)
    tmp = tempfile.TemporaryDirectory(prefix="prefsynth-bench-")
    store = Store(Path(tmp.name) / "store.sqlite")
    backend = executor.backend(spec, store)
    warm = _requests(spec, min(max(conc, n // 20), 500), "warm-up ")
    await executor.run_stage("generate", {"bench": (backend, warm)}, store, None)
    del warm
    pool = getattr(backend, "pool", None)  # bench only: the Ray workers' pids
    pids = [i["pid"] for i in pool.info.values()] if pool is not None else []
    out["shard"] = pool.shard_size if pool is not None else None
    system = _ray_processes(exclude={os.getpid(), *pids}) if pool is not None else []
    reqs = _requests(spec, n, "")
    out["rss_before"] = _rss_mb()
    parts0 = _rss_parts()
    s0 = _stats(base)
    w0 = sum(_proc_cpu(p) for p in pids)
    y0 = sum(_proc_cpu(p) for p in system)
    if trace:
        tracemalloc.start()
        held = tracemalloc.get_traced_memory()[0]
    c0, t0 = time.process_time(), time.perf_counter()
    _, counts = await executor.run_stage("generate", {"bench": (backend, reqs)}, store, None,
                                         collect=False)
    if trace:
        out["trace_peak"] = tracemalloc.get_traced_memory()[1] - held
        tracemalloc.stop()
    out["wall"] = time.perf_counter() - t0
    out["cpu_driver"] = time.process_time() - c0
    out["cpu_workers"] = sum(_proc_cpu(p) for p in pids) - w0
    out["cpu_system"] = sum(_proc_cpu(p) for p in system if os.path.exists(f"/proc/{p}")) - y0
    out["rss_growth"] = _maxrss_mb() - out["rss_before"]
    parts1 = _rss_parts()
    out["anon_growth"] = parts1["anon"] - parts0["anon"]
    out["shmem_growth"] = parts1["shmem"] - parts0["shmem"]
    s1 = _stats(base)
    out["server_count"] = s1["count"] - s0["count"]
    assert counts.answered == n and counts.cached == 0, counts
    assert out["server_count"] == n, f"server answered {out['server_count']}, not {n}"
    stored = store.get_many(r.key for r in reqs)
    assert len(stored) == n and all(r.ok for r in stored.values()), "store is missing rows"
    del stored
    s0 = _stats(base)
    _, counts = await executor.run_stage("generate", {"bench": (backend, reqs)}, store, None,
                                         collect=False)
    assert _stats(base)["count"] == s0["count"] and counts.cached == n, "the rerun sent requests"
    await backend.aclose()
    await executor.aclose()
    store.close()
    tmp.cleanup()


def _ray_processes(exclude: set[int]) -> list[int]:
    """Ray's own processes (raylet, GCS, idle workers...): the orchestrator's other children."""
    try:
        import psutil
    except ImportError:
        return []
    parent = os.environ.get("BENCH_ORCHESTRATOR")
    if not parent:
        return []
    kids = psutil.Process(int(parent)).children(recursive=True)
    server = int(os.environ.get("BENCH_SERVER", "0"))
    return [k.pid for k in kids if k.pid not in exclude and k.pid != server]


def worker_main(args: argparse.Namespace) -> None:
    import orjson  # noqa: F401

    import prefsynth.backends.openai_compat
    import prefsynth.core.executor.local

    workers = {"local": 0, "ray1": 1, "ray2": 2}[args.worker]
    if workers:
        import prefsynth.core.executor.ray  # noqa: F401
    out: dict[str, Any] = {"mode": args.worker, "n": args.requests}
    asyncio.run(_row(out, args.url, args.requests, args.concurrency, workers, args.address,
                     args.trace))
    print("RESULT " + json.dumps(out), flush=True)


def _run_row(mode: str, url: str, n: int, conc: int, address: str,
             env: dict[str, str], trace: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--url", url,
           "--requests", str(n), "--concurrency", str(conc), "--address", address]
    if trace:
        cmd.append("--trace")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])  # type: ignore[no-any-return]
    sys.stderr.write(proc.stdout + proc.stderr[-4000:])
    raise SystemExit(f"row {mode} failed (exit {proc.returncode})")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="prefsynth: executor ray vs local, per request")
    ap.add_argument("--requests", type=int, default=None, help="requests per row (20000)")
    ap.add_argument("--concurrency", type=int, default=64, help="HTTP requests in flight "
                    "per backend (max_concurrency)")
    ap.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the Ray cluster")
    ap.add_argument("--quick", action="store_true", help="2,000 requests")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--address", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.requests is None:
        args.requests = 2000 if args.quick else 20000
    if args.worker:
        worker_main(args)
        return
    n, conc = args.requests, args.concurrency

    import ray

    server = subprocess.Popen([sys.executable, str(SERVER), "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None
    server.stdout.readline()  # AFFINITY ...
    url = f"http://127.0.0.1:{int(server.stdout.readline().split()[1])}"
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_enable_metrics_collection", "0")  # no dashboard, no agent
    src = str(HERE.parent / "src")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=200 * 2**20,
             log_to_driver=False, logging_level="WARNING")
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "BENCH_ORCHESTRATOR": str(os.getpid()), "BENCH_SERVER": str(server.pid)}
    rows: dict[str, dict[str, Any]] = {}
    try:
        print(f"executor overhead: {n} requests per row, max_concurrency {conc}, "
              f"{os.cpu_count()} cores, Ray {ray.__version__} ({args.num_cpus} logical CPUs)")
        for mode in MODES:
            rows[mode] = _run_row(mode, url, n, conc, address, env)
            r = rows[mode]
            print(f"  {LABELS[mode]:<16} {r['wall']:6.2f}s {n / r['wall']:8,.0f} req/s  "
                  f"cpu/request: driver {r['cpu_driver'] / n * 1e6:5.0f} us, workers "
                  f"{r['cpu_workers'] / n * 1e6:5.0f} us, ray processes "
                  f"{r['cpu_system'] / n * 1e6:4.0f} us; driver peak RSS +{r['rss_growth']:.1f} "
                  f"MiB" + (f" (shards of {r['shard']})" if r["shard"] else ""), flush=True)
            print(f"  {'':<16} after the stage: heap +{r['anon_growth']:.1f} MiB, shared memory "
                  f"+{r['shmem_growth']:.1f} MiB", flush=True)
        small = _run_row("ray2", url, max(n // 4, 1), conc, address, env)
        traced = [_run_row("ray2", url, m, conc, address, env, trace=True)
                  for m in (max(n // 4, 1), n)]
    finally:
        ray.shutdown()
        server.terminate()
        server.wait()

    def total(r: dict[str, Any]) -> float:
        return (r["cpu_driver"] + r["cpu_workers"] + r["cpu_system"]) / r["n"] * 1e6

    local = total(rows["local"])
    for mode in ("ray1", "ray2"):
        print(f"{LABELS[mode]}: {total(rows[mode]):.0f} us of CPU per request in all, "
              f"{total(rows[mode]) / local:.2f}x the local executor's {local:.0f} us")
    d = max(rows[m]["cpu_driver"] / n * 1e6 for m in ("ray1", "ray2"))
    print(f"driver: {d:.0f} us of CPU per request (goal: under 200) -> one driver core "
          f"commits up to {1e6 / d:,.0f} requests/s; 100 workers x 100 req/s = 10,000 req/s "
          f"needs {10_000 * d / 1e6:.2f} of a core")
    big = rows["ray2"]
    print(f"driver memory, ray x2: peak RSS +{small['rss_growth']:.1f} MiB at {small['n']} "
          f"requests, +{big['rss_growth']:.1f} MiB at {n}; after the stage, heap "
          f"+{small['anon_growth']:.1f} / +{big['anon_growth']:.1f} MiB and shared memory "
          f"+{small['shmem_growth']:.1f} / +{big['shmem_growth']:.1f} MiB (object store pages, "
          "bounded by its size, not by N); the requests are built before the stage and not "
          "counted")
    a, b = traced
    print(f"driver Python heap held by the stage (tracemalloc peak), ray x2: "
          f"{a['trace_peak'] / 2**20:.2f} MiB at {a['n']} requests, "
          f"{b['trace_peak'] / 2**20:.2f} MiB at {b['n']}: "
          f"{(b['trace_peak'] - a['trace_peak']) / max(b['n'] - a['n'], 1):.0f} B per extra "
          "request (the keys it looks up and its list of missing requests)")


if __name__ == "__main__":
    main()
