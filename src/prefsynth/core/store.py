"""The one crash-safe store: SQLite in WAL mode, one row per model request.

A row is keyed by a hash of everything that determines the answer (backend identity, model,
messages, sampling parameters, seed, sample/attempt index) — see ``core.keys``. Results are
committed as they complete (in small groups, so the hot path does not pay one fsync per
request); a rerun skips every key already answered, so a crash loses at most what was in flight
and a finished run costs nothing to repeat. Failed requests are stored with their error and are
retried by the next run. Parsing and pairing are not in the key: re-pairing calls no model.

API keys and headers are never passed to the store.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

from prefsynth.errors import StoreError
from prefsynth.records import ChatResult, Usage

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
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
);
CREATE INDEX IF NOT EXISTS requests_stage ON requests(stage, model);
CREATE TABLE IF NOT EXISTS batches (
    batch_id TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    input_file_id TEXT,
    status TEXT NOT NULL,
    keys TEXT NOT NULL,
    info TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
"""


class Store:
    """SQLite request store. Not shared across threads; one per process (WAL lets readers in)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
            row = self.db.execute("SELECT v FROM meta WHERE k='schema'").fetchone()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a usable prefsynth store ({e})") from None
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: store schema {row[0]}, this prefsynth reads {SCHEMA_VERSION}")

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
        self.db.close()

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
