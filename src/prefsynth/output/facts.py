"""``run.json``: the facts of a run (or of a ``prefsynth mix`` mixture) as one pydantic type.

The writer builds ``RunFacts`` from the run's ``RunSummary`` and its config; the card, the
report and ``prefsynth mix`` read its fields, never literal keys. ``load_facts`` reads a
``run.json`` back, including one written before this type existed (``tests/data``), and turns
a hand-broken file (not JSON, a wrong type, a missing field) into one ``InputError`` line
naming the file. Unknown keys are ignored, so a newer prefsynth's output still loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefsynth.config import Config
from prefsynth.errors import InputError
from prefsynth.output.files import write_bytes
from prefsynth.records import RunSummary, StageCounts
from prefsynth.stages.pairs import means_from_sums
from prefsynth.stages.prompts import PromptStats


class _Facts(BaseModel):
    model_config = ConfigDict(extra="ignore")


class PromptCounts(_Facts):
    read: int
    duplicates: int = 0
    kept: int


class Named(_Facts):
    """Anything whose outputs are in the data: a pool model or a judge, and its licence."""

    name: str
    backend: str
    model: str
    license: str


class ModelFacts(Named):
    responses: int
    failed: int
    chosen: int
    rejected: int


class JudgeFacts(Named):
    aspects: list[str]
    mode: str
    permutations: int
    temperature: float
    judgments: int
    failed: dict[str, int]  # error kind -> judgments
    reasks: int


class PanelJudge(Named):
    mode: str


class Agreement(_Facts):
    aspect: str
    judges: list[str]
    n: int
    spearman: float | None
    kendall_tau_b: float | None


class Pairing(_Facts):
    """The pairing policy (``config.PairPolicy``), kept loose so old folders still load."""

    rejected: str
    aggregate: str
    min_margin: float
    weights: dict[str, float]
    constraints: str


class UsageFacts(_Facts):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class StageFacts(_Facts):
    total: int = 0
    cached: int = 0
    answered: int = 0
    failed: int = 0
    pending: int = 0
    usage: UsageFacts = Field(default_factory=UsageFacts)
    errors: dict[str, int] = Field(default_factory=dict)


class RunFacts(_Facts):
    """One run's ``run.json``. Field order is the file's key order."""

    name: str
    prompts: PromptCounts
    pairs: int
    pairs_num_bytes: int | None = None  # absent from the oldest folders
    dropped: dict[str, int]  # reason -> prompts, most frequent first
    complete: bool = True  # False: requests were pending (batch jobs) or failed
    failed_requests: int = 0  # failed in the run's last try: a rerun asks them again
    pending_requests: int = 0  # batch jobs still running
    models: list[ModelFacts]
    judge: JudgeFacts
    panel: list[PanelJudge] = Field(default_factory=list)
    agreement: list[Agreement] = Field(default_factory=list)
    position_means: dict[str, list[float | None]] = Field(default_factory=dict)
    pairing: Pairing
    responses_per_prompt: int | None
    on_policy: str | None = None
    seed: int | None
    #: the models and judges (by name) whose API takes no seed (``Backend.reproducible``):
    #: a rerun from scratch cannot replay their answers
    not_reproducible: list[str] = Field(default_factory=list)
    stages: dict[str, StageFacts] = Field(default_factory=dict)
    sources: dict[str, int] = Field(default_factory=dict)
    #: what prompt curation removed and why (``stages.curate``); None: no ``curate`` section
    curation: dict[str, Any] | None = None
    config: dict[str, Any]

    def judges_in_data(self) -> list[Named]:
        """Every judge whose ratings are in the data: the judge and its panel."""
        return [self.judge, *self.panel]

    def to_json(self) -> bytes:
        return orjson.dumps(self.model_dump(mode="json"), option=orjson.OPT_INDENT_2)

    def save(self, path: Path) -> None:
        write_bytes(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> RunFacts:
        """A ``run.json`` (a ``MixtureFacts`` when it has ``parts``), or ``InputError``."""
        return load_facts(Path(path), cls)


class Part(_Facts):
    """One input folder of a mixture: pairs in, cross-part duplicates removed, pairs kept."""

    name: str
    pairs: int
    duplicates: int
    kept: int
    prompts: int
    judge: str
    seed: int | None = None
    pairing: Pairing | None = None


class PartJudge(Named):
    part: str
    aspects: list[str]
    mode: str
    panel: list[str] = Field(default_factory=list)


class MixtureFacts(RunFacts):
    """A ``prefsynth mix`` output: a run's facts, plus where each part came from."""

    parts: list[Part]
    judges: list[PartJudge]
    judges_differ: bool

    def judges_in_data(self) -> list[Named]:
        return [*super().judges_in_data(), *self.judges]


