"""Kill a real run (SIGKILL, embedded model) and run it again: it finishes without repeating
any answered request, and the dataset equals an uninterrupted run's with the same seed."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

LIMIT = "5"


def _config(tmp_path: Path, name: str) -> Path:
    cfg = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    cfg["prompts"]["path"] = str(ROOT / "examples" / "prompts.jsonl")
    for m in cfg["models"]:
        m["params"]["max_tokens"] = 48
    cfg["judge"]["params"]["max_tokens"] = 200
    cfg["output"] = str(tmp_path / name)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefsynth.cli", *args]


def _rows(store: Path) -> int:
    if not store.exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{store}?mode=ro", uri=True, timeout=5)
        n = db.execute("SELECT COUNT(*) FROM requests WHERE error IS NULL AND stage='judge'").fetchone()[0]
        db.close()
        return int(n)
    except sqlite3.Error:
        return 0


def _counts(stdout: str, stage: str) -> tuple[int, int, int]:
    m = re.search(rf"^{stage}: (\d+) requests, (\d+) from store, (\d+) answered", stdout, re.M)
    assert m, stdout
    return int(m[1]), int(m[2]), int(m[3])


def _pairs(out: Path) -> list[dict]:
    return pq.read_table(out / "pairs" / "train.parquet").to_pylist()


def test_sigkill_and_resume_equals_uninterrupted(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # the uninterrupted reference run
    ref = subprocess.run(_cli("run", str(_config(tmp_path, "ref")), "--limit", LIMIT),
                         capture_output=True, text=True, env=env, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]

    # the same job, killed with SIGKILL once a few judge answers are committed
    cfg = _config(tmp_path, "killed")
    store = tmp_path / "killed" / ".prefsynth" / "store.sqlite"
    proc = subprocess.Popen(_cli("run", str(cfg), "--limit", LIMIT), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 500
    while _rows(store) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    db = sqlite3.connect(store)
    answered_gen = db.execute("SELECT COUNT(*) FROM requests WHERE stage='generate' AND error IS NULL").fetchone()[0]
    answered_judge = db.execute("SELECT COUNT(*) FROM requests WHERE stage LIKE 'judge%' AND error IS NULL").fetchone()[0]
    db.close()
    assert answered_judge >= 3

    resumed = subprocess.run(_cli("run", str(cfg), "--limit", LIMIT), capture_output=True,
                             text=True, env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    total, cached, new = _counts(resumed.stdout, "generate")
    assert (cached, new) == (answered_gen, total - answered_gen)  # nothing answered is asked again
    jtotal, jcached, jnew = _counts(resumed.stdout, "judge")
    assert jcached >= answered_judge - 0 and jcached + jnew <= jtotal

    # same seed, same dataset — pairs, ratings, models, texts
    assert _pairs(tmp_path / "killed") == _pairs(tmp_path / "ref")
    ann_ref = pq.read_table(tmp_path / "ref" / "annotations" / "train.parquet").to_pylist()
    ann_res = pq.read_table(tmp_path / "killed" / "annotations" / "train.parquet").to_pylist()
    assert ann_ref == ann_res

    # and a third run costs nothing
    again = subprocess.run(_cli("run", str(cfg), "--limit", LIMIT), capture_output=True,
                           text=True, env=env, timeout=600)
    total, cached, new = _counts(again.stdout, "generate")
    assert (cached, new) == (total, 0)
    import datasets

    ds = datasets.load_dataset("parquet", data_dir=str(tmp_path / "killed" / "pairs"))["train"]
    assert ds.num_rows == len(_pairs(tmp_path / "ref"))
