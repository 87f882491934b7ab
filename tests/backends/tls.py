"""A count of the TLS contexts a piece of code makes, for the tests that a transport needing
none builds none (``openai`` and ``anthropic`` under ``transport: aiohttp``)."""

from __future__ import annotations

import ssl
from typing import Any

import pytest


def count_ssl_contexts(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """From now until the test ends, every ``ssl.SSLContext`` made (its arguments). Call it
    after the imports that build contexts of their own (aiohttp builds two on import)."""
    made: list[object] = []
    real = ssl.SSLContext

    class Counting(real):  # type: ignore[misc,valid-type]
        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            made.append(args)
            return real.__new__(cls, *args, **kwargs)

    monkeypatch.setattr(ssl, "SSLContext", Counting)
    return made
