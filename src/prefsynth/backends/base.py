"""The one async ``Backend`` protocol every model provider implements, and its defaults.

A backend turns a batch of ``ChatRequest`` into the same number of ``ChatResult`` in the same
order. Failures are carried in ``ChatResult.error``; ``complete`` raises only for problems that
make the whole backend unusable (``BackendError``: a missing model file, HTTP 401/403), never
for one bad request.

A batch can take as long as its slowest request, so a backend that learns its results one by
one also hands each to ``on_result`` the moment it has it: the executor commits it within half
a second, and a run killed mid-batch loses only what was still in flight.

What the pipeline, the estimate and ``status`` need to know about a backend it reads from
class attributes declared here (as simonw/llm's models declare theirs), never by probing
with ``hasattr`` or by naming a backend.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from prefsynth.errors import ConfigError
from prefsynth.records import ChatRequest, ChatResult

if TYPE_CHECKING:
    from prefsynth.config import ModelSpec
    from prefsynth.core.store import Store

#: receives one final result (answered, failed or pending) on the event loop's thread
ResultSink = Callable[[ChatResult], None]


def key_option(default: Any, **kwargs: Any) -> Any:
    """A ``Field`` for an option that changes answers: set to a non-default value, it becomes
    part of every request key of the model (a bigger ``n_ctx``, another quantization)."""
    return Field(default, json_schema_extra={"key": True}, **kwargs)


class BackendOptions(BaseModel):
    """A backend's ``options:``. Unknown keys are rejected. Plain fields are how a backend
    runs (threads, concurrency, timeouts) and stay out of request keys; ``key_option`` fields
    change answers and go in, but only when set explicitly to a value other than the default,
    so the keys of a config that sets none are those of a config without options."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def key_fields(cls) -> frozenset[str]:
        """The names of the options that change answers."""
        return frozenset(
            name for name, f in cls.model_fields.items()
            if isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("key")
        )

    def key_options(self) -> dict[str, Any]:
        """The answer-changing options set to something other than their default, as JSON."""
        fields = type(self).model_fields
        changed = {
            name for name in self.model_fields_set & self.key_fields()
            if getattr(self, name) != fields[name].get_default(call_default_factory=True)
        }
        return self.model_dump(mode="json", include=changed) if changed else {}


OptionsT = TypeVar("OptionsT", bound=BackendOptions)


def parse_options(options: type[OptionsT], spec: ModelSpec) -> OptionsT:
    """``spec.options`` read by a backend's ``Options`` model; a bad or unknown option is a
    ``ConfigError`` naming the dotted field (``models.2.options.n_ctx: ...``)."""
    try:
        return options.model_validate(spec.options)
    except ValidationError as e:
        errors = e.errors()
        err = errors[0]
        where = ".".join([spec.where, "options", *(str(p) for p in err["loc"])])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            known = ", ".join(sorted(options.model_fields)) or "none"
            msg = f"unknown option for the {spec.backend} backend (known: {known})"
        elif isinstance(err.get("input"), str | int | float | bool):
            msg += f" (got {err['input']!r})"
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"{where}: {msg}{more}") from None


class SendGate(Protocol):
    """One rate budget shared by every copy of a model (its Ray workers): each send waits
    for its turn in the model's ``requests_per_minute`` / ``tokens_per_minute``, and a 429
    seen by one copy pauses them all."""

    async def acquire(self, tokens: int) -> None:
        """Wait until one request estimated at ``tokens`` tokens may be sent."""
        ...

    def cooldown(self, seconds: float) -> None:
        """The server said "too many requests": no copy sends for ``seconds``."""
        ...


