"""``prefsynth curate CONFIG --output DIR``: the files, bad input as one line, and a changed
threshold that leaves the stored answers of the prompts that stay untouched."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from prefsynth.cli import main
from tests.conftest import ROOT, fake_config, write_config

DATA = ROOT / "tests" / "data"
EVAL = {"path": str(DATA / "evals" / "mini_eval.jsonl"), "field": "question", "id_field": "id"}


def _config(tmp_path: Path, curate: Any, prompts: Path = DATA / "curate_prompts.jsonl",
            name: str = "config.yaml") -> Path:
    cfg = fake_config(tmp_path, curate=curate)
    cfg["prompts"] = {"path": str(prompts), "messages_field": "messages"}
    return write_config(tmp_path, cfg, name)


def test_curate_writes_prompts_and_removal_table(tmp_path: Path, capsys) -> None:
    cfg = _config(tmp_path, {"near_dup": {}, "decontaminate": {"evals": [EVAL]}})
    assert main(["curate", str(cfg), "--output", str(tmp_path / "cur")]) == 0
    out = capsys.readouterr().out
    assert "prompts: 14 read, 1 exact duplicates removed" in out
    assert "eval overlap with mini_eval: 5 removed" in out
    assert "near duplicates: 1 removed" in out and "kept: 7 ->" in out
    kept = (tmp_path / "cur" / "prompts.jsonl").read_bytes().splitlines()
    removed = [orjson.loads(x) for x in (tmp_path / "cur" / "removed.jsonl").read_bytes().split()]
    assert len(kept) == 7 and len(removed) == 6
    assert (tmp_path / "cur" / "curation.md").read_text().startswith("## Prompt curation")


BAD = [
    ("field missing", {"decontaminate": {"evals": [{**EVAL, "field": "prompt"}]}}, 3,
     r"mini_eval.jsonl:1: missing field 'prompt' \(curate.decontaminate.evals.0.field\)"),
    ("threshold 0", {"decontaminate": {"evals": [EVAL], "threshold": 0}}, 2,
     r"config.yaml: curate.decontaminate.threshold: Input should be greater than 0"),
    ("threshold > 1", {"decontaminate": {"evals": [EVAL], "threshold": 1.5}}, 2,
     r"config.yaml: curate.decontaminate.threshold: Input should be less than or equal to 1"),
    ("near-dup threshold", {"near_dup": {"threshold": -0.1}}, 2,
     r"curate.near_dup.threshold: Input should be greater than 0"),
    ("no evals", {"decontaminate": {"evals": []}}, 2, r"curate.decontaminate.evals: List should"),
    ("no field", {"decontaminate": {"evals": [{"path": "x.jsonl"}]}}, 2,
     r"curate.decontaminate.evals.0.field: Field required"),
    ("two sources", {"sample": {"total": 3, "per_source": {"chat": 1}}}, 2,
     r"curate.sample: give exactly one of per_source or total"),
    ("unknown source", {"sample": {"per_source": {"chats": 1}}}, 3,
     r"curate.sample.per_source.chats: no prompt has source 'chats'"),
    ("no curate section", None, 2, r"config.yaml: curate: missing"),
]


@pytest.mark.parametrize(("what", "curate", "code", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line(tmp_path: Path, capsys, what: str, curate: Any, code: int,
                               message: str) -> None:
    cfg = _config(tmp_path, curate)
    rc = main(["curate", str(cfg), "--output", str(tmp_path / "cur")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code and len(err) == 1, err
    assert re.search(message, err[0]), err[0]


def test_empty_eval_set(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cfg = _config(tmp_path, {"decontaminate": {"evals": [{"path": str(empty), "field": "q"}]}})
    assert main(["curate", str(cfg), "--output", str(tmp_path / "cur")]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no eval instances with text (curate.decontaminate.evals.0)" in err[0]


def _generate_counts(stdout: str) -> tuple[int, int]:
    m = re.search(r"^generate: (\d+) requests, (\d+) from store", stdout, re.M)
    assert m, stdout
    return int(m[1]), int(m[2])


def test_changed_threshold_reuses_stored_answers(tmp_path: Path, capsys) -> None:
    """Curate, run, loosen the threshold (one more prompt stays), curate and run again: every
    prompt that stayed is answered from the store; only the new one is asked."""
    runs = []
    for threshold in (0.5, 0.99):
        cur = tmp_path / f"cur-{threshold}"
        cfg = _config(tmp_path, {"near_dup": {},
                                 "decontaminate": {"evals": [EVAL], "threshold": threshold}})
        assert main(["curate", str(cfg), "--output", str(cur)]) == 0
        run_cfg = fake_config(tmp_path, store=str(tmp_path / "store.sqlite"))
        run_cfg["prompts"] = {"path": str(cur / "prompts.jsonl"), "messages_field": "messages"}
        capsys.readouterr()
        assert main(["run", str(write_config(tmp_path, run_cfg, "run.yaml"))]) == 0
        runs.append(_generate_counts(capsys.readouterr().out))
    assert runs[0] == (7 * 4, 0)
    assert runs[1] == (8 * 4, 7 * 4)  # near-copy-robe (95% covered) now stays


def test_run_curates_before_the_model_mix(tmp_path: Path, capsys) -> None:
    """`prefsynth run` with a `curate` section: removed prompts reach no model and no output
    file; run.json and the card say what was removed; status sees the same prompts."""
    from prefsynth.testing import FakeBackend

    cfg = _config(tmp_path, {"near_dup": {}, "decontaminate": {"evals": [EVAL]}})
    assert main(["curate", str(cfg), "--output", str(tmp_path / "cur")]) == 0
    kept = [orjson.loads(x)["id"] for x in (tmp_path / "cur" / "prompts.jsonl").read_bytes()
            .splitlines()]
    removed = [orjson.loads(x)["prompt_id"] for x in
               (tmp_path / "cur" / "removed.jsonl").read_bytes().splitlines()]
    assert kept and removed
    FakeBackend.calls.clear()
    capsys.readouterr()
    assert main(["run", str(cfg)]) == 0
    assert sum(FakeBackend.calls.values()) > 0
    out = tmp_path / "out"
    ann = [orjson.loads(x) for x in (out / "annotations.jsonl").read_bytes().splitlines()]
    assert {a["prompt_id"] for a in ann} == set(kept)
    facts = orjson.loads((out / "run.json").read_bytes())
    assert facts["curation"]["kept"] == len(kept)
    assert facts["prompts"]["kept"] >= len(kept)
    card = (out / "README.md").read_text()
    assert "## Prompt curation" in card and "eval overlap" in card
    capsys.readouterr()
    assert main(["status", str(cfg)]) == 0
    lines = [ln.split() for ln in capsys.readouterr().out.splitlines()
             if ln.startswith("generate")]
    assert sum(int(ln[2]) for ln in lines) == 4 * len(kept)  # every kept prompt, all done
