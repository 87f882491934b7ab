"""The YAML config, validated by pydantic at the edge. Unknown keys are rejected.

Every field documents itself in ``examples/tulu3-on-policy.yaml``. Errors are reported as one
line naming the file and the dotted field path (``models.2.backend: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from prefsynth.errors import ConfigError

ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class GenParams(_Strict):
    """Sampling parameters. Tulu 3 sampled the pool at temperature 1.0, top_p 1.0."""

    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = Field(2048, ge=1)
    stop: list[str] | None = None


class ModelSpec(_Strict):
    """One model: a pool member, the on-policy model, or a judge."""

    name: str
    backend: str
    model: str
    license: str = "unknown"
    params: GenParams = Field(default_factory=lambda: GenParams())
    system_prompt: str | None = None
    # --- endpoints (openai, openai-batch): never part of a request key. A backend declares
    # the ones it reads (``endpoint_fields``); setting another is a ConfigError.
    base_url: str | None = None
    api_key_env: str | None = None
    max_concurrency: int = Field(8, ge=1)
    requests_per_minute: float | None = Field(None, gt=0)
    tokens_per_minute: float | None = Field(None, gt=0)
    timeout: float = Field(120.0, gt=0)
    max_retries: int = Field(6, ge=0)
    # --- backend-specific options, checked by the backend's ``Options`` model (llamacpp:
    # n_ctx, n_threads; vllm: tensor_parallel_size, ...). Those that change answers are keyed.
    options: dict[str, Any] = Field(default_factory=dict)

    ENDPOINT_FIELDS: ClassVar[tuple[str, ...]] = (
        "base_url", "api_key_env", "max_concurrency", "requests_per_minute",
        "tokens_per_minute", "timeout", "max_retries",
    )
    _where: str | None = PrivateAttr(None)

    @property
    def where(self) -> str:
        """This model's dotted path in its config (``models.2``, ``judge``, ``panel.0``), for
        error messages; ``models.<name>`` for a spec built outside a ``Config``."""
        return self._where or f"models.{self.name}"


class PromptSource(_Strict):
    """Where prompts come from and which fields hold what."""

    path: str | None = None  # .jsonl / .json / .parquet file or a folder of them
    dataset: str | None = None  # anything datasets.load_dataset reads (name or local builder)
    split: str = "train"
    format: Literal["auto", "jsonl", "parquet", "datasets"] = "auto"
    text_field: str = "prompt"
    messages_field: str | None = None
    id_field: str | None = "id"
    source_field: str | None = "source"
    reference_field: str | None = "reference"
    instruction_ids_field: str | None = "instruction_id_list"
    kwargs_field: str | None = "kwargs"
    source_name: str | None = None  # default `source` when a row has none
    limit: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> PromptSource:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of prompts.path or prompts.dataset")
        return self


class JudgeSpec(ModelSpec):
    """The judge. Temperature 0.1 as in Tulu 3; four UltraFeedback aspects by default."""

    params: GenParams = Field(default_factory=lambda: GenParams(temperature=0.1, max_tokens=1024))
    aspects: list[str] = Field(default_factory=lambda: list(ASPECTS))
    mode: Literal["text", "structured"] = "text"
    max_reasks: int = Field(2, ge=0)
    permutations: int = Field(1, ge=1)
    templates_dir: str | None = None  # custom rubrics: <aspect>.jinja files, sandboxed


class PairPolicy(_Strict):
    """How judged responses become chosen/rejected pairs (parsing and pairing cost no calls)."""

    rejected: Literal["random_lower", "lowest"] = "random_lower"
    aggregate: Literal["mean", "min"] = "mean"
    min_margin: float = Field(0.0, ge=0)
    weights: dict[str, float] = Field(default_factory=dict)
    constraints: Literal["off", "verify", "strict"] = "off"


class Price(_Strict):
    input_per_mtok: float = 0.0
    output_per_mtok: float = 0.0
    batch_discount: float = Field(0.5, ge=0, le=1)


class Config(_Strict):
    name: str = "prefsynth"
    seed: int = 42
    prompts: PromptSource
    models: list[ModelSpec]
    responses_per_prompt: int = Field(4, ge=1)
    on_policy: str | None = None
    judge: JudgeSpec
    panel: list[JudgeSpec] = Field(default_factory=list)  # more judges; ratings averaged
    pairs: PairPolicy = Field(default_factory=lambda: PairPolicy())
    output: str = "out"
    #: prompts per shard: stages run and output is written shard by shard, so memory is
    #: bounded by the shard, not the prompt set (default: all prompts in one shard)
    shard_size: int | None = Field(None, ge=1)
    store: str | None = None  # default: OUTPUT/.prefsynth/store.sqlite
    prices: dict[str, Price] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        for i, m in enumerate(self.models):
            m._where = f"models.{i}"
        self.judge._where = "judge"
        for i, j in enumerate(self.panel):
            j._where = f"panel.{i}"
        names = [m.name for m in self.models]
        if not names:
            raise ValueError("models: the pool is empty")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: duplicate name {dupes[0]!r}")
        if self.on_policy is not None:
            if self.on_policy not in names:
                raise ValueError(f"on_policy: {self.on_policy!r} is not a model in the pool")
            if len(names) < 2:
                raise ValueError("on_policy: needs at least one other model in the pool")
        elif self.responses_per_prompt > len(names):
            raise ValueError(
                f"responses_per_prompt: {self.responses_per_prompt} is larger than the pool "
                f"({len(names)} models)"
            )
        elif self.responses_per_prompt < 2:
            raise ValueError("responses_per_prompt: at least 2 responses are needed for a pair")
        judges = [self.judge.name, *(j.name for j in self.panel)]
        if len(set(judges)) != len(judges):
            raise ValueError("panel: judge names must be distinct")
        for i, j in enumerate(self.panel):
            if j.aspects != self.judge.aspects:
                raise ValueError(f"panel.{i}.aspects: every judge must rate the same aspects")
        bad = [w for w in self.pairs.weights if w not in self.judge.aspects]
        if bad:
            raise ValueError(f"pairs.weights: {bad[0]!r} is not one of judge.aspects")
        return self

    @property
    def judges(self) -> list[JudgeSpec]:
        """The judge and the rest of its panel, in config order."""
        return [self.judge, *self.panel]

    def model(self, name: str) -> ModelSpec:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    @property
    def store_path(self) -> Path:
        return Path(self.store) if self.store else self.output_dir / ".prefsynth" / "store.sqlite"


def _where(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if not str(p).startswith("function-after")]
    return ".".join(parts) or "(top level)"


def parse_config(data: Any, origin: str = "config") -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping of settings at the top level")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        where = _where(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        msg = msg.removeprefix("Value error, ")
        more = f" (and {len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
        raise ConfigError(f"{origin}: {where}: {msg}{more}") from None
    _check_backends(cfg, origin)
    return cfg


def _check_backends(cfg: Config, origin: str) -> None:
    """Every model's backend exists and takes its options and endpoint keys: checked with
    the rest of the config, so ``run``, ``status`` and ``estimate`` stop before any work
    (``prefsynth.backends.validate``, which imports the module of each backend named)."""
    from prefsynth.backends import validate

    for spec in [*cfg.models, *cfg.judges]:
        try:
            validate(spec)
        except ConfigError as e:
            raise ConfigError(f"{origin}: {e}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a YAML config. Relative paths in it resolve against the CWD."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not valid UTF-8") from None
    if isinstance(data, dict):
        for dotted, value in (overrides or {}).items():
            node = data
            *head, last = dotted.split(".")
            for k in head:
                node = node.setdefault(k, {})
            node[last] = value
    return parse_config(data, str(p))
