from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from prefsynth.core.keys import request_key
from prefsynth.core.store import Store
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