@runtime_checkable
class Backend(Protocol):
    name: str
    #: how many requests the executor should hand over per ``complete`` call
    batch_size: int
    #: how many ``complete`` calls may be in flight at once
    max_concurrency: int
    #: holds a whole device (in-process vLLM): run alone, closed when its requests are done
    exclusive: ClassVar[bool]
    #: priced at the provider's batch discount (``prices.*.batch_discount``)
    batch_pricing: ClassVar[bool]
    #: every shard costs it a fixed price (a model load, a batch job): the automatic shard
    #: size (``core.plan.AUTO_SHARD_SIZE``) leaves a run that uses it in one shard
    costly_shards: ClassVar[bool]
    #: backends of one family answer a request identically and share request keys
    key_family: ClassVar[str | None]
    #: rebuilt from its ``ModelSpec`` alone in another process (a Ray worker); False keeps it
    #: on the driver (``openai-batch``: its jobs are recorded in the driver's store)
    shippable: ClassVar[bool]
    #: paces its own sends by ``requests_per_minute`` / ``tokens_per_minute`` and can hand
    #: that pacing to a ``SendGate`` shared with its copies (``share_limits``)
    shares_limits: ClassVar[bool]
    #: can answer a run's requests as they come, interleaved across stages and shards (a
    #: prompt's judge requests while other generations are out): the pipeline streams a
    #: shard (``core.stream``) when every backend of the run does. Such a backend answers
    #: each request on its own: it may get many small ``complete`` calls at once, up to
    #: ``batch_size`` requests in flight in all. Not a batch backend
    #: (a job per stage) nor an ``exclusive`` one (a whole device, one model at a time)
    streams: ClassVar[bool]
    #: a batch backend waits for its jobs to finish instead of returning them as pending
    wait: bool
    #: the model of ``options:`` (``BackendOptions``); answer-changing fields are keyed
    Options: ClassVar[type[BackendOptions]]
    #: the endpoint keys of ``ModelSpec`` this backend reads (``ModelSpec.ENDPOINT_FIELDS``)
    endpoint_fields: ClassVar[frozenset[str]]
    #: a rerun with the same seed can reproduce the answers (False: the API takes no seed)
    reproducible: ClassVar[bool]

    async def complete(self, requests: Sequence[ChatRequest],
                       on_result: ResultSink | None = None) -> list[ChatResult]:
        """One result per request, in request order.

        ``on_result``, when given, is called with each result as soon as it is final, at most
        once per request, on the event loop's thread (a backend working in another thread hops
        back with ``loop.call_soon_threadsafe``), and before or shortly after ``complete``
        returns. Calling it is optional: the caller takes every returned result it was not
        already handed, so a backend that only learns its results all at once ignores it.
        """
        ...

    async def aclose(self) -> None: ...

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        """Refuse, as a ``ConfigError`` naming the dotted field, what the provider would
        refuse in every request of this spec (a temperature out of its range): checked at
        config load, not hours later when the stage starts."""
        ...

    @classmethod
    def store_status(cls, store: Store) -> list[dict[str, Any]]:
        """Rows ``prefsynth status`` prints about this backend's own state in the store
        (the Batch API's jobs), read without any network call."""
        ...

    @classmethod
    def gpus(cls, spec: ModelSpec) -> float:
        """GPUs one copy of this backend needs for ``spec`` (what a Ray worker reserves)."""
        ...

    def share_limits(self, gate: SendGate) -> None:
        """Pace every send through ``gate`` instead of this copy's own rate limits."""
        ...


class BaseBackend:
    """Defaults for the declared attributes; every shipped backend derives from it."""

    exclusive: ClassVar[bool] = False
    batch_pricing: ClassVar[bool] = False
    costly_shards: ClassVar[bool] = False
    key_family: ClassVar[str | None] = None  # None: the registered name is the family
    shippable: ClassVar[bool] = True
    shares_limits: ClassVar[bool] = False
    streams: ClassVar[bool] = False  # declared by each backend that can
    wait: bool = False
    Options: ClassVar[type[BackendOptions]] = BackendOptions  # no options at all
    endpoint_fields: ClassVar[frozenset[str]] = frozenset()  # no endpoint
    reproducible: ClassVar[bool] = True

    async def aclose(self) -> None:
        return None

    @classmethod
    def check_spec(cls, spec: ModelSpec) -> None:
        return None

    @classmethod
    def store_status(cls, store: Store) -> list[dict[str, Any]]:
        return []

    @classmethod
    def gpus(cls, spec: ModelSpec) -> float:
        return 0.0

    def share_limits(self, gate: SendGate) -> None:
        raise TypeError(f"{type(self).__name__} does not pace its sends (shares_limits=False)")
