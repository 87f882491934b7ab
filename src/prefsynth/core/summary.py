"""``summarize``: the counts of one shard's records, as the additive ``RunSummary``.

Pure: the pipeline calls it once per shard with the stage counts the executor reported, and
the run's summary is the sum of its shards' (``RunSummary.add``).
"""

from __future__ import annotations

from collections.abc import Mapping

from prefsynth.records import RunSummary, ShardResult, StageCounts
from prefsynth.stages.pairs import position_sums


def summarize(shard: ShardResult, stages: Mapping[str, StageCounts], reasks: int = 0,
              pending: bool = False) -> RunSummary:
    s = RunSummary(stages=dict(stages), reasks=reasks)
    s.dropped.update(d.reason for d in shard.dropped)
    s.pending = pending or any(d.reason.endswith("_pending") for d in shard.dropped)
    s.responses.update(g.model for g in shard.generations if g.text is not None)
    s.failed.update(g.model for g in shard.generations if g.text is None)
    s.chosen.update(p.chosen_model for p in shard.pairs)
    s.rejected.update(p.rejected_model for p in shard.pairs)
    s.sources.update(p.source for p in shard.pairs)
    s.pairs = len(shard.pairs)
    s.judgments = len(shard.judgments)
    s.judge_errors.update((j.error or "").split(":")[0] for j in shard.judgments if j.error)
    s.position = {a: {pos: [total, n] for pos, (total, n) in by.items()}
                  for a, by in position_sums(shard.judgments).items()}
    return s
