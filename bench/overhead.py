"""Benchmark: how much client overhead prefsynth adds per chat-completion request.

At scale prefsynth sends millions of requests, so the client must never be the bottleneck.
This measures, against a loopback OpenAI-compatible server that answers instantly
(``bench/instant_server.py``, its own process), the same N requests at the same concurrency
through:

1. ``raw aiohttp`` — one ``ClientSession`` (connector limit = concurrency), prebuilt orjson
   bodies, responses parsed by orjson, ``concurrency`` worker coroutines: the ceiling.
2. ``AsyncOpenAI (httpx)`` — the openai SDK as a typical user runs it: default transport,
   ``client.chat.completions.create`` for every request under a semaphore of ``concurrency``.
3. ``prefsynth`` — end to end: ``ChatRequest``s built by ``prefsynth.stages.generate.build_request``
   (distinct messages, so distinct keys), then ``prefsynth.core.executor.local.run_stage`` with an
   ``OpenAIBackend`` (``max_concurrency = concurrency``) and a fresh SQLite ``Store``, store
   writes included. Afterwards it asserts that all N answers are in the store and that a second
   ``run_stage`` over the same requests makes zero HTTP requests (the server counts them), and
   reports that rerun's time.

Two more rows split prefsynth's cost (``--no-decompose`` skips them): ``AsyncOpenAI
(aiohttp)`` — ``create`` over the SDK's aiohttp transport — and ``OpenAIBackend only`` — the
backend's ``complete`` in executor-sized chunks, no executor bookkeeping, no store. Row ``d``
does the same for the ``anthropic`` backend (``AnthropicBackend.complete`` against the same
server's instant ``POST /v1/messages``), so the two providers' client CPU per request can be
compared like for like; the goal is within 1.5x of row ``b``.

A last row, ``prefsynth CLI`` (``--cli-prompts``, 10,000 by default, 0 to skip), runs the real
``prefsynth run`` as a subprocess on that many prompts (``bench/cli_run.py``: two pool models and
a one-aspect judge on the same server), start-up, plan, store, re-asks and output files
included, its HTTP requests counted at the server. Its /raw is its requests per second over
row 1's; its CPU per request is the whole process's CPU (start-up and output too) over them.

Every row runs in a fresh subprocess pinned to one core (the server on another, when the
machine has two), after a short warm-up. Reported: wall time, requests/s, client CPU per
request (``time.process_time`` in the client process), server CPU in the same window, and peak
RSS (``ru_maxrss`` of that fresh process; its growth over the RSS after imports and setup).
prefsynth also runs at N/10 in a fresh process, to show how its memory grows with N.

Run: ``.venv/bin/python bench/overhead.py [--requests 20000] [--concurrency 64] [--repeat 2]``;
``--quick`` is 2,000 requests, one repeat; ``--rows raw,backend,anthropic`` runs only those rows
(and the comparisons they allow).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import orjson

from prefsynth.backends.openai_common import chat_body, result_from_completion

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
SERVER = HERE / "instant_server.py"
MODEL = "bench-model"

MODES = ("raw", "sdk", "prefsynth", "sdk-aiohttp", "backend", "stage-lean", "anthropic")
DECOMPOSE = ("sdk-aiohttp", "backend", "stage-lean", "anthropic")
ANTHROPIC_KEY_ENV = "PREFSYNTH_BENCH_ANTHROPIC_KEY"
LABELS = {
    "raw": "1 raw aiohttp",
    "sdk": "2 AsyncOpenAI httpx",
    "prefsynth": "3 prefsynth run_stage",
    "sdk-aiohttp": "a AsyncOpenAI aiohttp",
    "backend": "b OpenAIBackend alone",
    "stage-lean": "c run_stage, lean",
    "anthropic": "d AnthropicBackend alone",
}


# ------------------------------------------------------------------------------ worker side


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _stats(base: str) -> dict[str, float]:
    with urllib.request.urlopen(base + "/stats", timeout=10) as r:
        return json.loads(r.read())


def _messages(i: int, prefix: str = "") -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "You are a helpful, concise assistant."},
        {"role": "user", "content": f"{prefix}Question {i}: in two sentences, why is the sky "
         "blue and why are sunsets red?"},
    ]


def _sampling(i: int) -> dict[str, Any]:
    return {"temperature": 1.0, "top_p": 1.0, "max_tokens": 2048, "seed": i}


def _bodies(n: int, prefix: str) -> list[bytes]:
    return [orjson.dumps({"model": MODEL, "messages": _messages(i, prefix), **_sampling(i)})
            for i in range(n)]


async def _raw(base: str, bodies: list[bytes], conc: int) -> int:
    import aiohttp

    url = base + "/v1/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer bench"}
    it = iter(bodies)
    ok = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal ok
        for body in it:
            async with session.post(url, data=body, headers=headers) as r:
                payload = orjson.loads(await r.read())
            if r.status == 200 and payload["choices"][0]["message"]["content"]:
                ok += 1

    connector = aiohttp.TCPConnector(limit=conc)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(conc)))
    return ok


async def _sdk(base: str, n: int, conc: int, prefix: str, aiohttp_transport: bool) -> int:
    import openai

    kw: dict[str, Any] = {}
    if aiohttp_transport:
        kw["http_client"] = openai.DefaultAioHttpClient()
    client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="bench", max_retries=0, **kw)
    sem = asyncio.Semaphore(conc)

    async def one(i: int) -> bool:
        async with sem:
            r = await client.chat.completions.create(
                model=MODEL, messages=_messages(i, prefix), **_sampling(i)  # type: ignore[arg-type]
            )
        return bool(r.choices[0].message.content)

    try:
        return sum(await asyncio.gather(*(one(i) for i in range(n))))
    finally:
        await client.close()


def _spec(base: str, conc: int, backend: str = "openai") -> Any:
    from prefsynth.config import ModelSpec

    if backend == "anthropic":  # the server root: the backend adds /v1/messages
        return ModelSpec(name="bench", backend="anthropic", model=MODEL, base_url=base,
                         api_key_env=ANTHROPIC_KEY_ENV, max_concurrency=conc)
    return ModelSpec(name="bench", backend="openai", model=MODEL, base_url=base + "/v1",
                     max_concurrency=conc)


def _requests(spec: Any, n: int, prefix: str) -> list[Any]:
    from prefsynth.core.keys import build_request
    from prefsynth.records import GenerationTag

    return [build_request(spec, _messages(i, prefix), i, tag=GenerationTag(f"p{i}", "bench"))
            for i in range(n)]


async def _backend_only(backend: Any, reqs: list[Any]) -> int:
    """The backend's ``complete`` fed the way the executor feeds it, minus store and counts."""
    size = max(1, backend.batch_size)
    chunks = iter([reqs[i : i + size] for i in range(0, len(reqs), size)])
    ok = 0

    async def worker() -> None:
        nonlocal ok
        for chunk in chunks:
            results = await backend.complete(chunk)  # not `ok += ... await`: lost updates
            ok += sum(r.ok for r in results)

    await asyncio.gather(*(worker() for _ in range(max(1, backend.max_concurrency))))
    return ok


