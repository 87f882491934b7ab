"""Prompt curation speed and memory: decontamination and near-dup on synthetic prompts.

N synthetic prompts (50-400 words, Zipf-distributed pseudo-words with some punctuation; 1%
carry a whole eval instance pasted in, 0.5% a third of one, 2% are near-copies of an
earlier prompt) against an eval suite of M synthetic instances (10-150 words). Runs on one
core (pinned where the OS allows, BLAS threads 1). Reports:

- the eval index: build time, bytes per eval n-gram (arrays; and with the vocabulary dict)
- decontamination prompts/s (tokenizing included), and near-dup prompts/s
- the plain-Python reference scan (``stages.curate.reference``) on the first K prompts: its
  speed and whether its matches equal the fast scan's (ids and ratios)
- rensa against datasketch for MinHash + LSH on a few thousand prompts, where both installed
- peak RSS of the process

    .venv/bin/python bench/curate.py                      # 200,000 prompts, 20,000 evals
    .venv/bin/python bench/curate.py --prompts 20000 --evals 2000   # quick
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from prefsynth.config import NearDupSpec  # noqa: E402
from prefsynth.records import Prompt  # noqa: E402
from prefsynth.stages.curate.decontaminate import build_index, scan  # noqa: E402
from prefsynth.stages.curate.evals import EvalSet  # noqa: E402
from prefsynth.stages.curate.near_dup import NearDup, shingles  # noqa: E402
from prefsynth.stages.curate.reference import ReferenceIndex  # noqa: E402
from prefsynth.stages.curate.tokenize import user_turns, words  # noqa: E402

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "shi", "po", "ve", "da", "gri", "son", "el",
             "an", "tor", "qu", "is", "ber", "fa", "zu"]


class Clock:
    """Wall and CPU seconds of a block. On a shared machine the CPU figure is the one to
    trust: it is what the block would take on a core of its own."""

    def __enter__(self) -> Clock:
        self.w, self.c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w
        self.cpu = time.process_time() - self.c

    def rate(self, n: int) -> str:
        return (f"{n / self.cpu:,.0f} prompts/s per CPU-second ({self.cpu:.1f} s CPU, "
                f"{self.wall:.1f} s wall)")


def _status(field: str) -> float:
    """A /proc/self/status figure in MB (Linux), or the lifetime peak where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    return _status("VmRSS")


def peak_mb() -> float:
    return _status("VmHWM")


def reset_peak() -> None:
    """Start a new peak from the current RSS (Linux: clear_refs 5), after a gc."""
    gc.collect()
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def vocabulary(rng: np.random.Generator, size: int) -> list[str]:
    out = []
    for i in range(size):
        k = 1 + int(rng.integers(1, 4))
        w = "".join(SYLLABLES[int(j)] for j in rng.integers(0, len(SYLLABLES), k)) + str(i % 7)
        out.append(w if rng.random() > 0.1 else w + rng.choice([",", ".", "?", ";"]))
    return out


class Text:
    """Zipf-distributed pseudo-word text, generated a block of word ids at a time."""

    def __init__(self, rng: np.random.Generator, vocab: list[str]) -> None:
        self.rng, self.vocab = rng, vocab
        p = 1.0 / np.arange(1, len(vocab) + 1) ** 1.05
        self.cdf = np.cumsum(p / p.sum())

    def many(self, lengths: np.ndarray, chunk: int = 5000) -> list[str]:
        v, out = self.vocab, []
        for s in range(0, len(lengths), chunk):
            part = lengths[s:s + chunk]
            ids = np.searchsorted(self.cdf, self.rng.random(int(part.sum()))).tolist()
            at = 0
            for n in part.tolist():
                out.append(" ".join([v[i] for i in ids[at:at + n]]))
                at += n
        return out


