"""The Makefile: each target installs the extras it runs, and a later target installs the rest."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _make(venv: Path, *targets: str) -> list[str]:
    """Run ``make`` with a fake venv whose python only records what it was asked to do."""
    log = venv / "calls.log"
    subprocess.run(["make", "-s", "-C", str(ROOT), f"VENV={venv}", *targets], check=True,
                   capture_output=True, text=True, timeout=60)
    calls = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return [c for c in calls if "install -q -e" in c]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_quickstart_then_test_installs_the_rest(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(f'#!/bin/sh\necho "$*" >> {venv}/calls.log\n', encoding="utf-8")
    py.chmod(0o755)
    assert _make(venv, "install-quickstart") == ["-m pip install -q -e .[local,hf,report]"]
    assert _make(venv, "install-quickstart") == []  # stamped
    assert _make(venv, "install-test") == ["-m pip install -q -e .[local,openai,hf,report,curate,ray,dev]"]
    assert _make(venv, "install-test", "install-quickstart") == []
    dry = subprocess.run(["make", "-n", "-C", str(ROOT), f"VENV={venv}", "quickstart", "test"],
                         check=True, capture_output=True, text=True).stdout
    assert "install" not in dry and "prefsynth run examples/quickstart.yaml" in dry
