"""One rate budget per model, shared by all its Ray workers: ``Budget`` and ``SharedGate``.

A model's ``requests_per_minute`` / ``tokens_per_minute`` is what its provider allows the
whole job, so N workers must share it, not get N times it. ``Budget`` (one small Ray actor
per model, no CPU reserved) keeps a virtual clock per limit, as the local ``Pacer`` does, but
hands out *leases*: a window of wall-clock time in which one worker alone may spend the rate
(``units / rate`` seconds long, starting where the last lease ended). Windows never overlap,
so the model's sends never exceed the rate, and a worker pays one actor call per lease (about
a second of the model's budget), not per request. ``SharedGate`` is the worker's side: it
spaces the backend's sends inside its window, one waiting send at a time, and asks for the
next window when it runs out.

A 429 seen by any worker is reported with ``cooldown``: the budget's next lease starts after
the pause, so every worker stops within one lease (a second of the rate at most) of the first
429, and the worker that saw it stops at once.

Leases are in ``time.time()`` seconds: cluster nodes keep their clocks in sync (NTP), and a
skew of milliseconds moves a send by as much.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

#: how much of a model's budget one lease holds, in seconds of its rate
LEASE_SECONDS = 1.0


class Budget:
    """The budget of one model (the body of a Ray actor; see the module docstring)."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None
                 ) -> None:
        self.rates = {dim: per_minute / 60.0 for dim, per_minute in
                      (("requests", requests_per_minute), ("tokens", tokens_per_minute))
                      if per_minute}
        self.clock = dict.fromkeys(self.rates, 0.0)
        self.paused_until = 0.0

    def lease(self, dim: str, units: float) -> tuple[float, float]:
        """A window ``(start, end)`` in which the caller alone may spend ``units`` of ``dim``."""
        start = max(self.clock[dim], time.time(), self.paused_until)
        end = start + units / self.rates[dim]
        self.clock[dim] = end
        return start, end

    def cooldown(self, seconds: float) -> float:
        """No lease starts before ``seconds`` from now; returns the end of the pause."""
        self.paused_until = max(self.paused_until, time.time() + seconds)
        return self.paused_until


class SharedGate:
    """A worker's side of a ``Budget`` (``backends.base.SendGate``): the backend awaits
    ``acquire`` before each send and reports a 429 with ``cooldown``."""

    def __init__(self, budget: Any, requests_per_minute: float | None,
                 tokens_per_minute: float | None, lease_seconds: float = LEASE_SECONDS) -> None:
        self.budget = budget  # the Ray actor handle (or, in tests, anything with those calls)
        self.rates = Budget(requests_per_minute, tokens_per_minute).rates
        self.windows = {dim: [0.0, 0.0] for dim in self.rates}  # [next free, end]
        self.lease_seconds = lease_seconds
        self.paused_until = 0.0
        self._lock: asyncio.Lock | None = None

    async def acquire(self, tokens: int) -> None:
        """Wait for this send's turn. One send of this worker waits at a time (holding the
        lock), so a worker holds at most its current lease: a cooldown reported meanwhile by
        another worker stops this one at its next lease, and its own 429 at once."""
        if self._lock is None:
            self._lock = asyncio.Lock()  # bound to the worker's event loop on first use
        async with self._lock:
            while True:
                slot = max(time.time(), self.paused_until)
                for dim, cost in (("requests", 1.0), ("tokens", float(tokens))):
                    if dim in self.rates:
                        slot = max(slot, await self._reserve(dim, cost, slot))
                wait = slot - time.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if self.paused_until <= time.time():  # else a 429 came meanwhile: again
                    return

    async def _reserve(self, dim: str, cost: float, not_before: float) -> float:
        """The time at which ``cost`` of ``dim`` may be spent, inside this worker's windows."""
        window = self.windows[dim]
        need = cost / self.rates[dim]
        start = max(window[0], not_before)
        while start + need > window[1]:  # this window is spent: lease the next one
            units = max(cost, self.rates[dim] * self.lease_seconds)
            lease_start, lease_end = await self.budget.lease.remote(dim, units)
            start, window[1] = max(float(lease_start), not_before), float(lease_end)
        window[0] = start + need
        return start

    def cooldown(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.time() + seconds)
        self.budget.cooldown.remote(seconds)


__all__ = ["LEASE_SECONDS", "Budget", "SharedGate"]
