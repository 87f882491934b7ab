from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest

from prefsynth.core import store as store_module
from prefsynth.core.keys import request_key
from prefsynth.core.store import MIGRATIONS, RunLock, Store
from prefsynth.errors import StoreError
from prefsynth.records import ChatResult, Usage


def test_key_covers_what_determines_the_answer() -> None:
    ident = {"backend": "openai", "model": "gpt-4o"}
    msgs = [{"role": "user", "content": "hi"}]
    k = request_key(ident, msgs, {"temperature": 1.0, "seed": 1})
    assert k == request_key(dict(ident), list(msgs), {"seed": 1, "temperature": 1.0})
    assert k != request_key(ident, msgs, {"temperature": 1.0, "seed": 2})
    assert k != request_key({**ident, "model": "gpt-4o-mini"}, msgs, {"temperature": 1.0, "seed": 1})
    assert k != request_key(ident, [{"role": "user", "content": "hi!"}], {"temperature": 1.0, "seed": 1})
    assert k != request_key(ident, msgs, {"temperature": 1.0, "seed": 1}, response_format={"x": 1})


def test_put_get_and_failure_never_overwrites_answer(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as st:
        st.put_many([ChatResult("k1", "hello", "stop", Usage(3, 2)),
                     ChatResult("k2", error="HTTP 500")], "generate", ["m", "m"])
        got = st.get_many(["k1", "k2", "k3"])
        assert got["k1"].text == "hello" and got["k1"].usage.completion_tokens == 2
        assert got["k2"].error == "HTTP 500" and not got["k2"].ok
        assert "k3" not in got
        assert st.answered(["k1", "k2"]) == {"k1"}
        # a later failure of an answered key does not erase the answer
        st.put_many([ChatResult("k1", error="timeout")], "generate", ["m"])
        assert st.get_many(["k1"])["k1"].text == "hello"
        # a retried failure is replaced by its answer, attempts accumulate
        st.put_many([ChatResult("k2", "ok now", "stop", attempts=2)], "generate", ["m"])
        r = st.get_many(["k2"])["k2"]
        assert r.ok and r.text == "ok now" and r.attempts == 3
        assert st.stage_counts() == {("generate", "m"): (2, 0)}
        assert st.usage_totals() == (3, 2)


def test_wal_mode_and_persistence(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with Store(path) as st:
        st.put_many([ChatResult("a", "x")], "judge", ["j"])
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with Store(path) as st:
        assert st.get_many(["a"])["a"].text == "x"


def test_many_keys_chunked(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as st:
        results = [ChatResult(f"k{i}", str(i)) for i in range(2500)]
        st.put_many(results, "generate", ["m"] * 2500)
        assert len(st.get_many(f"k{i}" for i in range(3000))) == 2500


def test_corrupt_store_is_a_clean_error(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable prefsynth store"):
        Store(path)


def test_batches_recorded(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as st:
        st.record_batch("batch_1", "judge", "file_1", ["k1", "k2"], "in_progress")
        st.record_batch("batch_1", "judge", "file_1", ["k1", "k2"], "completed", {"n": 2})
        (b,) = st.batches("judge")
        assert b["status"] == "completed" and b["keys"] == ["k1", "k2"] and b["info"] == {"n": 2}


# ---- migrations ------------------------------------------------------------------------

FIXTURE = Path(__file__).resolve().parents[1] / "data" / "store_v1.sqlite"


def _dump(path: Path, table: str) -> list[tuple]:
    db = sqlite3.connect(path)
    try:
        return db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    finally:
        db.close()


def _old_store(tmp_path: Path) -> Path:
    path = tmp_path / "store.sqlite"
    shutil.copyfile(FIXTURE, path)
    return path


def test_store_written_by_schema_1_migrates_without_losing_an_answer(tmp_path: Path) -> None:
    path = _old_store(tmp_path)
    requests, batches = _dump(path, "requests"), _dump(path, "batches")
    assert len(requests) == 5 and len(batches) == 1
    with Store(path) as st:
        got = st.get_many(["gen-a", "gen-b", "gen-c", "judge-a", "judge-b"])
        assert got["gen-a"].text == "Paris is the capital." and got["gen-a"].usage == Usage(12, 5)
        assert got["gen-c"].error is not None and got["gen-c"].attempts == 3
        assert st.answered(got) == {"gen-a", "gen-b", "judge-a"}
        assert [b["batch_id"] for b in st.batches("judge")] == ["batch_abc"]
        # a migrated store takes new answers; a retried failure becomes an answer
        st.put_many([ChatResult("gen-c", "now answered")], "generate", ["model-a"])
        assert st.get_many(["gen-c"])["gen-c"].attempts == 4
    assert _dump(path, "requests")[:2] == requests[:2] and _dump(path, "batches") == batches
    names = [n for n, _ in _dump(path, "_migrations")]
    assert sorted(names) == sorted(n for n, _ in MIGRATIONS)
    # a pre-migration prefsynth reads only meta.schema == 1: it now refuses the store
    assert dict(_dump(path, "meta"))["schema"] == "2"
    with Store(path) as st:  # opening again migrates nothing
        assert store_module.migrate(st.db, str(path)) == []


def test_migrations_run_once_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[str] = []

    def m900_add_note(db: sqlite3.Connection) -> None:
        ran.append("m900")
        db.execute("ALTER TABLE requests ADD COLUMN note TEXT")

    def m901_fill_note(db: sqlite3.Connection) -> None:
        ran.append("m901")
        db.execute("UPDATE requests SET note = 'old'")

    monkeypatch.setattr(store_module, "MIGRATIONS",
                        [*MIGRATIONS, ("m900_add_note", m900_add_note),
                         ("m901_fill_note", m901_fill_note)])
    path = _old_store(tmp_path)
    with Store(path) as st:
        assert st.get_many(["judge-a"])["judge-a"].text == '{"rating": 4}'
    with Store(path):
        pass
    assert ran == ["m900", "m901"]
    assert {row[-1] for row in _dump(path, "requests")} == {"old"}


def test_store_from_a_newer_prefsynth_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with Store(path) as st:
        st.put_many([ChatResult("a", "x")], "judge", ["j"])
        st.db.execute("INSERT INTO _migrations VALUES ('m777_from_the_future', 0)")
    before = (_dump(path, "requests"), _dump(path, "_migrations"), _dump(path, "meta"))
    with pytest.raises(StoreError, match=r"newer prefsynth.*m777_from_the_future") as err:
        Store(path)
    assert "\n" not in str(err.value)
    assert (_dump(path, "requests"), _dump(path, "_migrations"), _dump(path, "meta")) == before


# ---- the run lock ------------------------------------------------------------------------


def test_second_exclusive_open_is_refused_naming_the_holder(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    with Store(path, exclusive=True):
        with pytest.raises(StoreError, match=rf"another run holds this store \(pid {os.getpid()} on "):
            Store(path, exclusive=True)
        with Store(path) as reader:  # status, estimate, report: no lock
            assert reader.get_many(["nothing"]) == {}
    with Store(path, exclusive=True):  # released on close
        pass


def test_a_lock_file_left_by_a_dead_run_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    lock = RunLock(path)
    lock.path.write_text(json.dumps({"pid": 999999, "host": "gone", "started": 0}))
    with Store(path, exclusive=True):
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
