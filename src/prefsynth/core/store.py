"""The one crash-safe store: SQLite in WAL mode, one row per model request.

A row is keyed by a hash of everything that determines the answer (backend identity, model,
messages, sampling parameters, seed, sample/attempt index) — see ``core.keys``. Results are
committed as they complete (in small groups, so the hot path does not pay one fsync per
request); a rerun skips every key already answered, so a crash loses at most what was in flight
and a finished run costs nothing to repeat. Failed requests are stored with their error and are
retried by the next run. Parsing and pairing are not in the key: re-pairing calls no model.

The schema evolves through named migrations (``MIGRATIONS``, recorded in ``_migrations``):
a store written by an older prefsynth is migrated on open and keeps every row; one written by
a newer prefsynth is refused in one line, untouched. A run holds ``RunLock`` for as long as it
has the store open, so a second run on the same store fails at once instead of paying twice.

API keys and headers are never passed to the store.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from prefsynth.errors import StoreError
from prefsynth.records import ChatResult, Usage

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no run lock
    fcntl = None  # type: ignore[assignment]

#: One schema step. Migrations run once each, in list order, inside one transaction, and are
#: recorded by name in ``_migrations`` (simonw/llm's scheme). Never edit, rename or reorder a
#: shipped one: append a new one. A store recording a name this list lacks was written by a
#: newer prefsynth and is refused untouched.
Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[tuple[str, Migration]] = []


def migration(fn: Migration) -> Migration:
    MIGRATIONS.append((fn.__name__, fn))
    return fn


@migration
def m001_initial(db: sqlite3.Connection) -> None:
    """The first schema. ``IF NOT EXISTS`` throughout: a store written before migrations
    existed (``meta.schema = 1``) already has these tables and keeps every row."""
    db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL)")
    db.execute("""
        CREATE TABLE IF NOT EXISTS requests (
            key TEXT PRIMARY KEY,
            stage TEXT NOT NULL,
            model TEXT NOT NULL,
            text TEXT,
            finish_reason TEXT,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            error TEXT,
            attempts INTEGER NOT NULL DEFAULT 1,
            updated REAL NOT NULL
        )""")
    db.execute("CREATE INDEX IF NOT EXISTS requests_stage ON requests(stage, model)")
    db.execute("""
        CREATE TABLE IF NOT EXISTS batches (
            batch_id TEXT PRIMARY KEY,
            model TEXT NOT NULL,
            input_file_id TEXT,
            status TEXT NOT NULL,
            keys TEXT NOT NULL,
            info TEXT,
            created REAL NOT NULL,
            updated REAL NOT NULL
        )""")


@migration
def m002_refuse_readers_without_migrations(db: sqlite3.Connection) -> None:
    """prefsynth from before migrations opens a store only when ``meta.schema`` is 1. Raising
    it makes such a version refuse a migrated store in one line instead of writing to a
    schema it does not know. ``meta.schema`` means nothing else from here on."""
    db.execute("INSERT INTO meta VALUES ('schema', '2') ON CONFLICT(k) DO UPDATE SET v='2'")


def migrate(db: sqlite3.Connection, where: str) -> list[str]:
    """Apply the migrations ``db`` lacks, in order, in one transaction; returns their names.
    A store with a migration unknown here is refused before anything is written to it."""
    db.execute("CREATE TABLE IF NOT EXISTS _migrations "
               "(name TEXT PRIMARY KEY, applied REAL NOT NULL)")
    known = [name for name, _ in MIGRATIONS]

    def applied() -> set[str]:
        done = {name for (name,) in db.execute("SELECT name FROM _migrations")}
        unknown = sorted(done - set(known))
        if unknown:
            raise StoreError(f"{where}: written by a newer prefsynth (migration "
                             f"{', '.join(unknown)} unknown here); upgrade prefsynth to open it")
        return done

    if set(known) <= applied():  # the usual open: nothing to write
        return []
    ran: list[str] = []
    with _Tx(db):
        done = applied()  # again under the write lock: another process may have migrated
        for name, fn in MIGRATIONS:
            if name not in done:
                fn(db)
                db.execute("INSERT INTO _migrations VALUES (?, ?)", (name, time.time()))
                ran.append(name)
    return ran


class RunLock:
    """An exclusive lock on a store for one run: ``flock`` on ``<store>.lock``.

    Two runs on one store would both pay for every request and leave files on disk that the
    store disagrees with, so the second is refused at once, naming the first (its pid, host
    and start time, which the holder writes into the file). The OS releases a ``flock`` when
    its holder dies, however it dies: the file a killed run leaves never blocks the next run.
    Readers (``status``, ``estimate``, ``report``) take no lock.
    """

    def __init__(self, store_path: str | Path) -> None:
        self.store = Path(store_path)
        self.path = Path(f"{store_path}.lock")
        self.fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:  # pragma: no cover
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: not ours yet
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = self._describe(os.pread(fd, 4096, 0))
            os.close(fd)
            raise StoreError(f"{self.store}: another run holds this store ({holder}); wait "
                             f"for it or stop it (status, estimate and report still work)"
                             ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        self.fd = fd

    @staticmethod
    def _describe(raw: bytes) -> str:
        try:
            h = json.loads(raw)
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h["started"])))
            return f"pid {int(h['pid'])} on {h['host']}, started {started}"
        except (ValueError, KeyError, TypeError):
            return "a process that is just starting"

    def release(self) -> None:
        if self.fd is not None and fcntl is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
        self.fd = None


class Store:
    """SQLite request store. Not shared across threads; one per process (WAL lets readers in)."""

    def __init__(self, path: str | Path, *, exclusive: bool = False) -> None:
        """Open the store, creating or migrating it. ``exclusive`` (a run): hold the run lock
        (``RunLock``) until ``close``; a store another run holds raises ``StoreError``."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = RunLock(self.path) if exclusive else None
        if self.lock is not None:
            self.lock.acquire()  # before the first read: a refused run touches nothing
        try:
            self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            migrate(self.db, str(self.path))
        except sqlite3.DatabaseError as e:
            self._unlock()
            raise StoreError(f"{self.path}: not a usable prefsynth store ({e})") from None
        except StoreError:
            self._unlock()
            raise

    def _unlock(self) -> None:
        if self.lock is not None:
            self.lock.release()

    # ---- reads -------------------------------------------------------------------------
    def get_many(self, keys: Iterable[str]) -> dict[str, ChatResult]:
        """Every stored row (answered or failed) among ``keys``."""
        out: dict[str, ChatResult] = {}
        keys = list(keys)
        for i in range(0, len(keys), 900):
            chunk = keys[i : i + 900]
            q = (
                "SELECT key, text, finish_reason, prompt_tokens, completion_tokens, error, attempts "
                f"FROM requests WHERE key IN ({','.join('?' * len(chunk))})"
            )
            for k, text, fr, pt, ct, err, att in self.db.execute(q, chunk):
                out[k] = ChatResult(k, text, fr, Usage(pt, ct), err, att)
        return out

    def answered(self, keys: Iterable[str]) -> set[str]:
        return {k for k, r in self.get_many(keys).items() if r.ok}

    def stage_counts(self) -> dict[tuple[str, str], tuple[int, int]]:
        """(stage, model) -> (answered, failed) over the whole store."""
        q = (
            "SELECT stage, model, SUM(error IS NULL), SUM(error IS NOT NULL) "
            "FROM requests GROUP BY stage, model"
        )
        return {(s, m): (int(a), int(f)) for s, m, a, f in self.db.execute(q)}

    def usage_totals(self) -> tuple[int, int]:
        row = self.db.execute(
            "SELECT COALESCE(SUM(prompt_tokens),0), COALESCE(SUM(completion_tokens),0) FROM requests"
        ).fetchone()
        return int(row[0]), int(row[1])

    # ---- writes ------------------------------------------------------------------------
    def put_many(self, results: Sequence[ChatResult], stage: str, models: Sequence[str]) -> None:
        """Commit results in one transaction. An answer never overwrites with a failure."""
        now = time.time()
        rows = [
            (
                r.key, stage, m, r.text, r.finish_reason, r.usage.prompt_tokens,
                r.usage.completion_tokens, r.error, r.attempts, now,
            )
            for r, m in zip(results, models, strict=True)
        ]
        with self._tx():
            self.db.executemany(
                "INSERT INTO requests VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET "
                "text=excluded.text, finish_reason=excluded.finish_reason, "
                "prompt_tokens=excluded.prompt_tokens, completion_tokens=excluded.completion_tokens, "
                "error=excluded.error, attempts=requests.attempts+excluded.attempts, "
                "updated=excluded.updated WHERE requests.error IS NOT NULL",
                rows,
            )

    # ---- batches (openai-batch backend) ------------------------------------------------
    def record_batch(self, batch_id: str, model: str, input_file_id: str | None,
                     keys: Sequence[str], status: str, info: dict[str, Any] | None = None) -> None:
        now = time.time()
        with self._tx():
            self.db.execute(
                "INSERT INTO batches VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(batch_id) DO UPDATE SET "
                "status=excluded.status, info=excluded.info, updated=excluded.updated",
                (batch_id, model, input_file_id, status, orjson.dumps(list(keys)).decode(),
                 orjson.dumps(info or {}).decode(), now, now),
            )

    def batches(self, model: str | None = None) -> list[dict[str, Any]]:
        q = "SELECT batch_id, model, input_file_id, status, keys, info, created, updated FROM batches"
        args: tuple[Any, ...] = ()
        if model is not None:
            q += " WHERE model=?"
            args = (model,)
        return [
            {"batch_id": b, "model": m, "input_file_id": f, "status": s,
             "keys": orjson.loads(k), "info": orjson.loads(i or "{}"), "created": c, "updated": u}
            for b, m, f, s, k, i, c, u in self.db.execute(q + " ORDER BY created", args)
        ]

    def _tx(self) -> _Tx:
        return _Tx(self.db)

    def close(self) -> None:
        try:
            self.db.close()
        finally:
            self._unlock()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Tx:
    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
