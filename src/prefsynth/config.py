"""The YAML config, validated by pydantic at the edge. Unknown keys are rejected.

Every field documents itself in ``examples/tulu3-on-policy.yaml``. Errors are reported as one
line naming the file and the dotted field path (``models.2.backend: ...``), or the YAML line for
what the loader refuses outright: aliases ("billion laughs"), deep nesting, duplicate keys.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from prefsynth.errors import ConfigError

ASPECTS = ("helpfulness", "honesty", "instruction_following", "truthfulness")
_ASPECT_NAME = re.compile(r"[A-Za-z0-9_]+")
#: YAML nesting deeper than this is refused (a real config nests five levels)
MAX_YAML_DEPTH = 64


class _Strict(BaseModel):
    # NaN or infinity in a temperature, price or rate limit is always a typo, never a setting
    model_config = ConfigDict(extra="forbid", frozen=False, allow_inf_nan=False)


def _scalar_option(value: Any) -> Any:
    """Backend options are flat settings (``n_ctx: 4096``); a nested value is a mistake and
    would reach a backend's constructor unchecked."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number")
    if value is not None and not isinstance(value, str | int | float | bool):
        raise ValueError(f"must be a string, number, boolean or null, got {type(value).__name__}")
    return value


#: one value of ``ModelSpec.options``
OptionValue = Annotated[Any, BeforeValidator(_scalar_option)]


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
    options: dict[str, OptionValue] = Field(default_factory=dict)

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

    @field_validator("aspects")
    @classmethod
    def _aspects(cls, aspects: list[str]) -> list[str]:
        """At least one aspect, each named once: with none, every prompt would silently yield
        no pair (generation-only runs are not supported)."""
        if not aspects:
            raise ValueError("at least one aspect is needed (runs without a judge are not "
                             f"supported); the built-in ones are {', '.join(ASPECTS)}")
        for a in aspects:
            if not _ASPECT_NAME.fullmatch(a):
                raise ValueError(f"{a!r} is not an aspect name (letters, digits and _ only)")
            if aspects.count(a) > 1:
                raise ValueError(f"{a!r} is listed twice")
        return aspects


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


# --- prompt curation (stages/curate; issue 12): a block of its own -------------------------


class EvalSource(_Strict):
    """One evaluation set to decontaminate against: a local JSONL/JSON/Parquet file, or
    anything ``datasets.load_dataset`` reads, and the field that holds each instance's text
    (a string, or a list of {role, content} messages whose user turns are read)."""

    name: str | None = None  # default: the file's stem, or the dataset name
    path: str | None = None
    dataset: str | None = None
    subset: str | None = None  # the datasets config name (gsm8k: "main")
    split: str = "test"
    field: str
    id_field: str | None = None  # default: "<name>:<row>"
    format: Literal["auto", "jsonl", "json", "parquet"] = "auto"

    @model_validator(mode="after")
    def _one_source(self) -> EvalSource:
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of path or dataset")
        return self

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        return Path(self.path).stem if self.path else str(self.dataset)


class NearDupSpec(_Strict):
    """MinHash LSH over word n-gram shingles of the user turns; the first of a cluster stays."""

    threshold: float = Field(0.8, gt=0, le=1)
    num_perm: int = Field(128, ge=2)
    ngram: int = Field(5, ge=1)


class DecontaminateSpec(_Strict):
    """The Tulu 3 rule: a prompt is removed when its n-grams cover more than ``threshold`` of
    the tokens of any one eval instance."""

    evals: list[EvalSource] = Field(min_length=1)
    ngram: int = Field(8, ge=1)
    threshold: float = Field(0.5, gt=0, le=1)

    @model_validator(mode="after")
    def _distinct(self) -> DecontaminateSpec:
        names = [e.label for e in self.evals]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"evals: two eval sets are named {dupes[0]!r}; give each a name")
        return self


