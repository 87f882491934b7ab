"""The one async ``Backend`` protocol every model provider implements.

A backend turns a batch of ``ChatRequest`` into the same number of ``ChatResult`` in the same
order. Failures are carried in ``ChatResult.error``; ``complete`` raises only for problems that
make the whole backend unusable (``BackendError``), never for one bad request.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from prefsynth.records import ChatRequest, ChatResult


@runtime_checkable
class Backend(Protocol):
    name: str
    #: how many requests the executor should hand over per ``complete`` call
    batch_size: int
    #: how many ``complete`` calls may be in flight at once
    max_concurrency: int

    async def complete(self, requests: Sequence[ChatRequest]) -> list[ChatResult]: ...

    async def aclose(self) -> None: ...
