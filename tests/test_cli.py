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
    # issue 9: each of these was a traceback (exit 1)
    ("200,000-deep JSON", b"[" * 200_000 + b"]" * 200_000 + b"\n", {}, 3,
     "prompts.jsonl:1: JSON nested too deeply"),
    ("lone surrogate in prompt", b'{"prompt": "\\ud800"}\n', {}, 3,
     "prompts.jsonl:1: field 'prompt' holds a lone surrogate"),
    ("lone surrogate in id", b'{"prompt": "a", "id": "x\\ud800"}\n', {}, 3,
     "prompts.jsonl:1: field 'id' holds a lone surrogate"),
    ("5,000-digit integer", b'{"prompt": "a", "id": ' + b"1" * 5000 + b"}\n", {}, 3,
     "prompts.jsonl:1: unreadable JSON value"),
    ("kwargs not a dict", b'{"prompt": "a", "instruction_id_list": ["punctuation:no_comma"], '
     b'"kwargs": ["notadict"]}\n', {}, 3,
     "prompts.jsonl:1: instruction_id_list[0]: constraint 'punctuation:no_comma': kwargs must be"),
    ("seed >= 2**64", b'{"prompt": "a"}\n', {"seed": 2**64}, 2,
     "seed: must be an integer from 0 to 2**64 - 1"),
    ("no aspects", b'{"prompt": "a"}\n',
     {"judge": {"name": "j", "backend": "fake", "model": "m", "aspects": []}}, 2,
     "judge.aspects: at least one aspect is needed"),
    ("nested option", b'{"prompt": "a"}\n',
     {"judge": {"name": "j", "backend": "fake", "model": "m", "options": {"x": {"y": 1}}}}, 2,
     "judge.options.x: must be a string, number, boolean or null, got dict"),
]