def make_data(n_prompts: int, n_evals: int, seed: int) -> tuple[list[Prompt], EvalSet, int]:
    rng = np.random.default_rng(seed)
    text = Text(rng, vocabulary(rng, 50_000))
    evals = text.many(rng.integers(10, 151, n_evals))
    bodies = text.many(rng.integers(50, 401, n_prompts))
    planted = 0
    for i in range(n_prompts):
        u = rng.random()
        if u < 0.01:  # a whole eval instance pasted in the middle
            words_ = bodies[i].split()
            cut = int(rng.integers(0, len(words_)))
            e = evals[int(rng.integers(0, n_evals))]
            bodies[i] = " ".join([*words_[:cut], e, *words_[cut:]])
            planted += 1
        elif u < 0.015:  # a third of one: kept
            e = evals[int(rng.integers(0, n_evals))].split()
            bodies[i] += " " + " ".join(e[: len(e) // 3])
        elif u < 0.035 and i > 0:  # a near-copy of an earlier prompt
            src = bodies[int(rng.integers(0, i))].split()
            src[int(rng.integers(0, len(src)))] = "changed"
            bodies[i] = " ".join(src) + "!"
    sources = ["flan", "wildchat", "code", "math"]
    prompts = [Prompt(id=f"p{i}", messages=[{"role": "user", "content": b}],
                      source=sources[i % 4]) for i, b in enumerate(bodies)]
    es = EvalSet("synthetic", "bench", "text", [f"e{i}" for i in range(n_evals)],
                 [[e] for e in evals])
    return prompts, es, planted


def decontaminate(idx, prompts: list[Prompt], batch: int = 2048) -> list:  # type: ignore[no-untyped-def]
    out = []
    for s in range(0, len(prompts), batch):
        out.extend(scan(idx, [[words(t) for t in user_turns(p)] for p in prompts[s:s + batch]]))
    return out


def near_dups(prompts: list[Prompt], batch: int = 2048) -> tuple[int, float, float]:
    """Removed count, CPU seconds signing (the parallel part) and admitting (the ordered
    LSH pass a cluster's driver would run)."""
    nd = NearDup(NearDupSpec())
    removed, signing, admitting = 0, 0.0, 0.0
    for s in range(0, len(prompts), batch):
        part = prompts[s:s + batch]
        t = time.process_time()
        toks = [[w for t in user_turns(p) for w in words(t)] for p in part]
        sigs = nd.sign(toks, [p.text for p in part])
        t2 = time.process_time()
        removed += sum(m is not None for m in nd.admit([p.id for p in part], sigs))
        signing += t2 - t
        admitting += time.process_time() - t2
    return removed, signing, admitting


def compare_minhash(prompts: list[Prompt]) -> None:
    try:
        import datasketch
    except ImportError:
        print("datasketch not installed: rensa/datasketch comparison skipped")
        return
    import rensa

    sets = [shingles(words(p.text), 5, p.text) for p in prompts]
    t = time.perf_counter()
    lsh = datasketch.MinHashLSH(threshold=0.8, num_perm=128)
    for i, s in enumerate(sets):
        m = datasketch.MinHash(num_perm=128)
        m.update_batch(s)
        if not lsh.query(m):
            lsh.insert(i, m)
    ds = len(sets) / (time.perf_counter() - t)
    t = time.perf_counter()
    rl = rensa.RMinHashLSH(0.8, 128, 16)
    for i, m in enumerate(rensa.RMinHash.from_token_sets(sets, 128, 1)):
        if not rl.query(m):
            rl.insert(i, m)
    rs = len(sets) / (time.perf_counter() - t)
    print(f"MinHash+LSH on {len(sets):,} prompts (shingles given): datasketch {ds:,.0f}/s, "
          f"rensa {rs:,.0f}/s ({rs / ds:.0f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=200_000)
    ap.add_argument("--evals", type=int, default=20_000)
    ap.add_argument("--reference", type=int, default=2_000, help="prompts for the reference")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pinned = False
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        pinned = True
    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, pinned to one core: {pinned}")
    t = time.perf_counter()
    prompts, es, planted = make_data(args.prompts, args.evals, args.seed)
    avg = sum(len(p.text.split()) for p in prompts[:5000]) / min(5000, len(prompts))
    print(f"data: {len(prompts):,} prompts (~{avg:.0f} words avg), {len(es.ids):,} eval "
          f"instances, {planted} planted copies; generated in {time.perf_counter() - t:.1f}s, "
          f"RSS {rss_mb():.0f} MB")

    reset_peak()
    base = rss_mb()
    with Clock() as c:
        idx = build_index([es], 8, 0.5)
    grams = sum(idx.ngrams.values())
    vocab_bytes = sys.getsizeof(idx.vocab) + sum(sys.getsizeof(k) for k in idx.vocab)
    gc.collect()
    held = (rss_mb() - base) * 2**20
    print(f"eval index: {grams:,} 8-grams, built in {c.cpu:.2f} s CPU; arrays "
          f"{idx.nbytes / grams:.1f} B per 8-gram, with the vocabulary ({len(idx.vocab):,} words) "
          f"{(idx.nbytes + vocab_bytes) / grams:.1f} B; RSS held {held / grams:.1f} B per "
          f"8-gram (build peak +{peak_mb() - base:.0f} MB)")
    del idx
    gc.collect()
    tracemalloc.start()
    idx = build_index([es], 8, 0.5)
    gc.collect()
    live, top = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"eval index, by tracemalloc: {live / grams:.1f} B per 8-gram live after the build "
          f"(the RSS above also holds freed build temporaries), {top / grams:.1f} B at the "
          "build's peak")
    reset_peak()
    base = rss_mb()

    with Clock() as c:
        found = decontaminate(idx, prompts)
    hits = sum(m is not None for m in found)
    print(f"decontamination: {c.rate(len(prompts))}; {hits} removed ({planted} planted); "
          f"peak +{peak_mb() - base:.0f} MB over the loaded prompts and index")
    reset_peak()
    base = rss_mb()

    with Clock() as c:
        removed, signing, admitting = near_dups(prompts)
    print(f"near-dup (rensa): {c.rate(len(prompts))}; {removed} removed; peak "
          f"+{peak_mb() - base:.0f} MB (LSH index and signatures of the kept prompts); of the "
          f"CPU, tokenize + sign {signing:.1f} s, the ordered LSH pass "
          f"{admitting:.1f} s ({len(prompts) / admitting:,.0f} prompts/s)")
    reset_peak()
    base = rss_mb()

    k = min(args.reference, len(prompts))
    sub = prompts[:k]
    with Clock() as rb:
        ref = ReferenceIndex([es], 8, 0.5)
    rbuild = rb.cpu
    gc.collect()
    print(f"reference index (dict of word tuples): {(rss_mb() - base) * 2**20 / grams:.0f} B "
          f"per 8-gram")
    with Clock() as slow_c:
        slow = [ref.match(user_turns(p)) for p in sub]
    with Clock() as fast_c:
        fast = decontaminate(idx, sub)
    print(f"reference (plain Python, index built in {rbuild:.1f} s CPU) on {k:,} prompts: "
          f"{slow_c.rate(k)}; fast: {fast_c.rate(k)}; fast / reference "
          f"{slow_c.cpu / fast_c.cpu:.1f}x; equal results: {slow == fast} "
          f"({sum(m is not None for m in slow)} matches)")
    compare_minhash(prompts[:5000])
    print(f"peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MB")


if __name__ == "__main__":
    main()
