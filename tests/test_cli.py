"""The CLI: every bad input is one line on stderr, a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from prefsynth.cli import main
from tests.conftest import fake_config, write_config


def _prompts(tmp_path: Path, content: bytes) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_bytes(content)
    return path


CASES = [
    ("malformed jsonl", b'{"prompt": "a"}\n{oops\n', {}, 3, "prompts.jsonl:2: malformed JSON"),
    ("missing field", b'{"question": "a"}\n', {}, 3, "prompts.jsonl:1: missing field 'prompt'"),
    ("empty prompt", b'{"prompt": ""}\n', {}, 3, "prompts.jsonl:1: field 'prompt' is empty"),
    ("non-string prompt", b'{"prompt": ["a"]}\n', {}, 3, "must be a string, got list"),
    ("invalid utf-8", b'{"prompt": "\xff\xfe"}\n', {}, 3, "prompts.jsonl:1: invalid UTF-8"),
    ("empty prompt set", b"", {}, 3, "no prompts found"),
    ("unknown key", b'{"prompt": "a"}\n', {"extra_key": 1}, 2, "extra_key: unknown key"),
    ("k > pool", b'{"prompt": "a"}\n', {"responses_per_prompt": 9}, 2, "larger than the pool"),
    ("on-policy not in pool", b'{"prompt": "a"}\n', {"on_policy": "ghost"}, 2,
     "on_policy: 'ghost' is not a model in the pool"),
]


@pytest.mark.parametrize(("what", "content", "over", "code", "message"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input(tmp_path: Path, capsys, what, content, over, code, message) -> None:
    cfg = fake_config(tmp_path, prompts=_prompts(tmp_path, content), **over)
    rc = main(["run", str(write_config(tmp_path, cfg))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code
    assert len(err) == 1 and err[0].startswith("prefsynth: error: ") and message in err[0]


def test_unknown_backend(tmp_path: Path, capsys) -> None:
    cfg = fake_config(tmp_path)
    cfg["models"][0]["backend"] = "carrier-pigeon"
    assert main(["run", str(write_config(tmp_path, cfg))]) == 2
    assert "unknown backend 'carrier-pigeon'" in capsys.readouterr().err


def test_missing_files(tmp_path: Path, capsys) -> None:
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    cfg = fake_config(tmp_path, prompts=tmp_path / "absent.jsonl")
    assert main(["run", str(write_config(tmp_path, cfg))]) == 3
    assert "absent.jsonl: prompt file not found" in capsys.readouterr().err


def test_missing_api_key_fails_before_work(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("PREFSYNTH_TEST_KEY", raising=False)
    cfg = fake_config(tmp_path)
    cfg["judge"] = {"name": "gpt", "backend": "openai", "model": "gpt-4o",
                    "api_key_env": "PREFSYNTH_TEST_KEY", "base_url": "http://127.0.0.1:9/v1"}
    assert main(["run", str(write_config(tmp_path, cfg))]) == 5
    err = capsys.readouterr().err
    assert "PREFSYNTH_TEST_KEY is not set" in err
    assert not (Path(cfg["output"]) / "pairs").exists()  # nothing ran


def test_run_and_status(tmp_path: Path, capsys) -> None:
    path = write_config(tmp_path, fake_config(tmp_path))
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "generate  a" in out and "pending" in out
    assert main(["run", str(path), "--limit", "8"]) == 0
    out = capsys.readouterr().out
    assert "pairs: " in out and "output: " in out
    assert main(["status", str(path), "--limit", "8"]) == 0
    lines = {ln.split()[0] + " " + ln.split()[1]: ln.split()[2:5]
             for ln in capsys.readouterr().out.splitlines() if ln.startswith(("generate", "judge"))}
    assert lines["judge judge"] == ["32", "0", "0"]
    assert sum(int(v[0]) for k, v in lines.items() if k.startswith("generate")) == 32


def test_no_traceback_from_the_real_entry_point(tmp_path: Path) -> None:
    cfg = fake_config(tmp_path, prompts=_prompts(tmp_path, b'{"prompt": "a"}\n{bad\n'))
    for m in [*cfg["models"], cfg["judge"]]:  # `fake` is not registered in a fresh process
        m["backend"] = "llamacpp"
    proc = subprocess.run([sys.executable, "-m", "prefsynth.cli", "run",
                           str(write_config(tmp_path, cfg))], capture_output=True, text=True)
    assert proc.returncode == 3
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_status_counts_the_same_shard_by_shard(tmp_path: Path) -> None:
    from prefsynth.config import parse_config
    from prefsynth.core.pipeline import run
    from prefsynth.tools.status import compute_status

    raw = fake_config(tmp_path)
    raw["models"][1]["options"] = {"fail_rate": 0.3}
    raw["judge"]["options"] = {"garble_first": True}
    run(parse_config(raw), limit=20)
    whole = compute_status(parse_config(raw))
    sharded = compute_status(parse_config({**raw, "shard_size": 3}))
    assert [(x.stage, x.model, x.done, x.failed, x.pending, dict(x.errors)) for x in whole["lines"]] \
        == [(x.stage, x.model, x.done, x.failed, x.pending, dict(x.errors)) for x in sharded["lines"]]
    assert whole["reasks"] == sharded["reasks"] > 0
    assert whole["dropped_before_judge"] == sharded["dropped_before_judge"]
    gen_b = next(x for x in whole["lines"] if x.model == "b")
    assert gen_b.failed > 0 and gen_b.errors["fake"] == gen_b.failed
