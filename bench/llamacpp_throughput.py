"""Benchmark: the ``llamacpp`` backend beside raw ``llama_cpp.Llama`` on the same prompts.

The workload is a config's own requests (default: the quickstart): its generation requests
for the first ``--limit`` prompts (every pool variant), then its judge's attempt-0 requests
over those generations. The generations come from a finished run's store (``--store``) when
given, otherwise from fixed stand-in texts, so no row depends on another.

Rows (each in a fresh process, after the model is loaded; rows alternate round by round so
a busy machine slows them alike):

- ``raw``: one ``Llama`` (the judge's ``n_ctx``), ``reset()`` then ``create_chat_completion``
  per request, in plan order: every prompt from an empty cache. This is what the backend did
  before, and the reference answers.
- ``raw-keep``: the same without ``reset()``: llama-cpp-python's own prefix match with the
  previous request.
- ``backend-1``: ``run_stage`` over ``LlamaCppBackend``s with ``prefix_cache: false``:
  raw's work through prefsynth (executor, store, the shared model), so ``backend-1 / raw``
  is the backend's overhead.
- ``backend``: ``run_stage`` with the default options: one shared model for the pool and the
  judge, prefix reuse aligned to a reset cache's chunks, each chunk of requests run in
  prompt order.

Reported per row: wall seconds, process CPU seconds, prompt tokens asked, prompt tokens
evaluated (the rest came from the KV cache), completion tokens, tokens/s ((prompt +
completion) / wall), its ratio to ``raw`` of the same round, peak RSS, and how many answers
differ from ``raw``'s.

Run: ``python bench/llamacpp_throughput.py [--limit 4] [--repeat 2] [--threads N]
[--rows raw,backend-1,backend] [--store out/quickstart/.prefsynth/store.sqlite]``.
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ROWS = ("raw", "raw-keep", "backend-1", "backend")
STAND_IN = ("{model} says: here is a short, careful answer with two or three sentences of "
            "detail, an example, and a closing remark that sums it up for the reader. ") * 2


def workload(config: str, limit: int, store: str | None) -> tuple[Any, list[Any], list[Any]]:
    """The config, its generation requests and its judge's requests (materialized)."""
    from prefsynth.config import load_config
    from prefsynth.core.plan import Plan
    from prefsynth.core.store import Store
    from prefsynth.records import ChatResult
    from prefsynth.stages.generate import to_generations

    cfg = load_config(config)
    plan = Plan(cfg, limit)
    gen: list[Any] = []
    judge: list[Any] = []
    for shard in plan.shards():
        gen += shard.requests
        stored = Store(store).get_many(r.key for r in shard.requests) if store else {}
        results = {r.key: stored.get(r.key) or ChatResult(r.key, text=STAND_IN.format(
            model=r.tag.model if r.tag else "m")) for r in shard.requests}
        comps, _ = plan.comparisons(shard, to_generations(shard.requests, results))
        judge += plan.judge_rounds(shard, comps, cfg.judge).requests()
    for r in judge:
        r.materialize()
    return cfg, gen, judge


def _raw(cfg: Any, reqs: list[Any], threads: int, keep: bool) -> dict[str, Any]:
    import llama_cpp

    from prefsynth.backends.llamacpp import bound_strings, resolve_model_path

    n_ctx = int(cfg.judge.options.get("n_ctx", 2048))
    llm = llama_cpp.Llama(model_path=str(resolve_model_path(cfg.judge.model)), n_ctx=n_ctx,
                          n_threads=threads, verbose=False, seed=0)
    answers, prompt, completion = {}, 0, 0
    t0, c0 = time.perf_counter(), time.process_time()
    for r in reqs:
        p = r.params
        kw: dict[str, Any] = {"messages": r.messages, "temperature": p["temperature"],
                              "top_p": p["top_p"], "max_tokens": p["max_tokens"],
                              "seed": p["seed"], "stop": p.get("stop")}
        if r.response_format is not None:
            kw["response_format"] = {"type": "json_object",
                                     "schema": bound_strings(r.response_format["schema"], 160)}
        if not keep:
            llm.reset()
        out: Any = llm.create_chat_completion(**kw)
        answers[r.key] = out["choices"][0]["message"].get("content") or ""
        prompt += out["usage"]["prompt_tokens"]
        completion += out["usage"]["completion_tokens"]
    return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0,
            "prompt": prompt, "evaluated": prompt, "completion": completion, "answers": answers}