@pytest.mark.parametrize(("what", "content", "over", "code", "message"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input(tmp_path: Path, capsys, what, content, over, code, message) -> None:
    cfg = fake_config(tmp_path, prompts=_prompts(tmp_path, content), **over)
    rc = main(["run", str(write_config(tmp_path, cfg))])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code
    assert len(err) == 1 and err[0].startswith("prefsynth: error: ") and message in err[0]


def test_unknown_constraint_id_fails_before_any_model_is_paid_for(tmp_path: Path, capsys) -> None:
    """An unknown IFEval id used to exit 3 only after generation and judging had run."""
    from prefsynth.testing import FakeBackend

    rows = b'{"prompt": "a"}\n{"prompt": "b", "instruction_id_list": ["nope:typo"]}\n'
    cfg = fake_config(tmp_path, prompts=_prompts(tmp_path, rows))
    before = sum(FakeBackend.calls.values())
    assert main(["run", str(write_config(tmp_path, cfg))]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"prefsynth: error: {tmp_path / 'prompts.jsonl'}:2: instruction_id_list[0]: "
                   "unknown constraint instruction id: 'nope:typo'"]
    assert sum(FakeBackend.calls.values()) == before
    assert not (tmp_path / "out").exists()


def test_a_folder_named_like_a_prompt_file(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "prompts"
    (folder / "x.jsonl").mkdir(parents=True)
    (folder / "a.jsonl").write_text('{"prompt": "a"}\n', encoding="utf-8")
    assert main(["run", str(write_config(tmp_path, fake_config(tmp_path, prompts=folder)))]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{folder / 'x.jsonl'}: is a folder, not a prompt file" in err[0]


ARG_CASES = [
    (["run", "CFG", "--shard-size", "0"], "argument --shard-size: expected a positive integer, got 0"),
    (["run", "CFG", "--shard-size", "-2"], "argument --shard-size: expected a positive integer"),
    (["run", "CFG", "--limit", "0"], "prefsynth run: argument --limit: expected a positive integer"),
    (["run", "CFG", "--limit", "-1"], "argument --limit: expected a positive integer, got -1"),
    (["run", "CFG", "--limit", "ten"], "argument --limit: expected a positive integer, got 'ten'"),
    (["status", "CFG", "--limit", "0"], "prefsynth status: argument --limit: expected a positive"),
    (["estimate", "CFG", "--sample", "0"], "argument --sample: expected a positive integer"),
    (["estimate", "CFG", "--output-fraction", "nan"], "argument --output-fraction: expected a "
                                                      "number from 0 to 1, got 'nan'"),
    (["report", "OUT", "--sample", "-1"], "argument --sample: expected an integer >= 0"),
    (["run", "CFG", "--output", "AFILE"], "output: AFILE is a file, not a folder"),
    (["run"], "the following arguments are required: config"),
]


@pytest.mark.parametrize(("argv", "message"), ARG_CASES, ids=[" ".join(c[0]) for c in ARG_CASES])
def test_bad_arguments_are_refused_in_one_line(tmp_path: Path, capsys, argv, message) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x", encoding="utf-8")
    cfg = str(write_config(tmp_path, fake_config(tmp_path)))
    subst = {"CFG": cfg, "OUT": str(tmp_path), "AFILE": str(afile)}
    try:
        rc = main([subst.get(a, a) for a in argv])
    except SystemExit as e:  # argparse exits itself
        rc = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("prefsynth: error: ")
    assert message.replace("AFILE", str(afile)) in err[0]
    assert not (tmp_path / "out").exists()


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


_ENTRY = "import sys, prefsynth.testing; from prefsynth.cli import main; sys.exit(main())"


@pytest.mark.parametrize(("prompts", "config_text", "args", "code", "message"), [
    (b"[" * 200_000 + b"]" * 200_000 + b"\n", None, [], 3, "prompts.jsonl:1: JSON nested too deeply"),
    (b'{"prompt": "\\ud800"}\n', None, [], 3, "field 'prompt' holds a lone surrogate"),
    (b'{"prompt": "a"}\n', "a: &a [1, 2]\nb: [*a, *a]\n", [], 2,
     "line 2 invalid YAML: aliases (*a) are not supported"),
    (b'{"prompt": "a"}\n', None, ["--limit", "0"], 2, "argument --limit: expected a positive"),
], ids=["deep-json", "surrogate", "yaml-alias", "limit-0"])
def test_no_traceback_from_a_real_process(tmp_path: Path, prompts, config_text, args, code,
                                          message) -> None:
    """Through a real interpreter, with the fake backend registered as a plugin would be."""
    path = write_config(tmp_path, fake_config(tmp_path, prompts=_prompts(tmp_path, prompts)))
    if config_text is not None:
        path.write_text(config_text + path.read_text(encoding="utf-8"), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-c", _ENTRY, "run", str(path), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("prefsynth: error: ") and message in lines[0]


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
    assert whole.lines() == sharded.lines()
    assert whole.summary.reasks == sharded.summary.reasks > 0
    assert whole.summary.dropped == sharded.summary.dropped
    gen_b = next(c for stage, model, c in whole.lines() if model == "b")
    assert gen_b.failed > 0 and gen_b.errors["fake"] == gen_b.failed


_FIRST_REQUEST = """
import sys
seen = []
def hook(event, args):
    if event == "socket.connect" and not seen:  # the run's first request
        seen.append(sorted(m for m in sys.modules if "." not in m or m.startswith("prefsynth.")))
sys.addaudithook(hook)
from prefsynth.cli import main
code = main(sys.argv[1:])
print(" ".join(seen[0]) if seen else "no request")
sys.exit(code)
"""


def test_nothing_heavy_is_imported_before_the_first_request(tmp_path: Path,
                                                            monkeypatch) -> None:
    """``backend: openai`` on the default aiohttp transport, in a fresh process: at the first
    request (the first ``socket.connect``) neither the openai SDK (0.3-0.5 s of import) nor
    pandas, pyarrow, datasets or the output writer has been imported."""
    monkeypatch.setenv("PREFSYNTH_TEST_KEY", "sk-test")
    endpoint = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "max_retries": 0,
                "api_key_env": "PREFSYNTH_TEST_KEY"}
    cfg = fake_config(tmp_path, prompts=_prompts(tmp_path, b'{"prompt": "a"}\n'),
                      responses_per_prompt=2)
    cfg["models"] = [{**m, **endpoint} for m in cfg["models"][:2]]
    cfg["judge"] = {**cfg["judge"], **endpoint}
    proc = subprocess.run([sys.executable, "-c", _FIRST_REQUEST, "run",
                           str(write_config(tmp_path, cfg))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 76, proc.stderr[-2000:]  # port 9 refuses: a partial run
    loaded = set(proc.stdout.split())
    assert "prefsynth.backends.openai_compat" in loaded and "aiohttp" in loaded
    heavy = {"openai", "httpx", "httpx2", "pandas", "pyarrow", "datasets", "numpy",
             "prefsynth.output.writer"}
    assert loaded.isdisjoint(heavy), sorted(loaded & heavy)