class LeanBackend:
    """Bench-only: the ``Backend`` protocol on plain aiohttp + orjson, with prefsynth's own
    ``chat_body`` and ``result_from_completion`` and ``OpenAIBackend``'s chunking — no SDK, no
    retries. Through ``run_stage`` it shows what the executor and the store cost by themselves.
    """

    name = "lean"

    def __init__(self, base: str, conc: int) -> None:
        import aiohttp

        self.url = base + "/v1/chat/completions"
        self.batch_size = min(256, max(16, 2 * conc))
        self.max_concurrency = max(4, -(-4 * conc // self.batch_size))
        self.sem = asyncio.Semaphore(conc)
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=conc))
        self.headers = {"Content-Type": "application/json", "Authorization": "Bearer bench"}

    async def complete(self, requests: Any) -> list[Any]:
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    async def _one(self, req: Any) -> Any:
        body = orjson.dumps(chat_body(req))
        async with self.sem, self.session.post(self.url, data=body, headers=self.headers) as r:
            payload = orjson.loads(await r.read())
        return result_from_completion(req.key, payload)

    async def aclose(self) -> None:
        await self.session.close()


async def _measured(out: dict[str, Any], base: str, work: Awaitable[T]) -> T:
    """Await ``work`` and record what every row reports: wall and client CPU time, peak RSS,
    and the server's request count and CPU over the same window."""
    s0 = _stats(base)
    c0, t0 = time.process_time(), time.perf_counter()
    result = await work
    out["wall"] = time.perf_counter() - t0
    out["cpu"] = time.process_time() - c0
    s1 = _stats(base)
    out["rss_peak"] = _maxrss_mb()
    out["server_count"] = s1["count"] - s0["count"]
    out["server_cpu"] = s1["cpu"] - s0["cpu"]
    return result


