"""A run is safe to kill, to start twice, and to trust: the real CLI in a subprocess against a
scripted OpenAI-compatible server on loopback (``tests/servers/chat_server.py``).

* SIGKILL loses no answer the client had received (each is committed as it arrives, within
  half a second), in the generation and the judge stage;
* a second run on a store another run holds fails at once (exit 6) naming the first, while
  ``status``, ``estimate`` and ``report`` keep working; a killed run's lock never blocks;
* an HTTP 401/403 stops the run (exit 5) in one line; a run that ends with failed requests
  exits 76, says how many to retry, and marks its output partial.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from prefsynth.cli import main
from tests.conftest import write_config
from tests.servers.chat_server import ChatServer, Reply, last_user_text

PROMPTS = ["Name a colour.", "Name a fruit. SLOW", "Name a river.", "Name a city. SLOW"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def server() -> Iterator[ChatServer]:
    with ChatServer() as s:
        yield s


def _config(tmp_path: Path, url: str, prompts: list[str] = PROMPTS) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
                            for i, p in enumerate(prompts)))
    endpoint = {"backend": "openai", "base_url": url, "max_retries": 0, "timeout": 120.0,
                "max_concurrency": 8}
    cfg: dict[str, Any] = {
        "name": "safety",
        "seed": 1,
        "prompts": {"path": str(path)},
        "models": [{"name": "a", "model": "ma", **endpoint}, {"name": "b", "model": "mb", **endpoint}],
        "responses_per_prompt": 2,
        "judge": {"name": "judge", "model": "mj", **endpoint},
        "output": str(tmp_path / "out"),
    }
    return write_config(tmp_path, cfg)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefsynth.cli", *args]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cli(*args), capture_output=True, text=True, env=ENV, timeout=timeout)


def _main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI in this process (quicker than a subprocess where no kill is needed)."""
    capsys.readouterr()
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def _wait(cond: Callable[[], bool], proc: subprocess.Popen[bytes], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert proc.poll() is None, "the run ended early"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _settle(count: Callable[[], int], proc: subprocess.Popen[bytes],
            quiet: float = 1.0) -> None:
    """Wait until ``count()`` (of the server's answers or requests) has not moved for
    ``quiet`` seconds."""
    seen, since = count(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert proc.poll() is None, "the run ended early"
        time.sleep(0.05)
        if count() != seen:
            seen, since = count(), time.monotonic()


def _asked(server: ChatServer) -> int:
    return sum(server.seen.values())


def _hang_if(word: str, judge: bool | None = None) -> Callable[[dict[str, Any]], Reply]:
    """Requests whose last message holds ``word`` hang for a minute (only judge requests, or
    only generation requests, when ``judge`` says so); the rest answer at once."""
    def rule(body: dict[str, Any]) -> Reply:
        text = last_user_text(body)
        is_judge = "<text 1>" in text
        if word in text and (judge is None or judge == is_judge):
            return Reply(delay=60.0)
        return Reply()
    return rule


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["generate", "judge"])
def test_sigkill_loses_no_answer_the_client_received(tmp_path: Path, server: ChatServer,
                                                     stage: str) -> None:
    server.rule = _hang_if("SLOW", judge=stage == "judge")
    cfg = _config(tmp_path, server.base_url)
    proc = subprocess.Popen(_cli("run", str(cfg)), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    gens = 8  # 4 prompts x 2 models; the SLOW prompts' requests hang in the stage tested
    try:
        _wait(lambda: server.count_answered() > (gens if stage == "judge" else 0), proc)
        _settle(server.count_answered, proc)  # the fast answers are in the client; the
        # slow ones never come
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    received = list(server.answered)
    # a streamed run judges the fast prompts while the slow ones' generations hang
    assert len(received) > gens if stage == "judge" else len(received) >= gens // 2

    server.rule = lambda body: Reply()
    rerun = _run("run", str(cfg))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert {d: server.seen[d] for d in received} == dict.fromkeys(received, 1)


@pytest.mark.slow
def test_a_second_run_on_a_held_store_fails_at_once(tmp_path: Path, server: ChatServer,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, server.base_url)
    rc, _, err = _main(capsys, "run", str(cfg), "--limit", "1")  # an output for `report`
    assert rc == 0, err[-2000:]
    server.rule = lambda body: Reply(delay=60.0)
    holder = subprocess.Popen(_cli("run", str(cfg)), env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: _asked(server) > len(server.answered), holder)
        _settle(lambda: _asked(server), holder)  # every request the holder will send is out
        asked = _asked(server)
        t0 = time.monotonic()
        rc, _, err = _main(capsys, "run", str(cfg))
        assert rc == 6 and time.monotonic() - t0 < 10
        (line,) = err.strip().splitlines()
        assert "another run holds this store" in line and f"pid {holder.pid} on " in line
        assert _asked(server) == asked  # the second run asked nothing
        for args in (("status", str(cfg)), ("estimate", str(cfg)),
                     ("report", str(tmp_path / "out"))):
            rc, _, err = _main(capsys, *args)
            assert rc == 0, (args, err[-2000:])
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    server.rule = lambda body: Reply()
    rc, _, err = _main(capsys, "run", str(cfg))  # the killed run's lock file does not block
    assert rc == 0, err[-2000:]


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_stops_the_run_in_one_line(tmp_path: Path, server: ChatServer,
                                                 capsys: pytest.CaptureFixture[str],
                                                 status: int) -> None:
    server.rule = lambda body: Reply(status=status)
    rc, _, err = _main(capsys, "run", str(_config(tmp_path, server.base_url)))
    assert rc == 5, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("prefsynth: error: models.") and f"HTTP {status}" in last
    assert "Traceback" not in err
    assert server.statuses[status] <= 16  # stopped: not every request of the run was sent
    assert not (tmp_path / "out" / "run.json").exists()


def test_failed_requests_exit_76_and_mark_the_output_partial(
        tmp_path: Path, server: ChatServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.rule = lambda body: Reply(status=500) if "SLOW" in last_user_text(body) else Reply()
    cfg = _config(tmp_path, server.base_url)
    rc, out, err = _main(capsys, "run", str(cfg))
    assert rc == 76, err[-2000:]
    assert "rerun to retry 4 failed requests" in out
    facts = json.loads((tmp_path / "out" / "run.json").read_text())
    assert facts["complete"] is False and facts["failed_requests"] == 4
    # the data it has is written: the two prompts without responses are counted drops
    assert facts["dropped"]["generation_failed"] == 2
    assert facts["pairs"] + sum(facts["dropped"].values()) == 4
    assert "partial: 4 failed requests" in (tmp_path / "out" / "README.md").read_text()
    answered = list(server.answered)

    server.rule = lambda body: Reply()
    rc, _, err = _main(capsys, "run", str(cfg))
    assert rc == 0, err[-2000:]
    facts = json.loads((tmp_path / "out" / "run.json").read_text())
    assert facts["complete"] is True and facts["failed_requests"] == 0
    assert "generation_failed" not in facts["dropped"]
    assert facts["pairs"] + sum(facts["dropped"].values()) == 4
    assert all(server.seen[d] == 1 for d in answered)  # only the failed ones asked again
    assert "Partial run" not in (tmp_path / "out" / "README.md").read_text()
