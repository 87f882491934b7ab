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
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

from prefsynth.records import ChatRequest, ChatResult

if TYPE_CHECKING:
    from prefsynth.core.store import Store

#: receives one final result (answered, failed or pending) on the event loop's thread
ResultSink = Callable[[ChatResult], None]


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
    #: backends of one family answer a request identically and share request keys
    key_family: ClassVar[str | None]
    #: a batch backend waits for its jobs to finish instead of returning them as pending
    wait: bool

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
    def store_status(cls, store: Store) -> list[dict[str, Any]]:
        """Rows ``prefsynth status`` prints about this backend's own state in the store
        (the Batch API's jobs), read without any network call."""
        ...


class BaseBackend:
    """Defaults for the declared attributes; every shipped backend derives from it."""

    exclusive: ClassVar[bool] = False
    batch_pricing: ClassVar[bool] = False
    key_family: ClassVar[str | None] = None  # None: the registered name is the family
    wait: bool = False

    async def aclose(self) -> None:
        return None

    @classmethod
    def store_status(cls, store: Store) -> list[dict[str, Any]]:
        return []
