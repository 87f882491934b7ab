"""``prefsynth estimate``: requests, tokens and cost per stage and model, before a run.

A Tulu-3-sized run is millions of requests and real money, so each number says what it is:

* **Requests are exact**: generation from the run's own plan (``prefsynth.core.plan``: the
  real prompts, assignment and seed); judge = comparisons × aspects × permutations, assuming
  every generation succeeds. Re-asks of unparseable judge answers are not included, and the report says so.
* **Input tokens use the model's own tokenizer when one is available offline** (GGUF,
  tiktoken with a cached encoding, a cached Hugging Face tokenizer: ``prefsynth.tools.token_count``),
  else ``≈ chars/4``, labelled as such.
* **Output tokens are expected, not known**: ``output_fraction`` × ``max_tokens`` (0.5, or
  ``expected_output_tokens`` per model); ``max_tokens`` is the upper bound.
* **The judge reads responses that do not exist yet.** Its messages are rendered with the real
  templates (reference answers included), so the rubric is counted exactly; each response is
  added at its model's expected output length as a number of tokens, not as filler text whose
  count would depend on the filler.
* Above ``sample`` prompts, tokens are counted on a seeded sample and scaled.

Cost comes from ``cfg.prices`` (keyed by a model's ``name`` or ``model``); ``batch_discount``
(the fraction taken off: 0.5 = half price) applies to ``openai-batch``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from prefsynth.backends import backend_class
from prefsynth.config import Config, ModelSpec, Price
from prefsynth.core.plan import Plan
from prefsynth.records import Prompt
from prefsynth.seeding import rng_for
from prefsynth.stages.judge.rubrics import render_judge_messages
from prefsynth.tools.token_count import APPROX, CharCounter, TokenCounter, token_counter

DEFAULT_OUTPUT_FRACTION = 0.5
DEFAULT_SAMPLE = 2000


# --- cost ----------------------------------------------------------------------------------

def price_of(spec: ModelSpec, cfg: Config) -> Price | None:
    """A model's price: ``prices`` keyed by its config ``name``, else by its ``model`` id."""
    price = cfg.prices.get(spec.name)
    return price if price is not None else cfg.prices.get(spec.model)


def cost(price: Price, prompt_tokens: int, completion_tokens: int, batch: bool) -> float:
    """Dollars for a token count; ``batch`` takes ``price.batch_discount`` off."""
    usd = (prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok) / 1e6
    return usd * (1.0 - price.batch_discount) if batch else usd


def _spec_named(cfg: Config, name: str) -> ModelSpec | None:
    specs: list[ModelSpec] = [*cfg.models, cfg.judge]
    return next((s for s in specs if s.name == name), None) or next(
        (s for s in specs if s.model == name), None)


def cost_of(model_name: str, prompt_tokens: int, completion_tokens: int,
            cfg: Config) -> float | None:
    """Spend for tokens used by one model (a config ``name`` or ``model`` id), ``None`` when
    it has no price. For the progress line: cost so far from the usage reported so far."""
    spec = _spec_named(cfg, model_name)
    price = price_of(spec, cfg) if spec is not None else cfg.prices.get(model_name)
    if price is None:
        return None
    batch = spec is not None and backend_class(spec.backend).batch_pricing
    return cost(price, prompt_tokens, completion_tokens, batch)


# --- the estimate --------------------------------------------------------------------------

@dataclass(slots=True)
class StageEstimate:
    """One model's share of one stage."""

    stage: str  # "generate" or "judge"
    model: str  # the config name
    backend: str
    requests: int
    input_tokens: int
    output_tokens: int  # expected
    max_output_tokens: int  # upper bound: every answer at max_tokens
    tokens_by: str
    batch_discount: float = 0.0  # the Batch API discount applied, if any
    cost: float | None = None  # expected; None: no price
    max_cost: float | None = None
    why_approx: str = ""


