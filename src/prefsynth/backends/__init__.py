"""Backends, registered by name. Heavy imports stay inside each backend's module.

The registry maps a name to ``"module:factory"``; the module is imported only when a config
uses that backend, so ``pip install prefsynth`` works without torch, vLLM, or the openai and anthropic SDKs.
Third-party backends register through the ``prefsynth.backends`` entry-point group.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

from prefsynth.backends.base import Backend
from prefsynth.errors import ConfigError

if TYPE_CHECKING:
    from prefsynth.config import ModelSpec
    from prefsynth.core.store import Store

BUILTIN: dict[str, str] = {
    "anthropic": "prefsynth.backends.anthropic_live:AnthropicBackend",
    "anthropic-batch": "prefsynth.backends.anthropic_batch:AnthropicBatchBackend",
    "llamacpp": "prefsynth.backends.llamacpp:LlamaCppBackend",
    "openai": "prefsynth.backends.openai_compat:OpenAIBackend",
    "openai-batch": "prefsynth.backends.openai_batch:OpenAIBatchBackend",
    "vllm": "prefsynth.backends.vllm:VLLMBackend",
}


#: backends registered at run time (``register``): the test suite's fake backend, a notebook's
#: own class. Not shipped in ``BUILTIN``, so a user's config can never select them by accident.
_REGISTERED: dict[str, str] = {}


def register(name: str, target: str) -> None:
    """Make ``name`` select the backend class at ``"module:Class"`` (for this process)."""
    _REGISTERED[name] = target


def available() -> dict[str, str]:
    """All backend names: built-ins, run-time registrations, then entry points."""
    names = {**BUILTIN, **_REGISTERED}
    for ep in entry_points(group="prefsynth.backends"):
        names.setdefault(ep.name, ep.value)
    return names


def backend_class(name: str) -> Any:
    names = available()
    if name not in names:
        raise ConfigError(f"unknown backend {name!r}; known: {', '.join(sorted(names))}")
    module, _, attr = names[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def create_backend(spec: ModelSpec, store: Store | None = None) -> Backend:
    """Instantiate the backend a model spec names (imports its module on first use).

    Every backend class is constructed as ``cls(spec, store=store)``; only backends with
    state of their own to persist (the batch backends record batch ids) use the store.
    """
    cls = backend_class(spec.backend)
    backend: Backend = cls(spec, store=store)
    return backend


__all__ = ["BUILTIN", "Backend", "available", "backend_class", "create_backend", "register"]
