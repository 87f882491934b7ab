"""The real ``prefsynth run`` CLI as a subprocess against ``bench/instant_server.py``.

Measures what a user waits for: the time from starting the process to the server's first
request (start-up: imports, config, plan, clients; wall and the process's CPU by then), the whole run's wall time, the CLI's CPU
time (user + system, from ``getrusage(RUSAGE_CHILDREN)``) and the HTTP requests it made,
counted at the server. ``bench/overhead.py`` uses ``run_cli`` for its ``prefsynth CLI`` row.

The config: two pool models and a one-aspect judge, all ``backend: openai`` on the loopback
server (three OpenAI backends, as a typical run has). The server's fixed answer is no rating,
so the judge's requests are re-asked (``max_reasks``) and every one is counted at the server.

Bytecode: with ``PYTHONPYCACHEPREFIX`` set, the CLI runs with ``PYTHONDONTWRITEBYTECODE``
unset (it would stop the cache from ever being written, and every start would include
compiling) and ``main`` makes one unmeasured warm-up run first, so the figures are those of an
installed package, whose bytecode pip compiles.

Start-up alone, median of ``--repeat`` fresh processes (20 prompts each)::

    PYTHONPYCACHEPREFIX=/tmp/pyc .venv/bin/python bench/cli_run.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
KEY_ENV = "PREFSYNTH_BENCH_KEY"


def _count(url: str) -> int:
    with urllib.request.urlopen(f"{url}/count", timeout=5) as r:
        return int(r.read())


def _config(root: Path, url: str, n: int, conc: int) -> Path:
    with (root / "prompts.jsonl").open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Question {i}: why is the sky blue?"}) + "\n")
    endpoint = {"backend": "openai", "base_url": f"{url}/v1", "api_key_env": KEY_ENV,
                "max_concurrency": conc}
    cfg = {
        "name": "bench-cli", "prompts": {"path": str(root / "prompts.jsonl")},
        "models": [{"name": f"m{i}", "model": "bench-model", **endpoint} for i in range(2)],
        "responses_per_prompt": 2,
        "judge": {"name": "j", "model": "bench-model", "aspects": ["helpfulness"], **endpoint},
        "output": str(root / "out"),
    }
    path = root / "config.json"  # JSON is YAML
    path.write_text(json.dumps(cfg))
    return path


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_cli(url: str, n: int, conc: int = 64, cpu: int | None = None) -> dict[str, Any]:
    """One ``prefsynth run`` of ``n`` prompts in a fresh process (pinned to ``cpu``)."""
    with tempfile.TemporaryDirectory() as d:
        config = _config(Path(d), url, n, conc)
        env = dict(os.environ, **{KEY_ENV: "sk-bench"})
        src = str(HERE.parent / "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if env.get("PYTHONPYCACHEPREFIX"):  # see the module docstring: the cache is written
            env.pop("PYTHONDONTWRITEBYTECODE", None)
        cmd = [sys.executable, "-m", "prefsynth.cli", "run", str(config)]
        if cpu is not None:
            cmd = ["taskset", "-c", str(cpu), *cmd]
        before, usage = _count(url), resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = first_cpu = None
        while proc.poll() is None:
            if first is None and _count(url) > before:
                first = time.perf_counter() - t0
                with contextlib.suppress(OSError, IndexError):  # not Linux, or it ended
                    first_cpu = _proc_cpu(proc.pid)
            time.sleep(0.005 if first is None else 0.05)
        wall = time.perf_counter() - t0
        out, err = proc.communicate()
        if proc.returncode != 0:
            sys.stderr.write(out.decode() + err.decode())
            raise SystemExit(f"prefsynth run failed (exit {proc.returncode})")
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_s = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
        return {"prompts": n, "requests": _count(url) - before, "start_s": first,
                "start_cpu_s": first_cpu,
                "wall_s": wall, "cpu_s": cpu_s, "rss_mb": after.ru_maxrss / 1024}


@contextlib.contextmanager
def instant_server() -> Iterator[str]:
    """``instant_server.py`` in its own process, for the block: its root URL."""
    server = subprocess.Popen([sys.executable, str(HERE / "instant_server.py"), "--port", "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        server.stdout.readline()  # AFFINITY ...
        yield f"http://127.0.0.1:{int(server.stdout.readline().split()[1])}"
    finally:
        server.terminate()
        server.wait(timeout=10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    with instant_server() as url:
        run_cli(url, args.prompts, args.concurrency)  # warm-up: fills the bytecode cache
        rows = [run_cli(url, args.prompts, args.concurrency) for _ in range(args.repeat)]
    for r in rows:
        print(json.dumps(r))
    print(f"median over {len(rows)}: start to first request "
          f"{statistics.median(r['start_s'] for r in rows):.2f} s (CPU "
          f"{statistics.median(r['start_cpu_s'] or 0 for r in rows):.2f} s), whole run "
          f"{statistics.median(r['wall_s'] for r in rows):.2f} s, CPU "
          f"{statistics.median(r['cpu_s'] for r in rows):.2f} s; load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
