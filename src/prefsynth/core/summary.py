"""``summarize``: the counts of one shard's records, as the additive ``RunSummary``.

Pure: the pipeline calls it once per shard with the stage counts the executor reported, and
``prefsynth status`` with none (it asks nothing); a run's summary is the sum of its shards'
(``RunSummary.add``). Both count where each planned request stands the same way
(``request_counts``), so ``status`` shows what a run would report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from prefsynth.config import Config
from prefsynth.records import (
    Generation,
    Judgment,
    RequestState,
    RunSummary,
    ShardResult,
    StageCounts,
)
from prefsynth.stages.pairs import position_sums


def _kind(error: str | None) -> str:
    """A failure's kind, for counting: the text before its first colon."""
    return (error or "").split(":")[0]


def _count(counts: StageCounts, state: RequestState | None, error: str | None) -> None:
    counts.total += 1
    if state is RequestState.PENDING:
        counts.pending += 1
    elif state is RequestState.FAILED or error:  # a judgment may be answered yet unparseable
        counts.failed += 1
        counts.errors[_kind(error)] += 1
    else:
        counts.answered += 1


def request_counts(generations: Sequence[Generation], judgments: Sequence[Judgment],
                   waiting: int, cfg: Config) -> dict[tuple[str, str], StageCounts]:
    """(stage, model) -> answered / failed (by kind) / pending: generations per pool model,
    final judgments (after re-asks) per judge. ``waiting`` prompts still lack a generation,
    so each judge has their judgments to make too: pending. Every judge gets a line."""
    out: dict[tuple[str, str], StageCounts] = {}
    for g in generations:
        _count(out.setdefault(("generate", g.model), StageCounts()), g.state, g.error)
    per_prompt = len(cfg.judge.aspects) * cfg.judge.permutations
    for spec in cfg.judges:
        counts = out.setdefault(("judge", spec.name), StageCounts())
        counts.total += waiting * per_prompt
        counts.pending += waiting * per_prompt
    for j in judgments:
        _count(out[("judge", j.judge)], j.state, j.error)
    return out


def summarize(shard: ShardResult, cfg: Config, stages: Mapping[str, StageCounts] | None = None,
              reasks: int = 0, pending: bool = False) -> RunSummary:
    s = RunSummary(stages=dict(stages or {}), reasks=reasks)
    s.dropped.update(d.reason for d in shard.dropped)
    s.pending = pending or any(d.reason.endswith("_pending") for d in shard.dropped)
    waiting = s.dropped["generation_pending"]
    s.by_model = request_counts(shard.generations, shard.judgments, waiting, cfg)
    s.responses.update(g.model for g in shard.generations if g.text is not None)
    s.failed.update(g.model for g in shard.generations if g.text is None)
    s.chosen.update(p.chosen_model for p in shard.pairs)
    s.rejected.update(p.rejected_model for p in shard.pairs)
    s.sources.update(p.source for p in shard.pairs)
    s.pairs = len(shard.pairs)
    s.judgments = len(shard.judgments)
    s.judge_errors.update(_kind(j.error) for j in shard.judgments if j.error)
    s.position = {a: {pos: [total, n] for pos, (total, n) in by.items()}
                  for a, by in position_sums(shard.judgments).items()}
    return s