@dataclass(slots=True)
class Estimate:
    name: str
    prompts: int
    duplicates: int
    counted_prompts: int  # prompts whose tokens were counted (fewer when sampled)
    responses_per_prompt: int
    on_policy: str | None
    output_fraction: float
    max_reasks: int
    aspects: list[str]
    permutations: int
    judges: int  # the judge plus its panel: each judges every comparison
    stages: list[StageEstimate] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return sum(s.requests for s in self.stages)

    @property
    def cost(self) -> float | None:
        """Expected cost of the priced stages; ``None`` when no stage has a price."""
        known = [s.cost for s in self.stages if s.cost is not None]
        return sum(known) if known else None

    @property
    def max_cost(self) -> float | None:
        known = [s.max_cost for s in self.stages if s.max_cost is not None]
        return sum(known) if known else None

    @property
    def unpriced(self) -> list[str]:
        return [s.model for s in self.stages if s.cost is None]


def _stage(stage: str, spec: ModelSpec, cfg: Config, requests: int, tokens_in: int,
           out_each: int, counter: TokenCounter) -> StageEstimate:
    out, out_max = requests * out_each, requests * spec.params.max_tokens
    price = price_of(spec, cfg)
    batch = backend_class(spec.backend).batch_pricing
    est = StageEstimate(stage, spec.name, spec.backend, requests, tokens_in, out, out_max,
                        counter.label,
                        why_approx=counter.why if isinstance(counter, CharCounter) else "")
    if price is not None:
        est.batch_discount = price.batch_discount if batch else 0.0
        est.cost = cost(price, tokens_in, out, batch)
        est.max_cost = cost(price, tokens_in, out_max, batch)
    return est


def estimate(cfg: Config, limit: int | None = None, *,
             output_fraction: float = DEFAULT_OUTPUT_FRACTION,
             expected_output_tokens: Mapping[str, int] | None = None,
             sample: int = DEFAULT_SAMPLE) -> Estimate:
    """Requests, tokens and cost of running ``cfg`` (on at most ``limit`` prompts).

    ``expected_output_tokens`` maps a model's config name to its expected answer length,
    overriding ``output_fraction`` × ``max_tokens``. Reads the prompts; calls no model.
    """
    if not 0 < output_fraction <= 1:
        raise ValueError("output_fraction must be in (0, 1]")
    plan = Plan(cfg, limit)
    prompts, stats, specs, assignment = plan.prompts, plan.stats, plan.specs, plan.assignment
    counted: list[Prompt] = prompts
    if len(prompts) > sample:
        counted = rng_for(cfg.seed, "estimate").sample(prompts, sample)
    scale = len(prompts) / len(counted)
    overrides = dict(expected_output_tokens or {})

    def expected(spec: ModelSpec) -> int:
        return int(overrides.get(spec.name, round(output_fraction * spec.params.max_tokens)))

    k = 2 if cfg.on_policy is not None else cfg.responses_per_prompt
    est = Estimate(cfg.name, len(prompts), stats.duplicates, len(counted), k, cfg.on_policy,
                   output_fraction, max(j.max_reasks for j in cfg.judges),
                   list(cfg.judge.aspects), cfg.judge.permutations, len(cfg.judges))
    n_requests = Counter(m for ms in assignment.values() for m in ms)
    for name, spec in specs.items():
        if not n_requests[name]:
            continue
        counter = token_counter(spec)
        picked = [p for p in counted if name in assignment[p.id]] or counted
        reqs = plan.requests(picked, name)
        mean_in = sum(counter.count(r.messages) for r in reqs) / len(reqs)
        est.stages.append(_stage("generate", spec, cfg, n_requests[name],
                                 round(mean_in * n_requests[name]), expected(spec), counter))

    perms = cfg.judge.permutations  # comparisons are shuffled once, for every judge
    for judge in cfg.judges:  # the judge, then the rest of its panel
        counter = token_counter(judge)
        judge_in = 0
        for p in counted:
            responses = sum(expected(specs[m]) for m in assignment[p.id])
            for aspect in judge.aspects:
                msgs = render_judge_messages(aspect, p.text, [""] * len(assignment[p.id]),
                                             p.reference, structured=judge.mode == "structured",
                                             custom_dir=judge.templates_dir)
                judge_in += counter.count(msgs) + responses
        est.stages.append(_stage("judge", judge, cfg, len(prompts) * len(judge.aspects) * perms,
                                 round(judge_in * scale * perms), expected(judge), counter))
    return est


