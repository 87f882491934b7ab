"""Memory held by the judge stage's requests: lazy (what prefsynth does) vs eager rendering.

A judge request's messages are the rendered UltraFeedback rubric plus every response (several
KB). prefsynth keeps only the key and a re-render closure per request and renders just before
sending. This prints tracemalloc's retained bytes per request for both, measured in one run:

    .venv/bin/python bench/judge_memory.py [--prompts 2000] [--k 4]
"""

from __future__ import annotations

import argparse
import tracemalloc

from prefsynth.config import JudgeSpec
from prefsynth.records import Generation, Prompt
from prefsynth.stages.judge.comparisons import comparisons
from prefsynth.stages.judge.judgments import judge_requests


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=2000)
    ap.add_argument("--k", type=int, default=4)
    args = ap.parse_args()
    models = [f"model-{i}" for i in range(args.k)]
    prompts = [Prompt(id=f"p{i}", messages=[{"role": "user", "content": f"Question {i}: " + "why " * 40}])
               for i in range(args.prompts)]
    answer = "A typical answer of a few hundred words. " * 30  # ~1.2 KB per response
    gens = [Generation(p.id, m, f"{m}: {answer}") for p in prompts for m in models]
    comps, _ = comparisons(prompts, gens, {p.id: models for p in prompts}, seed=1)
    spec = JudgeSpec(name="judge", backend="openai", model="gpt-4o")
    by_id = {p.id: p for p in prompts}

    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    lazy = judge_requests(comps, by_id, spec, seed=1, attempt=0)
    lazy_bytes = tracemalloc.get_traced_memory()[0] - base
    for r in lazy:
        r.materialize()
    eager_bytes = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    n = len(lazy)
    print(f"{n} judge requests ({args.prompts} prompts x {len(spec.aspects)} aspects, "
          f"{args.k} responses of ~{len(answer)} chars each)")
    print(f"eager (messages held):      {eager_bytes / n:>9,.0f} B per request")
    print(f"lazy (key + re-render):     {lazy_bytes / n:>9,.0f} B per request")
    print(f"ratio lazy / eager:         {lazy_bytes / eager_bytes:>9.2f}")
    print(f"at 1M prompts: eager {eager_bytes / n * 4e6 / 2**30:,.1f} GiB, "
          f"lazy {lazy_bytes / n * 4e6 / 2**30:,.1f} GiB of judge requests")


if __name__ == "__main__":
    main()