def _backend(cfg: Any, gen: list[Any], judge: list[Any], threads: int,
             reference: bool) -> dict[str, Any]:
    from prefsynth.backends import create_backend
    from prefsynth.core.executor.local import run_stage
    from prefsynth.core.store import Store

    extra: dict[str, Any] = {"n_threads": threads}
    if reference:
        extra.update(prefix_cache=False)
    specs = [m.model_copy(update={"options": {**m.options, **extra}}) for m in cfg.models]
    jspec = cfg.judge.model_copy(update={"options": {**cfg.judge.options, **extra}})
    backends = {s.name: create_backend(s) for s in [*specs, jspec]}
    answers: dict[str, str] = {}

    async def run(store: Store) -> None:
        work = {m: (backends[m], [r for r in gen if r.tag.model == m]) for m in backends
                if m != jspec.name}
        results, _ = await run_stage("generate", work, store)
        judged, _ = await run_stage("judge", {jspec.name: (backends[jspec.name], judge)}, store)
        for res in [*results.values(), *judged.values()]:
            answers[res.key] = res.text or ""

    with tempfile.TemporaryDirectory() as tmp, Store(Path(tmp) / "s.sqlite") as store:
        t0, c0 = time.perf_counter(), time.process_time()
        asyncio.run(run(store))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        prompt, completion = store.usage_totals()
    stats = backends[jspec.name].stats()  # type: ignore[attr-defined]
    asyncio.run(_close(backends.values()))
    return {"wall": wall, "cpu": cpu, "prompt": prompt,
            "evaluated": stats["prompt"] - stats["cached"], "completion": completion,
            "answers": answers}


async def _close(backends: Any) -> None:
    for b in backends:
        await b.aclose()


def row(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """One row, in this process: the numbers and the answers, as JSON."""
    cfg, gen, judge = workload(args.config, args.limit, args.store)
    if name in ("raw", "raw-keep"):
        out = _raw(cfg, gen + judge, args.threads, keep=name == "raw-keep")
    else:
        out = _backend(cfg, gen, judge, args.threads, reference=name == "backend-1")
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    out["requests"] = len(gen) + len(judge)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"))
    ap.add_argument("--limit", type=int, default=4, help="prompts (default 4)")
    ap.add_argument("--store", help="a finished run's store: its generations feed the judge")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--rows", default="raw,backend-1,backend")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row, print JSON
    args = ap.parse_args()
    if args.row:
        print(json.dumps(row(args.row, args)))
        return
    rows = args.rows.split(",")
    unknown = set(rows) - set(ROWS)
    if unknown:
        sys.exit(f"unknown rows {sorted(unknown)}; known: {', '.join(ROWS)}")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    base = [sys.executable, __file__, "--config", args.config, "--limit", str(args.limit),
            "--threads", str(args.threads)] + (["--store", args.store] if args.store else [])
    print(f"{args.config}: {args.limit} prompts, {args.threads} threads, load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'round':>5} {'row':<10} {'wall s':>7} {'cpu s':>7} {'prompt':>7} {'evaluated':>9} "
          f"{'compl':>6} {'tok/s':>6} {'x raw':>6} {'RSS MB':>6} {'differ':>7}", flush=True)
    reference: dict[str, str] | None = None
    for rnd in range(1, args.repeat + 1):
        raw_rate = None
        for name in rows:
            out = json.loads(subprocess.run([*base, "--row", name], env=env, check=True,
                                            capture_output=True, text=True).stdout)
            rate = (out["prompt"] + out["completion"]) / out["wall"]
            if name == "raw":
                raw_rate = rate
                reference = reference or out["answers"]
            ratio = f"{rate / raw_rate:6.2f}" if raw_rate else "     -"
            differ = "-"
            if reference is not None:
                differ = f"{sum(reference.get(k) != v for k, v in out['answers'].items())}/" \
                         f"{len(out['answers'])}"
            print(f"{rnd:>5} {name:<10} {out['wall']:7.1f} {out['cpu']:7.1f} {out['prompt']:7d} "
                  f"{out['evaluated']:9d} {out['completion']:6d} {rate:6.1f} {ratio} "
                  f"{out['rss_mb']:6d} {differ:>7}  (load {os.getloadavg()[0]:.1f})",
                  flush=True)


if __name__ == "__main__":
    main()