# --- output --------------------------------------------------------------------------------

def _money(usd: float | None) -> str:
    if usd is None:
        return "no price"
    if usd == 0:
        return "$0"
    if usd >= 100:
        return f"${usd:,.0f}"
    return f"${usd:,.2f}" if usd >= 1 else f"${usd:.4f}"


def format_estimate(est: Estimate) -> str:
    """The ``prefsynth estimate`` report: one row per stage and model, totals, and notes that
    say which numbers are exact and which are assumptions."""
    mode = (f"on-policy {est.on_policy} vs 1 other pool model per prompt" if est.on_policy
            else f"{est.responses_per_prompt} responses per prompt")
    counted = (f"tokens counted on all {est.prompts:,} prompts" if est.counted_prompts ==
               est.prompts else f"tokens counted on a seeded sample of {est.counted_prompts:,} "
               f"of {est.prompts:,} prompts and scaled")
    lines = [f"estimate for {est.name}: {est.prompts:,} prompts ({est.duplicates:,} duplicates "
             f"removed), {mode}; {counted}", ""]
    head = ("stage", "model", "backend", "requests", "input tok", "output tok (exp / max)",
            "tokens by", "cost (exp / max)")
    rows = [head]
    for s in est.stages:
        money = "no price" if s.cost is None else f"{_money(s.cost)} / {_money(s.max_cost)}"
        rows.append((s.stage, s.model, s.backend, f"{s.requests:,}", f"{s.input_tokens:,}",
                     f"{s.output_tokens:,} / {s.max_output_tokens:,}", s.tokens_by,
                     money + (" (batch)" if s.batch_discount else "")))
    total_money = "no price" if est.cost is None else (
        f"{_money(est.cost)} / {_money(est.max_cost)}"
        + (f" + {len(est.unpriced)} unpriced" if est.unpriced else ""))
    rows.append(("total", "", "", f"{est.requests:,}",
                 f"{sum(s.input_tokens for s in est.stages):,}",
                 f"{sum(s.output_tokens for s in est.stages):,} / "
                 f"{sum(s.max_output_tokens for s in est.stages):,}", "", total_money))
    right = {3, 4, 5}
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w)
                 for i, (c, w) in enumerate(zip(r, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    notes = [
        f"expected output = {est.output_fraction:g} × max_tokens per model unless set; the max "
        "column assumes every answer runs to max_tokens",
        f"judge: {len(est.aspects)} aspects × {est.permutations} permutation(s) per prompt"
        + (f" for each of {est.judges} judges" if est.judges > 1 else "") + ", "
        "assuming every generation succeeds; its input counts the rendered rubric exactly and "
        "each response (not generated yet) at its model's expected output length",
        f"not included: judge re-asks of unparseable answers (up to {est.max_reasks} per "
        "judgment)",
    ]
    approx: dict[str, list[str]] = {}
    for s in est.stages:
        if s.tokens_by == APPROX:
            approx.setdefault(s.why_approx, []).append(s.model)
    for why, models in approx.items():
        notes.append(f"{APPROX} for {', '.join(models)}: {why}")
    if est.unpriced:
        notes.append("no price in `prices:` for " + ", ".join(est.unpriced)
                     + " (cost unknown, shown as 'no price')")
    batched = [f"{s.model} (-{s.batch_discount:.0%})" for s in est.stages
               if s.batch_discount]
    if batched:
        notes.append("Batch API discount applied: " + ", ".join(batched))
    lines += ["", "notes:", *(f"  - {n}" for n in notes)]
    return "\n".join(lines)
