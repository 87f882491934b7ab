"""Peak memory of a whole pipeline run against the prompt count, unsharded vs sharded.

Each run is a fresh subprocess running ``prefsynth.core.pipeline.run(cfg, keep=False)`` (what the
CLI does) on N synthetic prompts with the deterministic fake backend (no model cost, so what is
measured is prefsynth's own memory: records, requests, store, export). Prints peak RSS
(``ru_maxrss``) per run and the growth per extra prompt, measured in the same run:

    .venv/bin/python bench/pipeline_memory.py [--small 2000] [--large 8000] [--shard 500]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(n: int, shard: int | None, folder: str) -> None:
    from prefsynth.config import parse_config
    from prefsynth.core.pipeline import run
    from prefsynth.testing import FakeBackend  # noqa: F401  (registers `backend: fake`)

    root = Path(folder)
    answer = "why " * 60
    with (root / "prompts.jsonl").open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"Question {i}: explain {answer}"}) + "\n")
    cfg = {
        "name": "mem", "prompts": {"path": str(root / "prompts.jsonl")},
        "models": [{"name": f"m{i}", "backend": "fake", "model": f"f{i}"} for i in range(4)],
        "responses_per_prompt": 4,
        "judge": {"name": "j", "backend": "fake", "model": "fj"},
        "output": str(root / "out"), "shard_size": shard,
    }
    t0 = time.perf_counter()
    result = run(parse_config(cfg), keep=False)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n": n, "shard": shard, "rss_mib": rss, "pairs": result.summary.pairs,
                      "seconds": time.perf_counter() - t0}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--large", type=int, default=8000)
    ap.add_argument("--shard", type=int, default=500)
    ap.add_argument("--child", nargs=3)
    args = ap.parse_args()
    if args.child:
        n, shard, folder = args.child
        child(int(n), None if shard == "none" else int(shard), folder)
        return
    rows = []
    for shard in ("none", str(args.shard)):
        for n in (args.small, args.large):
            with tempfile.TemporaryDirectory() as d:
                out = subprocess.run([sys.executable, __file__, "--child", str(n), shard, d],
                                     capture_output=True, text=True, check=True).stdout
                rows.append(json.loads(out.strip().splitlines()[-1]))
    print(f"{'shard_size':>10} {'prompts':>8} {'pairs':>7} {'peak RSS MiB':>13} {'seconds':>8}")
    for r in rows:
        print(f"{r['shard'] or 'all'!s:>10} {r['n']:>8} {r['pairs']:>7} "
              f"{r['rss_mib']:>13.1f} {r['seconds']:>8.1f}")
    dn = args.large - args.small
    for shard in (None, args.shard):
        small, large = (r for r in rows if r["shard"] == shard)
        print(f"shard_size={shard or 'all'}: {(large['rss_mib'] - small['rss_mib']) * 2**20 / dn:,.0f}"
              f" B of peak memory per extra prompt (4 responses + 4 judge requests each)")


if __name__ == "__main__":
    main()
