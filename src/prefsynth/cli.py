"""The ``prefsynth`` command. Renders progress and maps errors to one-line messages.

Library code logs and raises ``PrefsynthError``; only this module prints. Exit codes:

* 0 done: every request answered;
* 1–6 a ``PrefsynthError`` subclass (see ``errors.py``): 5 a backend that cannot work at all
  (a missing key, HTTP 401/403), 6 a store that cannot be used (another run holds it);
* 75 finished with requests still pending (Batch API jobs in flight: rerun later);
* 76 finished with failed requests (after their retries): the output is written and marked
  partial (``run.json`` ``complete: false``, ``failed_requests``); rerun to retry them;
* 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from prefsynth.errors import PrefsynthError
from prefsynth.records import Usage

EXIT_PENDING = 75
EXIT_FAILED = 76


class BarProgress:
    """One tqdm bar per stage, kept across shards: done/total, failures, tokens, the run's
    spend so far (where priced) and ETA. ``close`` when the run ends."""

    def __init__(self, cfg: Any = None) -> None:
        self.cfg = cfg
        self.bars: dict[str, Any] = {}
        self.failed: dict[str, int] = {}
        self.tokens: dict[str, Usage] = {}
        self.stage: str | None = None
        self.spend = 0.0

    def start(self, stage: str, total: int, done: int) -> None:
        from tqdm import tqdm

        self.stage = stage
        bar = self.bars.get(stage)
        if bar is None:  # first shard: a new bar
            self.bars[stage] = tqdm(total=total, initial=done, desc=f"{stage:<9}", unit="req",
                                    dynamic_ncols=True, file=sys.stderr, smoothing=0.1,
                                    position=len(self.bars))
            self.failed[stage] = 0
            self.tokens[stage] = Usage()
        else:  # a later shard: the same bar grows
            bar.total += total
            bar.update(done)

    def advance(self, ok: int, failed: int, usage: Usage, model: str) -> None:
        if self.stage is None:
            return
        stage = self.stage
        self.failed[stage] += failed
        tokens = self.tokens[stage]
        tokens.prompt_tokens += usage.prompt_tokens
        tokens.completion_tokens += usage.completion_tokens
        if self.cfg is not None and self.cfg.prices:
            from prefsynth.tools.estimate import cost_of

            self.spend += cost_of(model, usage.prompt_tokens, usage.completion_tokens,
                                  self.cfg) or 0.0
        spend = f" spent=${self.spend:,.2f}" if self.spend else ""
        bar = self.bars[stage]
        bar.set_postfix_str(f"failed={self.failed[stage]} tok_in={tokens.prompt_tokens} "
                            f"tok_out={tokens.completion_tokens}{spend}", refresh=False)
        bar.update(ok + failed)

    def finish(self) -> None:
        if self.stage is not None:
            self.bars[self.stage].refresh()

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    o: dict[str, Any] = {}
    if getattr(args, "prompts", None):
        o["prompts.path"] = args.prompts
        o["prompts.dataset"] = None
    if getattr(args, "output", None):
        o["output"] = args.output
    if getattr(args, "shard_size", None):
        o["shard_size"] = args.shard_size
    if getattr(args, "executor", None):
        o["executor"] = args.executor
    if getattr(args, "ray_address", None):  # a cluster to run on: implies --executor ray
        o["executor"] = "ray"
        o["ray.address"] = args.ray_address
    return o


def cmd_run(args: argparse.Namespace) -> int:
    from prefsynth.config import load_config
    from prefsynth.core.pipeline import run

    cfg = load_config(args.config, _overrides(args))
    t0 = time.monotonic()
    progress = BarProgress(cfg)
    try:
        result = run(cfg, limit=args.limit, wait=args.wait, progress=progress, keep=False,
                     force=args.force)
    finally:
        progress.close()
    dt = time.monotonic() - t0
    s = result.summary
    print(f"prompts: {result.prompt_stats.kept} ({result.prompt_stats.duplicates} duplicates removed)")
    for stage, c in s.stages.items():
        print(f"{stage}: {c.total} requests, {c.cached} from store, {c.answered} answered, "
              f"{c.failed} failed, {c.pending} pending; tokens in/out "
              f"{c.usage.prompt_tokens}/{c.usage.completion_tokens}")
    if s.reasks:
        print(f"judge re-asks: {s.reasks}")
    for aspect, means in (result.facts.position_means if result.facts else {}).items():
        print(f"mean rating by position, {aspect}: "
              + " ".join("-" if m is None else f"{m:.2f}" for m in means))
    print(f"pairs: {s.pairs}; dropped: "
          + (", ".join(f"{k}={v}" for k, v in s.dropped_by_reason().items()) or "none"))
    print(f"output: {cfg.output_dir}/ (pairs/, annotations/, judgments/, README.md, run.json) "
          f"in {dt:.1f}s")
    failed = sum(c.failed for c in s.stages.values())
    if failed:
        print(f"partial: rerun to retry {failed} failed requests")
    if s.pending:
        print("some requests are still pending (batch jobs in flight): rerun to collect them")
        return EXIT_PENDING
    return EXIT_FAILED if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    from prefsynth.config import load_config
    from prefsynth.tools.status import compute_status

    cfg = load_config(args.config, _overrides(args))
    st = compute_status(cfg, args.limit)
    p = st.prompts
    print(f"store: {cfg.store_path}")
    print(f"prompts: {p.kept} ({p.duplicates} duplicates removed)")
    print(f"{'stage':<9} {'model':<28} {'done':>7} {'failed':>7} {'pending':>8}")
    for stage, model, c in st.lines():
        err = ("  " + ", ".join(f"{k}: {v}" for k, v in c.errors.items())) if c.errors else ""
        print(f"{stage:<9} {model:<28} {c.answered:>7} {c.failed:>7} {c.pending:>8}{err}")
    if st.summary.reasks:
        print(f"judge re-asks answered: {st.summary.reasks}")
    for reason, n in st.summary.dropped.items():
        print(f"prompts not judged yet ({reason}): {n}")
    for b in st.batches:
        counts = ", ".join(f"{k} {v}" for k, v in b["request_counts"].items())
        print(f"batch {b['batch_id']} ({b['model']}): {b['api_status']}, {b['requests']} requests"
              + (f" ({counts})" if counts else "") + (f", {b['failed']} to resubmit"
                                                      if b["failed"] else ""))
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from prefsynth.config import load_config
    from prefsynth.tools.estimate import estimate, format_estimate

    cfg = load_config(args.config, _overrides(args))
    print(format_estimate(estimate(cfg, args.limit, output_fraction=args.output_fraction,
                                   sample=args.sample)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from prefsynth.tools.report import write_report

    _path, text = write_report(args.outdir, sample=args.sample, seed=args.seed)
    print(text)
    return 0


def cmd_mix(args: argparse.Namespace) -> int:
    from prefsynth.output.mixture import merge_outputs

    names = args.names.split(",") if args.names else None
    facts = merge_outputs(args.inputs, args.output, names=names, name=args.name,
                          force=args.force)
    for part in facts.parts:
        print(f"{part.name}: {part.kept} pairs kept of {part.pairs} "
              f"({part.duplicates} duplicate prompts removed)")
    print(f"mixture: {facts.pairs} pairs -> {args.output}/")
    return 0


def cmd_curate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from prefsynth.config import load_config
    from prefsynth.errors import ConfigError
    from prefsynth.output.curation import write_curation
    from prefsynth.stages.curate import curate_prompts
    from prefsynth.stages.prompts import load_prompts

    over: dict[str, Any] = {"prompts.path": args.prompts, "prompts.dataset": None} \
        if args.prompts else {}
    cfg = load_config(args.config, over)
    if cfg.curate is None:
        raise ConfigError(f"{args.config}: curate: missing (add a curate section to curate)")
    t0 = time.monotonic()
    prompts, pstats = load_prompts(cfg.prompts, args.limit)
    result = curate_prompts(prompts, cfg.curate, Path.cwd(), exact_dup=pstats.duplicates)
    paths = write_curation(result, args.output)
    st = result.stats
    print(f"prompts: {pstats.read} read, {pstats.duplicates} exact duplicates removed")
    for name, n in st.eval_overlap.items():
        print(f"eval overlap with {name}: {n} removed")
    if cfg.curate.near_dup is not None:
        print(f"near duplicates: {st.near_dup} removed")
    if cfg.curate.sample is not None:
        print(f"sampling: {st.sampled_out} left out")
    print(f"kept: {st.kept} -> {paths[0]} (removal table {paths[1].name}, facts "
          f"{paths[2].name}, card section {paths[3].name}) in {time.monotonic() - t0:.1f}s")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from prefsynth.output.hub import push

    url = push(args.outdir, args.repo_id, private=args.private, token_env=args.token_env)
    print(f"pushed: {url}")
    return 0


def _positive_int(text: str) -> int:
    """``--limit 0`` or ``--shard-size 0`` is a mistake, refused like a negative value."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _count(text: str) -> int:
    """A count that may be zero (``report --sample 0`` shows no pairs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors as one ``prefsynth: error:`` line with exit 2, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"prefsynth: error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="prefsynth", description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run the pipeline (resumes from the store)")
    r.add_argument("config")
    r.add_argument("--prompts", help="override prompts.path")
    r.add_argument("--output", help="override output")
    r.add_argument("--limit", type=_positive_int, help="use only the first N prompts")
    r.add_argument("--wait", action="store_true", help="wait for Batch API jobs to finish")
    r.add_argument("--shard-size", type=_positive_int,
                   help="prompts per shard (bounds memory; overrides shard_size)")
    r.add_argument("--force", action="store_true",
                   help="write into a non-empty folder that is not a prefsynth output")
    r.add_argument("--executor", choices=("local", "ray"),
                   help="where requests run (overrides executor; ray needs prefsynth[ray])")
    r.add_argument("--ray-address", metavar="ADDR",
                   help="the Ray cluster to run on, HOST:PORT or auto (implies --executor ray)")
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("status", help="per stage: done / failed / pending")
    s.add_argument("config")
    s.add_argument("--prompts")
    s.add_argument("--output")
    s.add_argument("--limit", type=_positive_int)
    s.set_defaults(func=cmd_status)
    e = sub.add_parser("estimate", help="requests, tokens and cost before a run")
    e.add_argument("config")
    e.add_argument("--prompts")
    e.add_argument("--limit", type=_positive_int)
    e.add_argument("--output-fraction", type=_fraction, default=0.5,
                   help="expected output tokens as a fraction of max_tokens (default 0.5)")
    e.add_argument("--sample", type=_positive_int, default=2000,
                   help="count tokens on at most this many prompts and scale up")
    e.set_defaults(func=cmd_estimate)
    rp = sub.add_parser("report", help="write OUTDIR/report.html and print a summary")
    rp.add_argument("outdir")
    rp.add_argument("--sample", type=_count, default=8, help="pairs shown side by side")
    rp.add_argument("--seed", type=int, default=0)
    rp.set_defaults(func=cmd_report)
    mx = sub.add_parser("mix", help="merge several outputs into one mixture (dedup by prompt)")
    mx.add_argument("inputs", nargs="+")
    mx.add_argument("--output", required=True)
    mx.add_argument("--names", help="comma-separated part names (default: each run's name)")
    mx.add_argument("--name", help="the mixture's name on its card")
    mx.add_argument("--force", action="store_true",
                    help="write into a non-empty folder that is not a prefsynth output")
    mx.set_defaults(func=cmd_mix)
    cu = sub.add_parser("curate", help="decontaminate, deduplicate and sample the prompts "
                        "(no model call): OUTPUT/prompts.jsonl, removed.jsonl, curation.json")
    cu.add_argument("config")
    cu.add_argument("--output", required=True, help="folder for the curated prompts")
    cu.add_argument("--prompts", help="override prompts.path")
    cu.add_argument("--limit", type=int, help="use only the first N prompts")
    cu.set_defaults(func=cmd_curate)
    pu = sub.add_parser("push", help="upload data, card and report to the Hugging Face Hub")
    pu.add_argument("outdir")
    pu.add_argument("repo_id")
    pu.add_argument("--private", action="store_true")
    pu.add_argument("--token-env", default="HF_TOKEN", help="variable holding the token")
    pu.set_defaults(func=cmd_push)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except PrefsynthError as e:
        print(f"prefsynth: error: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `prefsynth estimate … | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("prefsynth: interrupted; answered requests are saved, rerun to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
