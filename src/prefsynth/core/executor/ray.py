"""The Ray executor (``executor: ray``): the same stages, their requests answered on a cluster.

The driver (the process running ``prefsynth run``) plans, keys and stores exactly as the local
executor does; only where a request is answered changes. Per model, a ``WorkerPool`` of Ray
actors (``ray_worker.ModelWorker``) each builds the model's backend from its ``ModelSpec`` —
``openai`` over HTTP, ``llamacpp``, ``vllm`` with ``num_gpus`` = its parallel size — and lives
for the run, so an engine loads once, not once per stage. The driver cuts the requests still
missing from the store into shards (sorted by prompt length inside, ``core.executor.arrow``),
keeps ``shards_in_flight`` of them on every worker, and commits the answers to the store as the
workers stream them back (Arrow tables, one transaction each). SQLite stays the one ledger,
written by the driver alone.

What a crash costs: a dead worker loses the answers it had not streamed back; the driver
starts a replacement and sends it the rest of that shard. A dead driver takes its actors with
it and loses what was in flight; the rerun looks every key up first and asks Ray only for the
missing ones. Backends that keep state with the driver (``shippable = False``: the Batch API,
whose jobs already run on the provider's side) run here, through the local executor. See
docs/cluster.md for why actors rather than a Ray Data pipeline carry the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
import warnings
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

from prefsynth.backends import Backend, available, backend_class, create_backend
from prefsynth.config import Config, ModelSpec, RaySettings
from prefsynth.core.executor import NoProgress, Progress
from prefsynth.core.executor.arrow import requests_table, results_from
from prefsynth.core.executor.local import ResultWriter
from prefsynth.core.executor.local import run_stage as local_run_stage
from prefsynth.core.executor.ray_limits import Budget
from prefsynth.core.executor.ray_worker import ModelWorker, WorkerFatal, probe
from prefsynth.core.store import Store
from prefsynth.errors import BackendError, ConfigError, MissingExtraError
from prefsynth.records import ChatRequest, ChatResult, StageCounts, Usage

try:
    import ray
    from ray import exceptions as rex
except ImportError:  # the ray extra is missing: RayExecutor says so in one line
    ray = None  # type: ignore[assignment]
    rex = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: a worker that dies is replaced; more deaths than this per pool stop the run
MAX_DEATHS_PER_WORKER = 3
#: how long a worker may take to import its backend before the run gives up
PROBE_TIMEOUT = 180.0


_remote: dict[str, Any] = {}


def _remote_class(name: str) -> Any:
    """``ray.remote`` of a worker-side class or function, made once per process."""
    if name not in _remote:
        _remote.update(ModelWorker=ray.remote(ModelWorker), Budget=ray.remote(Budget),
                       probe=ray.remote(num_cpus=0)(probe))
    return _remote[name]


def connect(address: str | None) -> bool:
    """Join the Ray cluster at ``address`` (or ``RAY_ADDRESS``, or start a local one).
    Returns whether this call connected (and the executor must disconnect at the end)."""
    if ray is None:
        raise MissingExtraError("executor: ray", "ray")
    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address not in (None, "auto", "local"):
        _reachable(address)
    try:
        with warnings.catch_warnings():  # Ray's FutureWarning tips are not for our users
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(address=address, namespace="prefsynth", log_to_driver=False,
                     logging_level=logging.WARNING)
    except Exception as e:  # ConnectionError, a version mismatch (RuntimeError), ...
        where = f"at {address}" if address else "(local)"
        raise BackendError(f"ray.address: cannot join the Ray cluster {where}: "
                           f"{_first_line(e)}") from None
    return True


def _reachable(address: str) -> None:
    """A cluster address nobody listens on fails here in seconds; ``ray.init`` would retry
    for minutes."""
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"ray.address: {address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as e:
        raise BackendError(f"ray.address: no Ray cluster answers at {address} "
                           f"({e.strerror or type(e).__name__}); start one with "
                           "`ray start --head` or fix --ray-address") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


class WorkerPool:
    """One model's Ray actors, started on first use and kept for the run (``close`` ends them).

    Slot ``i`` always holds one live actor: a dead one is replaced (``MAX_DEATHS_PER_WORKER``
    times per slot, then the run stops with one line) and its unanswered requests resent.
    """

    def __init__(self, spec: ModelSpec, target: str, cls: Any, settings: RaySettings,
                 prefix: str, budget: Any) -> None:
        self.spec, self.target, self.settings = spec, target, settings
        self.size = settings.workers_per_model.get(spec.name, settings.workers)
        self.gpus = float(cls.gpus(spec))
        self.prefix = prefix
        self.budget = budget
        self.actors: list[Any] = []
        #: what each worker reported when it started (host, pid, batch_size, ...)
        self.info: dict[int, dict[str, Any]] = {}
        self.batch_size = self.max_concurrency = 1
        self.shard_size = settings.shard_requests or 64
        self.deaths = 0
        self.generation = 0
        self._locks: list[asyncio.Lock] = []

    @property
    def started(self) -> bool:
        return bool(self.actors)

    @property
    def resources(self) -> dict[str, float]:
        return {"CPU": self.settings.num_cpus * self.size, "GPU": self.gpus * self.size}

    def _new_actor(self, slot: int) -> Any:
        self.generation += 1
        cls = _remote_class("ModelWorker").options(
            name=f"{self.prefix}{slot}.{self.generation}", num_cpus=self.settings.num_cpus,
            num_gpus=self.gpus, max_restarts=0, max_concurrency=1000)
        return cls.remote(self.spec, self.target, self.budget)

    async def _ready(self, slot: int) -> dict[str, Any]:
        try:
            info: dict[str, Any] = await self.actors[slot].ready.remote()
            self.info[slot] = info
            return info
        except rex.RayTaskError as e:
            if isinstance(e.cause, WorkerFatal):
                raise e.cause.error() from None
            raise BackendError(f"{self.spec.where}: its Ray worker failed to start: "
                               f"{_first_line(e.cause or e)}") from None
        except rex.RayError as e:
            raise BackendError(f"{self.spec.where}: its Ray worker could not start: "
                               f"{_first_line(e)}") from None

    async def start(self) -> None:
        if self.actors:
            return
        self.actors = [self._new_actor(i) for i in range(self.size)]
        self._locks = [asyncio.Lock() for _ in range(self.size)]
        infos = await asyncio.gather(*(self._ready(i) for i in range(self.size)))
        self.batch_size, self.max_concurrency = infos[0]["batch_size"], infos[0]["max_concurrency"]
        self.shard_size = self.settings.shard_requests or \
            min(1024, max(64, self.batch_size * self.max_concurrency))
        log.info("ray: %s on %d worker(s): %s", self.spec.name, self.size,
                 ", ".join(f"{i['host']}:{i['pid']}" for i in infos))

    async def _replace(self, slot: int, dead: Any, why: BaseException) -> None:
        async with self._locks[slot]:
            if self.actors[slot] is not dead:  # another lane of this slot replaced it already
                return
            self.deaths += 1
            if self.deaths > MAX_DEATHS_PER_WORKER * self.size:
                raise BackendError(f"{self.spec.where}: its Ray workers died {self.deaths} "
                                   f"times; last: {_first_line(why)}")
            log.warning("ray: a worker of %s died (%s); starting another",
                        self.spec.name, _first_line(why))
            with contextlib.suppress(Exception):
                ray.kill(dead, no_restart=True)
            self.actors[slot] = self._new_actor(slot)
            await self._ready(slot)

    async def answer(self, slot: int, shard: Sequence[ChatRequest],
                     ingest: Callable[[list[ChatResult]], None]) -> None:
        """Send one shard to the worker in ``slot`` and ingest its answers as they stream
        back; if the worker dies, the rest of the shard goes to its replacement."""
        left = {r.key: r for r in shard}
        while left:
            actor = self.actors[slot]
            table = requests_table(list(left.values()))
            try:
                async for ref in actor.run.options(num_returns="streaming").remote(table):
                    results = results_from(await ref)
                    for r in results:
                        left.pop(r.key, None)
                    ingest(results)
                return  # every request answered (a backend returns one result per request)
            except rex.RayTaskError as e:
                if isinstance(e.cause, WorkerFatal):
                    raise e.cause.error() from None
                raise BackendError(f"{self.spec.where}: a Ray worker failed: "
                                   f"{_first_line(e.cause or e)}") from None
            except (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError,
                    rex.ObjectLostError) as e:
                await self._replace(slot, actor, e)

    async def drive(self, todo: Sequence[ChatRequest], ingest: Callable[[list[ChatResult]], None],
                    depth: int) -> None:
        """Answer ``todo``: shards of ``shard_size``, ``depth`` of them on every worker at
        once, each worker taking the next shard as soon as it has answered one."""
        size = self.shard_size
        shards = (todo[i : i + size] for i in range(0, len(todo), size))  # cut as sent

        async def lane(slot: int) -> None:
            for shard in shards:
                await self.answer(slot, shard, ingest)

        await _all([lane(slot) for slot in range(self.size) for _ in range(depth)])

    async def close(self) -> None:
        actors, self.actors = self.actors, []
        if not actors:
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(a.aclose.remote() for a in actors),
                                                  return_exceptions=True), 30)
        for a in actors:
            with contextlib.suppress(Exception):
                ray.kill(a, no_restart=True)


class RemoteBackend:
    """What the stages' work maps a model to under ``executor: ray``: its worker pool, with
    the declared attributes of the backend class it runs (the pipeline reads ``exclusive``:
    a GPU model runs alone and is closed after its generation, as locally)."""

    name: str
    wait: bool = False
    shippable: ClassVar[bool] = True
    shares_limits: ClassVar[bool] = False

    def __init__(self, pool: WorkerPool, cls: Any) -> None:
        self.pool = pool
        self.name = pool.spec.name
        self.cls = cls

    @property
    def exclusive(self) -> bool:  # type: ignore[override]
        return bool(self.cls.exclusive)

    @property
    def batch_pricing(self) -> bool:
        return bool(self.cls.batch_pricing)

    @property
    def key_family(self) -> str | None:
        return self.cls.key_family  # type: ignore[no-any-return]

    @property
    def batch_size(self) -> int:
        return self.pool.batch_size

    @property
    def max_concurrency(self) -> int:
        return self.pool.max_concurrency

    async def complete(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """The requests answered by the pool, in order (no store: for direct use)."""
        await self.pool.start()
        got: dict[str, ChatResult] = {}
        await self.pool.answer(0, requests, lambda rs: got.update((r.key, r) for r in rs))
        return [got[r.key] for r in requests]

    async def aclose(self) -> None:
        await self.pool.close()

    @classmethod
    def store_status(cls, store: Store) -> list[dict[str, Any]]:
        return []

    @classmethod
    def gpus(cls, spec: ModelSpec) -> float:
        return 0.0

    def share_limits(self, gate: Any) -> None:
        raise TypeError("a remote backend's workers share limits through their pool")


class RayExecutor:
    """``executor: ray`` (see the module docstring). ``backend`` and ``run_stage`` have the
    local executor's contract; ``aclose`` ends the workers and leaves the cluster. It runs a
    shard stage by stage (``streams`` False): its workers take a stage's requests at once."""

    streams = False

    def __init__(self, cfg: Config) -> None:
        if ray is None:
            raise MissingExtraError("executor: ray", "ray")
        self.cfg = cfg
        self.settings = cfg.ray
        self.prefix = f"prefsynth/{cfg.name}/{uuid.uuid4().hex[:8]}/"
        self.pools: dict[str, WorkerPool] = {}
        self.budgets: list[Any] = []
        self._owns_connection = False
        self._connected = False

    def _connect(self) -> None:
        if not self._connected:
            self._owns_connection = connect(self.settings.address)
            self._connected = True

    def feed(self, store: Store, progress: Progress) -> Any:
        raise TypeError("the Ray executor does not stream (streams=False)")

    def backend(self, spec: ModelSpec, store: Store) -> Backend:
        """A pool of workers for ``spec`` (started on first use), or, for a backend that stays
        on the driver, the backend itself. A backend no worker can build fails here."""
        cls = backend_class(spec.backend)
        if not cls.shippable:
            log.info("ray: %s (%s) runs on the driver", spec.name, spec.backend)
            return create_backend(spec, store=store)
        self._connect()
        if spec.name in self.settings.data_llm:  # vLLM through ray.data.llm, on request
            from prefsynth.core.executor.ray_data_llm import DataLLMPool

            pool: Any = DataLLMPool(spec, self.settings)
            self.pools[spec.name] = pool
            return RemoteBackend(pool, cls)  # type: ignore[return-value]
        target = available()[spec.backend]
        gpus = float(cls.gpus(spec))
        have = ray.cluster_resources().get("GPU", 0.0)
        if gpus > have:
            log.warning("ray: %s wants %g GPU(s) per worker and the cluster has %g now; its "
                        "workers wait until the cluster has them", spec.name, gpus, have)
        probe_task = _remote_class("probe").options(num_gpus=gpus)  # on a node like its workers'
        try:
            why = ray.get(probe_task.remote(spec, target), timeout=PROBE_TIMEOUT)
        except rex.GetTimeoutError:
            why = (f"no Ray worker{f' with {gpus:g} GPU(s)' if gpus else ''} could build it "
                   f"within {PROBE_TIMEOUT:.0f}s")
        except rex.RayError as e:
            why = _first_line(e)
        if why is not None:
            raise BackendError(why if why.startswith(spec.where) else
                               f"{spec.where}: backend {spec.backend!r} cannot run on a "
                               f"Ray worker: {why}")
        budget = None
        pool_size = self.settings.workers_per_model.get(spec.name, self.settings.workers)
        if cls.shares_limits and pool_size > 1 and \
                (spec.requests_per_minute or spec.tokens_per_minute):
            budget = _remote_class("Budget").options(num_cpus=0).remote(
                spec.requests_per_minute, spec.tokens_per_minute)
            self.budgets.append(budget)
        pool = WorkerPool(spec, target, cls, self.settings, f"{self.prefix}{spec.name}/", budget)
        self.pools[spec.name] = pool
        backend: Backend = RemoteBackend(pool, cls)  # type: ignore[assignment]
        return backend

    async def run_stage(self, stage: str,
                        work: Mapping[str, tuple[Backend, Sequence[ChatRequest]]], store: Store,
                        progress: Progress | None = None, *, collect: bool = True
                        ) -> tuple[dict[str, ChatResult], StageCounts]:
        """The local executor's contract: every request answered (or taken from the store),
        key -> result (``collect``) and the stage's counts."""
        progress = progress or NoProgress()
        counts = StageCounts()
        out: dict[str, ChatResult] = {}
        remote: dict[str, tuple[WorkerPool, list[ChatRequest]]] = {}
        driver: dict[str, tuple[Backend, Sequence[ChatRequest]]] = {}
        for model, (backend, reqs) in work.items():
            if isinstance(backend, RemoteBackend):
                remote[model] = (backend.pool, _missing(reqs, store, counts,
                                                        out if collect else None))
            else:
                driver[model] = (backend, reqs)
        progress.start(stage, counts.total, counts.cached)
        writer = ResultWriter(store)
        jobs: list[Awaitable[Any]] = []
        if driver:  # the Batch API judge: here, through the local executor
            jobs.append(local_run_stage(stage, driver, store, progress, collect=collect))
        busy = {pool for pool, todo in remote.values() if todo}
        await self._make_room(busy)
        for model, (pool, todo) in remote.items():
            if todo:
                jobs.append(self._drive(stage, model, pool, todo, writer, counts,
                                        out if collect else None, progress))
        try:
            done = await _all(jobs)
        finally:
            writer.flush()
            progress.finish()
        if driver:
            results, driver_counts = done[0]
            out.update(results)
            counts.add(driver_counts)
        return out, counts

    async def _drive(self, stage: str, model: str, pool: Any, todo: list[ChatRequest],
                     writer: ResultWriter, counts: StageCounts, out: dict[str, ChatResult] | None,
                     progress: Progress) -> None:
        await pool.start()

        def ingest(results: list[ChatResult]) -> None:
            ok = failed = 0
            usage = Usage()
            for res in results:
                if res.pending:
                    counts.pending += 1
                    continue
                writer.add(res, stage, model)
                if out is not None:
                    out[res.key] = res
                if res.ok:
                    ok += 1
                else:
                    failed += 1
                usage.prompt_tokens += res.usage.prompt_tokens
                usage.completion_tokens += res.usage.completion_tokens
            writer.flush()  # one transaction per streamed table: a crash loses what is in flight
            counts.answered += ok
            counts.failed += failed
            counts.usage.prompt_tokens += usage.prompt_tokens
            counts.usage.completion_tokens += usage.completion_tokens
            progress.advance(ok, failed, usage, model)

        await pool.drive(todo, ingest, self.settings.shards_in_flight)

    async def _make_room(self, busy: set[WorkerPool]) -> None:
        """Close idle pools (GPU ones first) while the cluster lacks what this stage's new
        pools need: a judge's vLLM workers give the GPU back to the next pool model."""
        starting = [p for p in busy if not p.started]
        if not starting:
            return
        need = {k: sum(p.resources[k] for p in starting) for k in ("CPU", "GPU")}
        idle = sorted((p for p in self.pools.values() if p.started and p not in busy),
                      key=lambda p: -p.gpus)
        for pool in idle:
            free = ray.available_resources()
            if all(free.get(k, 0.0) >= v for k, v in need.items() if v):
                return
            log.info("ray: closing the idle workers of %s to make room", pool.spec.name)
            await pool.close()

    async def aclose(self) -> None:
        for pool in self.pools.values():
            await pool.close()
        for budget in self.budgets:
            with contextlib.suppress(Exception):
                ray.kill(budget)
        self.budgets.clear()
        if self._owns_connection:
            ray.shutdown()
            self._owns_connection = self._connected = False


def _missing(reqs: Iterable[ChatRequest], store: Store, counts: StageCounts,
             out: dict[str, ChatResult] | None) -> list[ChatRequest]:
    """The requests of one model that the store has no answer for (stored rows go to ``out``)."""
    unique = list({r.key: r for r in reqs}.values())
    counts.total += len(unique)
    answered: set[str] = set()
    for i in range(0, len(unique), 10_000):  # look keys up in slices: bounded memory
        for k, res in store.get_many(r.key for r in unique[i : i + 10_000]).items():
            if out is not None:
                out[k] = res
            if res.ok:
                counts.cached += 1
                answered.add(k)
    return [r for r in unique if r.key not in answered]


async def _all(jobs: Sequence[Awaitable[Any]]) -> list[Any]:
    """Await every job; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(j) for j in jobs]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    finally:
        for t in tasks:
            if not t.done():
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for t in tasks:
        if not t.cancelled() and t.exception() is not None:
            raise t.exception()  # type: ignore[misc]
    return [t.result() for t in tasks]


__all__ = ["RayExecutor", "RemoteBackend", "WorkerPool", "connect"]
