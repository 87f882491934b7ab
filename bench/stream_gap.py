"""Benchmark: the time no HTTP request is in flight during a run, staged vs streamed.

The staged path answers each stage of a shard before starting the next, so between the
last generation and the first judge request (and between judge rounds, and between shards)
nothing is sent while the client renders, hashes, looks up and parses. The streaming path
(``core.stream``) sends a prompt's judge requests while other generations are in flight.
This runs the same config both ways in one process, each on a fresh store, against
``bench/instant_server.py`` (its own process), with the config of ``bench/cli_run.py`` (two
pool models and a one-aspect judge whose answers never parse, so every judgment is re-asked
``max_reasks`` times), after a warm-up run of each, ``--repeat`` times each in alternating order, and reports per
mode (medians):

* ``requests``: HTTP requests sent (counted in the client);
* ``span s``: from the first request sent to the last answer received;
* ``idle s``: within that span, the time with no request in flight, and the longest gap;
* ``tail s``: from the last answer to the run's end (pairs, output files, teardown);
* ``wall s`` and ``CPU s`` (this process) for the whole run, output written.

Run: ``PYTHONPATH=src .venv/bin/python bench/stream_gap.py [--prompts 2000] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cli_run import KEY_ENV, _config, instant_server  # noqa: E402  (bench/cli_run.py, beside this script)

from prefsynth.config import load_config  # noqa: E402
from prefsynth.core.executor import LocalExecutor  # noqa: E402
from prefsynth.core.pipeline import Run, _run_gc  # noqa: E402


class Tracker:
    """Requests in flight, and the time with none between the first and the last."""

    def __init__(self) -> None:
        self.inflight = self.sent = 0
        self.first: float | None = None
        self.zero_since: float | None = None
        self.last_done = 0.0
        self.idle = self.longest = 0.0

    def wrap(self, send: Any) -> Any:
        async def tracked(key: str, body: bytes) -> Any:
            now = time.perf_counter()
            if self.first is None:
                self.first = now
            if self.inflight == 0 and self.zero_since is not None:
                gap = now - self.zero_since
                self.idle += gap
                self.longest = max(self.longest, gap)
            self.inflight += 1
            self.sent += 1
            try:
                return await send(key, body)
            finally:
                self.inflight -= 1
                self.last_done = time.perf_counter()
                if self.inflight == 0:
                    self.zero_since = self.last_done
        return tracked


class TrackedExecutor(LocalExecutor):
    """The local executor, its HTTP backends' sends counted by ``tracker``."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker

    def backend(self, spec: Any, store: Any) -> Any:
        b = super().backend(spec, store)
        b._sender.send = self.tracker.wrap(b._sender.send)  # a bench may reach inside
        return b


def one(url: str, n: int, conc: int, stream: bool) -> dict[str, float]:
    from prefsynth.output.writer import OutputWriter

    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(_config(Path(d), url, n, conc))
        tracker = Tracker()
        t0, c0 = time.perf_counter(), time.process_time()
        runner = Run(cfg, executor=TrackedExecutor(tracker), stream=stream)
        assert runner.streams == stream
        writer = OutputWriter(cfg)
        with _run_gc():  # as ``pipeline.run`` (the CLI) runs it
            result = asyncio.run(runner.execute(writer.add, keep=False))
        writer.close(result.summary, result.prompt_stats, runner.plan.curation)
        end = time.perf_counter()
        assert tracker.first is not None
        return {"requests": tracker.sent, "span": tracker.last_done - tracker.first,
                "idle": tracker.idle, "longest": tracker.longest,
                "tail": end - tracker.last_done, "wall": end - t0,
                "cpu": time.process_time() - c0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each mode (medians)")
    args = ap.parse_args()
    os.environ[KEY_ENV] = "sk-bench"
    with instant_server() as url:
        for stream in (False, True):  # imports, templates, the server's first connections
            one(url, 50, args.concurrency, stream)
        runs: dict[str, list[dict[str, float]]] = {"staged": [], "streamed": []}
        for i in range(args.repeat):  # alternating order: neither mode always goes first
            for mode in (["staged", "streamed"] if i % 2 == 0 else ["streamed", "staged"]):
                runs[mode].append(one(url, args.prompts, args.concurrency, mode == "streamed"))
        rows = {mode: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
                for mode, rs in runs.items()}
    print(f"{args.prompts} prompts, concurrency {args.concurrency}, medians of {args.repeat}, load "
          f"{os.getloadavg()[0]:.1f}")
    print(f"{'mode':<10}{'requests':>9}{'span s':>8}{'idle s':>8}{'longest':>8}{'tail s':>8}"
          f"{'wall s':>8}{'CPU s':>7}")
    for mode, r in rows.items():
        print(f"{mode:<10}{r['requests']:>9.0f}{r['span']:>8.2f}{r['idle']:>8.2f}"
              f"{r['longest']:>8.2f}{r['tail']:>8.2f}{r['wall']:>8.2f}{r['cpu']:>7.2f}")


if __name__ == "__main__":
    main()
