"""Writes ``store_v1.sqlite``: a request store as prefsynth's first schema (meta schema=1)
wrote it, kept so that ``tests/core/test_store.py`` proves every later schema migrates it
without losing an answer. Run once with the code of that schema; never regenerate it with a
newer prefsynth (the point is that the file is old).

    PYTHONPATH=src python tests/data/make_store_v1.py
"""

from __future__ import annotations

from pathlib import Path

from prefsynth.core.store import Store
from prefsynth.records import ChatResult, Usage

HERE = Path(__file__).resolve().parent


def main() -> None:
    path = HERE / "store_v1.sqlite"
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        p.unlink(missing_ok=True)
    with Store(path) as st:
        st.put_many([ChatResult("gen-a", "Paris is the capital.", "stop", Usage(12, 5)),
                     ChatResult("gen-b", "Bonjour.", "length", Usage(9, 3)),
                     ChatResult("gen-c", error="server_error: HTTP 500 (gave up after 3 attempts)",
                                attempts=3)],
                    "generate", ["model-a", "model-b", "model-a"])
        st.put_many([ChatResult("judge-a", '{"rating": 4}', "stop", Usage(80, 7)),
                     ChatResult("judge-b", error="timeout: no answer in 60s")],
                    "judge", ["judge", "judge"])
        st.record_batch("batch_abc", "judge", "file_xyz", ["judge-b"], "in_progress",
                        {"request_counts": {"total": 1}})
        st.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        st.db.execute("PRAGMA journal_mode=DELETE")  # one self-contained file to commit


if __name__ == "__main__":
    main()