async def _stage(out: dict[str, Any], base: str, n: int, conc: int, lean: bool,
                 trace: bool) -> None:
    """``run_stage`` over n fresh requests into a fresh store, then the checks and the rerun."""
    from prefsynth.backends.openai_compat import OpenAIBackend
    from prefsynth.core.executor.local import run_stage
    from prefsynth.core.store import Store

    spec = _spec(base, conc)
    backend: Any = LeanBackend(base, conc) if lean else OpenAIBackend(spec)
    if not lean:
        out["backend"] = (f"transport={backend.transport}, batch_size={backend.batch_size}, "
                          f"chunks in flight={backend.max_concurrency}")
    tmp = tempfile.TemporaryDirectory(prefix="prefsynth-bench-")
    store = Store(Path(tmp.name) / "store.sqlite")
    warm = _requests(spec, min(max(conc, n // 20), 500), "warm-up ")
    await run_stage("generate", {"bench": (backend, warm)}, store, None)
    del warm
    out["rss_setup"] = _maxrss_mb()
    if trace:
        tracemalloc.start()
    c0, t0 = time.process_time(), time.perf_counter()
    reqs = _requests(spec, n, "")
    out["build_cpu"] = time.process_time() - c0
    out["build_wall"] = time.perf_counter() - t0
    out["rss_after_build"] = _maxrss_mb()
    if trace:
        out["trace_build"] = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
    # collect=False: answers go to the store only (what a million-request stage should do)
    _, counts = await _measured(out, base, run_stage(
        "generate", {"bench": (backend, reqs)}, store, None, collect=False))
    if trace:
        cur, peak = tracemalloc.get_traced_memory()
        out["trace_run_peak"] = peak - out["trace_build"]
        out["trace_run_kept"] = cur - out["trace_build"]
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)])
        out["trace_top"] = [
            (str(st.traceback[0]).replace(str(HERE.parent) + "/", ""), st.size, st.count)
            for st in snap.statistics("lineno")[:8]
        ]
        tracemalloc.stop()
    out["ok"] = counts.answered
    assert counts.answered == n and counts.cached == 0, counts
    assert out["server_count"] == n, f"server answered {out['server_count']}, not {n}"
    stored = store.get_many(r.key for r in reqs)
    assert len(stored) == n and all(r.ok for r in stored.values()), "store is missing rows"
    del stored
    # a rerun of the same stage is answered from the store: zero HTTP requests
    s0 = _stats(base)
    t0 = time.perf_counter()
    _, counts = await run_stage("generate", {"bench": (backend, reqs)}, store, None,
                                collect=False)
    out["rerun_wall"] = time.perf_counter() - t0
    out["rerun_http"] = _stats(base)["count"] - s0["count"]
    assert out["rerun_http"] == 0, f"rerun sent {out['rerun_http']} HTTP requests"
    assert counts.cached == n and counts.answered == 0, counts
    await backend.aclose()
    store.close()
    tmp.cleanup()