class SampleSpec(_Strict):
    """Source-balanced sampling of the prompts that survive: ``per_source`` counts, or a
    ``total``. Each prompt's draw is a hash of (seed, prompt id), so the sample does not move
    when other prompts come or go."""

    per_source: dict[str, Annotated[int, Field(ge=0)]] | None = None
    total: int | None = Field(None, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _one_rule(self) -> SampleSpec:
        if (self.per_source is None) == (self.total is None):
            raise ValueError("give exactly one of per_source or total")
        return self


class CurateSpec(_Strict):
    """Prompt curation between loading and the model mix. Each step is off unless given."""

    near_dup: NearDupSpec | None = None
    decontaminate: DecontaminateSpec | None = None
    sample: SampleSpec | None = None


# --- end of prompt curation --------------------------------------------------------------


class RaySettings(_Strict):
    """``executor: ray``: where the cluster is and how many workers each model gets.
    Workers are Ray actors; see docs/cluster.md."""

    #: ``host:port`` of a running cluster (``ray start --head``), ``auto`` for the one on
    #: this machine, ``ray://host:10001`` for Ray Client; unset: ``RAY_ADDRESS`` or a new
    #: local cluster
    address: str | None = None
    workers: int = Field(1, ge=1)  # actors per model
    workers_per_model: dict[str, Annotated[int, Field(ge=1)]] = Field(default_factory=dict)
    num_cpus: float = Field(1.0, ge=0)  # CPUs each worker reserves (GPUs: the backend says)
    #: requests per unit of work (default: what the backend takes at once, 64 to 1024)
    shard_requests: int | None = Field(None, ge=1)
    shards_in_flight: int = Field(2, ge=1)  # per worker: it never waits for the driver
    #: vllm models to run through ``ray.data.llm`` (vLLMEngineProcessorConfig) instead of a
    #: vLLM engine inside each worker
    data_llm: list[str] = Field(default_factory=list)


class Config(_Strict):
    name: str = "prefsynth"
    seed: int = 42  # 0 .. 2**64-1: hashed with each item into per-item seeds
    prompts: PromptSource
    models: list[ModelSpec]
    responses_per_prompt: int = Field(4, ge=1)
    on_policy: str | None = None
    judge: JudgeSpec
    panel: list[JudgeSpec] = Field(default_factory=list)  # more judges; ratings averaged
    pairs: PairPolicy = Field(default_factory=lambda: PairPolicy())
    output: str = "out"
    #: prompts per shard: stages run and output is written shard by shard, so memory is
    #: bounded by the shard, not the prompt set (default: ``core.plan.AUTO_SHARD_SIZE``, or
    #: all prompts in one shard when a backend pays per shard: vLLM, openai-batch)
    shard_size: int | None = Field(None, ge=1)
    store: str | None = None  # default: OUTPUT/.prefsynth/store.sqlite
    #: where requests run: this process (``local``) or a Ray cluster (``ray``, the ray extra)
    executor: Literal["local", "ray"] = "local"
    ray: RaySettings = Field(default_factory=lambda: RaySettings())
    prices: dict[str, Price] = Field(default_factory=dict)
    curate: CurateSpec | None = None  # prompt curation (stages/curate)

    @field_validator("seed")
    @classmethod
    def _seed(cls, seed: int) -> int:
        if not 0 <= seed < 2**64:
            raise ValueError("must be an integer from 0 to 2**64 - 1")
        return seed

    @model_validator(mode="after")
    def _paths(self) -> Config:
        """Output and store paths that cannot be created fail here, naming the key, rather
        than as an OS error once the run has started."""
        problem = _folder_problem(Path(self.output))
        if problem:
            raise ValueError(f"output: {problem}")
        if self.store is not None:
            store = Path(self.store)
            problem = f"{store} is a folder, not a file" if store.is_dir() else \
                _folder_problem(store.parent)
            if problem:
                raise ValueError(f"store: {problem}")
        return self

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
        # the pipeline keys backends by name: a judge named like a pool model would replace it
        for where, j in [("judge", self.judge), *((f"panel.{i}", j) for i, j in enumerate(self.panel))]:
            if j.name in names:
                raise ValueError(f"{where}.name: {j.name!r} is also a pool model's name")
        for i, j in enumerate(self.panel):
            if j.aspects != self.judge.aspects:
                raise ValueError(f"panel.{i}.aspects: every judge must rate the same aspects")
        for where, j in [("judge", self.judge), *((f"panel.{i}", j) for i, j in enumerate(self.panel))]:
            custom = [a for a in j.aspects if a not in ASPECTS]
            if custom and j.templates_dir is None:
                raise ValueError(f"{where}.aspects: {custom[0]!r} is not a built-in aspect "
                                 f"({', '.join(ASPECTS)}); custom aspects need "
                                 f"{where}.templates_dir")
        bad = [w for w in self.pairs.weights if w not in self.judge.aspects]
        if bad:
            raise ValueError(f"pairs.weights: {bad[0]!r} is not one of judge.aspects")
        for field, listed in (("workers_per_model", self.ray.workers_per_model),
                              ("data_llm", self.ray.data_llm)):
            unknown = [m for m in listed if m not in names + judges]
            if unknown:
                raise ValueError(f"ray.{field}: {unknown[0]!r} is not a model or judge")
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


def _folder_problem(path: Path) -> str | None:
    """Why ``path`` cannot be (or become) a folder: it, or the nearest existing parent, is a file."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else f"{p} is a file, not a folder"
    return None


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
        if not err["loc"]:  # a whole-config check: its message starts with the dotted field
            raise ConfigError(f"{origin}: {msg}{more}") from None
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


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses what no config needs and a hostile file could abuse:
    aliases (a "billion laughs" file of 600 bytes expands to gigabytes), nesting deep enough
    to exhaust the stack, duplicate keys (the second silently won), lone surrogates and
    integers too long to convert. Each is a ``yaml.MarkedYAMLError``, so it is reported with
    its line like any syntax error."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"aliases (*{event.anchor}) are not supported: write the value out",
                event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                    self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                continue
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def _construct_str(self, node: Any) -> str:
        value = self.construct_scalar(node)
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise yaml.constructor.ConstructorError(
                None, None, "a lone surrogate (an unpaired \\ud800-\\udfff escape) is not "
                "valid Unicode", node.start_mark) from None
        return str(value)

    def _construct_int(self, node: Any) -> int:
        try:
            return int(super().construct_yaml_int(node))
        except ValueError:
            raise yaml.constructor.ConstructorError(
                None, None, "integer too long", node.start_mark) from None


_Loader.add_constructor("tag:yaml.org,2002:str", _Loader._construct_str)
_Loader.add_constructor("tag:yaml.org,2002:int", _Loader._construct_int)


def _read_yaml(p: Path) -> Any:
    try:
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not valid UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read ({e.strerror})") from None
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{p}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None


def _apply(data: dict[str, Any], overrides: dict[str, Any], origin: str) -> None:
    """Set dotted keys (``prompts.path``) from the command line before validation."""
    for dotted, value in overrides.items():
        node = data
        *head, last = dotted.split(".")
        for i, k in enumerate(head):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                where = ".".join(head[: i + 1])
                raise ConfigError(f"{origin}: {where}: expected a mapping of settings, "
                                  f"got {type(node).__name__}")
        node[last] = value


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate a YAML config. Relative paths in it resolve against the CWD."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    data = _read_yaml(p)
    if isinstance(data, dict):
        _apply(data, overrides or {}, str(p))
    return parse_config(data, str(p))
