"""Fixtures of the backend tests: the loopback Anthropic API both Anthropic backends talk to, and
a store in a temporary folder (the batch backends keep their batches in it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from prefsynth.core.store import Store
from tests.servers.anthropic_api import KEY_ENV, SENTINEL, AnthropicAPI, serve


@pytest.fixture
def anthropic_api(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[AnthropicAPI, str]]:
    """The server and its root URL, with ``SENTINEL`` as the key in ``KEY_ENV``."""
    monkeypatch.setenv(KEY_ENV, SENTINEL)
    server = AnthropicAPI(api_key=SENTINEL)
    with serve(server) as url:
        yield server, url


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store(tmp_path / "store.sqlite") as s:
        yield s