def worker_main(args: argparse.Namespace) -> None:
    pinned = "not pinned"
    if args.cpu is not None:
        try:
            os.sched_setaffinity(0, {args.cpu})
            pinned = f"core {args.cpu}"
        except (OSError, AttributeError) as e:
            pinned = f"not pinned ({e})"
    # everything the measured paths import, imported before the baseline RSS and the clock
    import aiohttp  # noqa: F401
    import openai  # noqa: F401
    import orjson  # noqa: F401

    import prefsynth.backends.openai_compat
    import prefsynth.core.executor.local
    import prefsynth.stages.generate

    if args.worker == "anthropic":
        import anthropic  # noqa: F401

        import prefsynth.backends.anthropic_live  # noqa: F401
        os.environ[ANTHROPIC_KEY_ENV] = "bench"

    base, n, conc, mode = args.url, args.requests, args.concurrency, args.worker
    warm_n = min(max(conc, n // 20), 500)
    out: dict[str, Any] = {"mode": mode, "n": n, "concurrency": conc, "pinned": pinned}

    async def go() -> None:
        backend = None
        if mode in ("prefsynth", "stage-lean"):
            await _stage(out, base, n, conc, mode == "stage-lean", args.trace)
            return
        if mode == "raw":
            await _raw(base, _bodies(warm_n, "warm-up "), conc)
            out["rss_setup"] = _maxrss_mb()
            measured = _raw(base, _bodies(n, ""), conc)  # bodies built before the clock
        elif mode in ("sdk", "sdk-aiohttp"):
            await _sdk(base, warm_n, conc, "warm-up ", mode == "sdk-aiohttp")
            out["rss_setup"] = _maxrss_mb()
            measured = _sdk(base, n, conc, "", mode == "sdk-aiohttp")
        else:  # backend, anthropic: one backend's complete() fed as the executor feeds it
            from prefsynth.backends import create_backend

            spec = _spec(base, conc, "anthropic" if mode == "anthropic" else "openai")
            backend = create_backend(spec)
            out["transport"] = backend.transport
            await _backend_only(backend, _requests(spec, warm_n, "warm-up "))
            out["rss_setup"] = _maxrss_mb()
            reqs = _requests(spec, n, "")
            out["rss_after_build"] = _maxrss_mb()
            measured = _backend_only(backend, reqs)
        out["ok"] = await _measured(out, base, measured)
        if backend is not None:
            await backend.aclose()

    asyncio.run(go())
    assert out["ok"] == n, f"{mode}: {out['ok']} of {n} answers"
    print("RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------ orchestrator side


def _start_server(cpu: int | None) -> tuple[subprocess.Popen[str], str, str]:
    cmd = [sys.executable, str(SERVER), "--port", "0"]
    if cpu is not None:
        cmd += ["--cpu", str(cpu)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    pinned = proc.stdout.readline().strip().removeprefix("AFFINITY ")
    port = int(proc.stdout.readline().split()[1])
    return proc, f"http://127.0.0.1:{port}", pinned


def _run_worker(mode: str, url: str, n: int, conc: int, cpu: int | None,
                trace: bool = False) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--url", url,
           "--requests", str(n), "--concurrency", str(conc)]
    if cpu is not None:
        cmd += ["--cpu", str(cpu)]
    if trace:
        cmd.append("--trace")
    env = dict(os.environ)
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    sys.stderr.write(proc.stdout + proc.stderr)
    raise SystemExit(f"worker {mode} failed (exit {proc.returncode})")


def _med(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="prefsynth client-overhead benchmark")
    ap.add_argument("--requests", type=int, default=None, help="requests per row (20000)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=None,
                    help="rounds over all rows, order alternating; medians reported "
                         "(default 2; --quick: 1)")
    ap.add_argument("--quick", action="store_true", help="2,000 requests, one round")
    ap.add_argument("--no-decompose", action="store_true",
                    help="only rows 1-3 (skip the rows that split prefsynth's cost)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin server and client")
    ap.add_argument("--cli-prompts", type=int, default=None,
                    help="prompts for the prefsynth CLI row (10000; --quick: 1000; 0: skip)")
    ap.add_argument("--rows", default=None,
                    help="comma-separated rows to run (of: " + ", ".join(MODES) + "); raw is "
                         "always run; default: all")
    ap.add_argument("--trace-memory", action="store_true",
                    help="also run the prefsynth path under tracemalloc (N/10 and N) and print "
                         "what its run_stage keeps")
    # internal: one measured row in this (fresh) process
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--cpu", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.requests is None:
        args.requests = 2000 if args.quick else 20000
    if args.worker:
        worker_main(args)
        return
    repeat = args.repeat or (1 if args.quick else 2)
    n, conc = args.requests, args.concurrency
    small = max(n // 10, 1)

    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    client_cpu = server_cpu = None
    if not args.no_pin and len(cores) >= 2:
        client_cpu, server_cpu = cores[0], cores[1]
    modes = [m for m in MODES if not (args.no_decompose and m in DECOMPOSE)]
    if args.rows:
        wanted = {"raw", *args.rows.split(",")}
        unknown = wanted - set(MODES)
        if unknown:
            ap.error(f"--rows: unknown row {sorted(unknown)[0]!r}")
        modes = [m for m in MODES if m in wanted]
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    traced: list[dict[str, Any]] = []
    cli_rows: list[dict[str, Any]] = []
    server, url, server_pin = _start_server(server_cpu)
    try:
        import aiohttp
        import openai

        print(f"prefsynth client-overhead benchmark: {n} requests per row, concurrency {conc}, "
              f"{repeat} round(s)")
        print(f"python {sys.version.split()[0]}, openai {openai.__version__}, "
              f"aiohttp {aiohttp.__version__}, orjson {orjson.__version__}; "
              f"{os.cpu_count()} CPUs, load average before start {os.getloadavg()[0]:.2f}")
        print(f"pinning: server {server_pin}; clients "
              + (f"pinned to core {client_cpu}" if client_cpu is not None else "not pinned"))
        t_start = time.perf_counter()
        for rnd in range(repeat):
            for m in modes if rnd % 2 == 0 else modes[::-1]:
                rows[m].append(_run_worker(m, url, n, conc, client_cpu))
        cli_prompts = args.cli_prompts if args.cli_prompts is not None else (
            1000 if args.quick else 10000)
        if cli_prompts and "prefsynth" in modes:
            from cli_run import run_cli  # bench/cli_run.py, beside this script

            cli_rows = [run_cli(url, cli_prompts, conc, client_cpu) for _ in range(repeat)]
        mem_small = (_run_worker("prefsynth", url, small, conc, client_cpu)
                     if "prefsynth" in modes else None)
        if args.trace_memory:
            traced = [_run_worker("prefsynth", url, k, conc, client_cpu, trace=True)
                      for k in (small, n)]
        elapsed = time.perf_counter() - t_start
        load_end = os.getloadavg()[0]
    finally:
        server.terminate()
        server.wait(timeout=10)
    _report(rows, modes, n, repeat, mem_small, traced, elapsed, load_end)
    if cli_rows:
        _report_cli(cli_rows, n / _med(rows["raw"], "wall"), 1e6 * _med(rows["raw"], "cpu") / n)


def _report(rows: dict[str, list[dict[str, Any]]], modes: list[str], n: int, repeat: int,
            mem_small: dict[str, Any] | None, traced: list[dict[str, Any]], elapsed: float,
            load_end: float) -> None:
    def rps(m: str, i: int | None = None) -> float:
        return n / (rows[m][i]["wall"] if i is not None else _med(rows[m], "wall"))

    def cpu_us(m: str) -> float:
        return 1e6 * _med(rows[m], "cpu") / n

    print()
    hdr = (f"{'client':<24}{'wall s':>7}{'req/s':>7}{'/raw':>6}{'CPU us/req':>11}"
           f"{'busy':>6}{'srv us/req':>11}{'srv busy':>9}{'peak RSS':>9}{'growth':>7}")
    print(hdr)
    print("-" * len(hdr))
    for m in modes:
        rs = rows[m]
        wall, srv = _med(rs, "wall"), _med(rs, "server_cpu")
        growth = statistics.median(r["rss_peak"] - r["rss_setup"] for r in rs)
        print(f"{LABELS[m]:<24}{wall:>7.2f}{rps(m):>7.0f}{rps(m) / rps('raw'):>6.2f}"
              f"{cpu_us(m):>11.0f}{100 * _med(rs, 'cpu') / wall:>5.0f}%{1e6 * srv / n:>11.1f}"
              f"{100 * srv / wall:>8.0f}%{_med(rs, 'rss_peak'):>7.0f}MB{growth:>5.0f}MB")
    print("medians over rounds. /raw: throughput over row 1's. CPU: client process CPU\n"
          "(time.process_time). busy: client CPU / wall (under 100%: waiting, or sharing the core\n"
          "with other jobs). srv: server process CPU in the same window. growth: peak RSS - RSS\n"
          "after imports and warm-up (MB = MiB; includes each row's own O(N) inputs).")
    if "backend" in rows:
        print("a/b/c split row 3. a: the SDK's create() on its aiohttp transport. b: OpenAIBackend"
              ".complete\nfed as the executor feeds it (no store). c: run_stage + Store over a "
              "bench-only lean\naiohttp backend (prefsynth's chat_body/result_from_completion, "
              "no SDK, no retries).")
    if "anthropic" in rows:
        print("d: AnthropicBackend.complete fed like b, against the same server's instant\n"
              "POST /v1/messages (the Messages API), no store.")

    raw = rows["raw"]
    srv_us = 1e6 * _med(raw, "server_cpu") / n
    srv_busy = _med(raw, "server_cpu") / _med(raw, "wall")
    print(f"\nserver: {srv_us:.0f} us of CPU per request -> about {1e6 / srv_us:,.0f} req/s on "
          f"its core, {rps('raw') * srv_us / 1e6 * 100:.0f}% busy during the raw loop: "
          + ("not the bottleneck" if srv_busy < 0.7 else "MAY BE THE BOTTLENECK"))
    if {"anthropic", "backend"} <= set(rows):
        ratio = cpu_us("anthropic") / cpu_us("backend")
        rounds = ", ".join(f"{rows['anthropic'][i]['cpu'] / rows['backend'][i]['cpu']:.2f}"
                           for i in range(repeat))
        print(f"\nAnthropicBackend / OpenAIBackend, client CPU per request: {ratio:.2f}  "
              f"({cpu_us('anthropic'):.0f} vs {cpu_us('backend'):.0f} us; goal <= 1.5: "
              f"{'met' if ratio <= 1.5 else 'NOT met'}; rounds: {rounds}; transports "
              f"{rows['anthropic'][0]['transport']} / {rows['backend'][0]['transport']})")
    if mem_small is None or not {"prefsynth", "sdk"} <= set(rows):
        print(f"\ntotal benchmark time {elapsed:.0f} s; load average at the end {load_end:.2f}")
        return

    print()
    goal = rps("prefsynth") / rps("raw")
    rounds = ", ".join(f"{rps('prefsynth', i) / rps('raw', i):.2f}" for i in range(repeat))
    print(f"prefsynth / raw aiohttp, throughput:     {goal:.2f}  (goal >= 0.40: "
          f"{'met' if goal >= 0.40 else 'NOT met'}; rounds: {rounds})")
    print(f"prefsynth / raw aiohttp, CPU per request: {cpu_us('raw') / cpu_us('prefsynth'):.2f}  "
          "(raw CPU/req / prefsynth CPU/req: the throughput ratio on a dedicated core)")
    rounds = ", ".join(f"{rps('prefsynth', i) / rps('sdk', i):.2f}" for i in range(repeat))
    print(f"prefsynth / AsyncOpenAI (httpx):         {rps('prefsynth') / rps('sdk'):.2f}  "
          f"(rounds: {rounds}); CPU per request {cpu_us('sdk') / cpu_us('prefsynth'):.2f}x less")
    if {"backend", "stage-lean"} <= set(rows):
        base = cpu_us("raw")
        print(f"client CPU per request, split: raw aiohttp {base:.0f} us; "
              f"run_stage+store on a lean backend {cpu_us('stage-lean'):.0f} us "
              f"(+{cpu_us('stage-lean') - base:.0f}); OpenAIBackend alone "
              f"{cpu_us('backend'):.0f} us (+{cpu_us('backend') - base:.0f}: its "
              f"{rows['prefsynth'][0]['backend'].split(',')[0]} send + retry/classify wrapper, "
              f"no store); prefsynth {cpu_us('prefsynth'):.0f} us")

    p = rows["prefsynth"]
    print(f"\nprefsynth OpenAIBackend: {p[0]['backend']}")
    print(f"building {n} ChatRequests (build_request: params, key hash): "
          f"{_med(p, 'build_wall'):.2f} s, {1e6 * _med(p, 'build_cpu') / n:.0f} us CPU each "
          "(before run_stage, not in row 3)")
    print(f"all {n} answers in the store: yes (asserted, every round); HTTP requests: "
          f"{p[0]['server_count']} (asserted == {n})")
    print(f"rerun from store: {_med(p, 'rerun_wall'):.2f} s for {n} requests "
          f"(HTTP requests sent: {p[0]['rerun_http']}, asserted 0)")

    print("\nmemory, prefsynth path, each size in a fresh process (ru_maxrss, MiB):")
    print(f"{'requests':>10}{'after setup':>13}{'after build':>13}{'peak':>8}"
          f"{'requests list':>15}{'run_stage':>11}")
    big = min(p, key=lambda r: r["rss_peak"])
    for r in (mem_small, big):
        print(f"{r['n']:>10}{r['rss_setup']:>13.1f}{r['rss_after_build']:>13.1f}"
              f"{r['rss_peak']:>8.1f}{r['rss_after_build'] - r['rss_setup']:>15.1f}"
              f"{r['rss_peak'] - r['rss_after_build']:>11.1f}")
    dn = big["n"] - mem_small["n"]
    if dn > 0:
        d_build = (big["rss_after_build"] - big["rss_setup"]) - (
            mem_small["rss_after_build"] - mem_small["rss_setup"])
        d_run = (big["rss_peak"] - big["rss_after_build"]) - (
            mem_small["rss_peak"] - mem_small["rss_after_build"])
        print(f"per extra request: requests list {d_build * 2**20 / dn:,.0f} B (the caller's), "
              f"run_stage {d_run * 2**20 / dn:,.0f} B (collect=False: answers go to the "
              "store only; see bench/README.md)")
    for t in traced:
        print(f"\ntracemalloc, {t['n']} requests: requests list {t['trace_build'] / 2**20:.1f} "
              f"MiB; run_stage peak +{t['trace_run_peak'] / 2**20:.1f} MiB, still held after "
              f"it returns +{t['trace_run_kept'] / 2**20:.1f} MiB "
              f"({t['trace_run_kept'] / t['n']:,.0f} B/request); largest live allocations:")
        for where, size, count in t["trace_top"]:
            print(f"  {size / 2**20:7.2f} MiB {count:>8} blocks  {where}")
    print(f"\ntotal benchmark time {elapsed:.0f} s; load average at the end {load_end:.2f}")


def _report_cli(cli: list[dict[str, Any]], raw_rps: float, raw_cpu_us: float) -> None:
    """The ``prefsynth CLI`` row against row 1 (raw aiohttp), per HTTP request end to end."""
    wall, reqs = _med(cli, "wall_s"), _med(cli, "requests")
    rps, cpu_us = reqs / wall, 1e6 * _med(cli, "cpu_s") / reqs
    print(f"\n{'prefsynth CLI':<24}{wall:>7.2f}{rps:>7.0f}{rps / raw_rps:>6.2f}{cpu_us:>11.0f}"
          f"{100 * _med(cli, 'cpu_s') / wall:>5.0f}%  ({cli[0]['prompts']} prompts, {reqs:.0f} "
          f"HTTP requests counted at the server, peak RSS {_med(cli, 'rss_mb'):.0f} MB)")
    print(f"prefsynth CLI / raw aiohttp, per request end to end: throughput {rps / raw_rps:.2f}, "
          f"CPU {raw_cpu_us / cpu_us:.2f} (goal >= 0.75: "
          f"{'met' if rps / raw_rps >= 0.75 else 'NOT met'}); start to first request "
          f"{_med(cli, 'start_s'):.2f} s ({_med(cli, 'start_cpu_s'):.2f} s CPU)")


if __name__ == "__main__":
    main()