def _problem(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
    return f"{where}: {first['msg']}{more}".replace("\n", " ")


def load_facts(path: Path, kind: type[RunFacts] = RunFacts) -> RunFacts:
    try:
        data = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"{path}: missing; not a complete prefsynth output folder") from None
    except OSError as e:
        raise InputError(f"{path}: unreadable ({e.strerror or e})") from None
    except orjson.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict) and "parts" in data and issubclass(MixtureFacts, kind):
        kind = MixtureFacts
    try:
        return kind.model_validate(data, strict=True)
    except ValidationError as e:
        raise InputError(f"{path}: not a prefsynth run.json: {_problem(e)}") from None


def _stage(c: StageCounts) -> StageFacts:
    # not dataclasses.asdict: it rebuilds a Counter from (key, count) tuples, counting them
    return StageFacts(total=c.total, cached=c.cached, answered=c.answered, failed=c.failed,
                      pending=c.pending, errors=dict(c.errors),
                      usage=UsageFacts(prompt_tokens=c.usage.prompt_tokens,
                                       completion_tokens=c.usage.completion_tokens))


def run_facts(cfg: Config, summary: RunSummary, prompts: PromptStats, *, pairs_num_bytes: int,
              agreement: list[dict[str, Any]] | None = None,
              curation: dict[str, Any] | None = None) -> RunFacts:
    """The facts of a finished run: counts from its summed ``RunSummary``, the rest from its
    config. ``agreement`` (judge panels only) needs per-rating data the summary cannot add."""
    # here, not at the top: the output side (``prefsynth mix``) never imports the backends
    from prefsynth.backends import backend_class

    judge = cfg.judge
    return RunFacts(
        name=cfg.name,
        prompts=PromptCounts(read=prompts.read, duplicates=prompts.duplicates, kept=prompts.kept),
        pairs=summary.pairs,
        pairs_num_bytes=pairs_num_bytes,
        dropped=summary.dropped_by_reason(),
        complete=not summary.pending and not any(c.failed for c in summary.stages.values()),
        failed_requests=sum(c.failed for c in summary.stages.values()),
        pending_requests=sum(c.pending for c in summary.stages.values()),
        models=[ModelFacts(name=m.name, backend=m.backend, model=m.model, license=m.license,
                           responses=summary.responses.get(m.name, 0),
                           failed=summary.failed.get(m.name, 0),
                           chosen=summary.chosen.get(m.name, 0),
                           rejected=summary.rejected.get(m.name, 0)) for m in cfg.models],
        judge=JudgeFacts(name=judge.name, backend=judge.backend, model=judge.model,
                         license=judge.license, aspects=list(judge.aspects), mode=judge.mode,
                         permutations=judge.permutations, temperature=judge.params.temperature,
                         judgments=summary.judgments, failed=dict(summary.judge_errors),
                         reasks=summary.reasks),
        panel=[PanelJudge(name=j.name, backend=j.backend, model=j.model, license=j.license,
                          mode=j.mode) for j in cfg.panel],
        agreement=[Agreement.model_validate(a) for a in agreement or []],
        position_means=means_from_sums(summary.position),
        pairing=Pairing.model_validate(cfg.pairs.model_dump()),
        responses_per_prompt=cfg.responses_per_prompt,
        on_policy=cfg.on_policy,
        seed=cfg.seed,
        not_reproducible=[m.name for m in [*cfg.models, *cfg.judges]
                          if not backend_class(m.backend).reproducible],
        stages={k: _stage(v) for k, v in summary.stages.items()},
        sources=dict(summary.sources),
        curation=curation,
        config=cfg.model_dump(mode="json"),
    )
