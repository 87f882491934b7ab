"""Backends, registered by name. Heavy imports stay inside each backend's module.

The registry maps a name to ``"module:factory"``; the module is imported only when a config
uses that backend, so ``pip install prefsynth`` works without torch, vLLM, or the openai and anthropic SDKs.
Third-party backends register through the ``prefsynth.backends`` entry-point group.

``validate`` checks what a model spec asks of its backend (its options, the endpoint keys it
sets, what ``check_spec`` refuses) before any work: ``create_backend`` and the request keys (``core.keys.identity_of``,
so ``status`` and ``estimate`` too) go through it.
"""

from __future__ import annotations

import functools
import importlib
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import orjson

from prefsynth.backends.base import Backend, BackendOptions, parse_options
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


#: classes already imported, by name: ``identity_of`` asks once per request, and scanning the
#: entry points costs milliseconds
_classes: dict[str, Any] = {}


def register(name: str, target: str) -> None:
    """Make ``name`` select the backend class at ``"module:Class"`` (for this process)."""
    _REGISTERED[name] = target
    _classes.pop(name, None)
    _entry_points.cache_clear()


@functools.cache
def _entry_points() -> dict[str, str]:
    # reading package metadata costs milliseconds: once per process, not once per request key
    return {ep.name: ep.value for ep in entry_points(group="prefsynth.backends")}


def available() -> dict[str, str]:
    """All backend names: built-ins, run-time registrations, then entry points."""
    return {**_entry_points(), **BUILTIN, **_REGISTERED}


def backend_class(name: str) -> Any:
    """The class a backend name selects, imported on first use (then remembered)."""
    cls = _classes.get(name)
    if cls is not None:
        return cls
    target = _REGISTERED.get(name) or BUILTIN.get(name)
    if target is None:  # only now scan the entry points (slow)
        names = available()
        if name not in names:
            raise ConfigError(f"unknown backend {name!r}; known: {', '.join(sorted(names))}")
        target = names[name]
    module, _, attr = target.partition(":")
    cls = _classes[name] = getattr(importlib.import_module(module), attr)
    return cls


#: specs already checked: (class, where, endpoint keys set, options) -> parsed options and
#: their keyed part. ``identity_of`` runs once per request: after the first, a dict lookup.
_checked: dict[tuple[Any, ...], tuple[BackendOptions, dict[str, Any]]] = {}


def _fingerprint(options: dict[str, Any]) -> bytes | str:
    try:
        return orjson.dumps(options, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS)
    except TypeError:  # a value JSON cannot hold (a Path from code): its repr will do
        return repr(sorted(options.items(), key=lambda kv: str(kv[0])))


def _checked_spec(spec: ModelSpec) -> tuple[BackendOptions, dict[str, Any]]:
    try:
        cls = backend_class(spec.backend)
    except ConfigError as e:
        raise ConfigError(f"{spec.where}.backend: {e}") from None
    used = spec.model_fields_set.intersection(spec.ENDPOINT_FIELDS)
    memo = (cls, spec.backend, spec.where, frozenset(used), _fingerprint(spec.options))
    done = _checked.get(memo)
    if done is not None:
        return done
    unused = [f for f in spec.ENDPOINT_FIELDS if f in used and f not in cls.endpoint_fields]
    if unused:
        raise ConfigError(f"{spec.where}.{unused[0]}: not used by the {spec.backend} backend")
    options = parse_options(cls.Options, spec)
    done = _checked[memo] = (options, options.key_options())
    return done


def validate(spec: ModelSpec) -> BackendOptions:
    """The spec's options parsed by its backend's ``Options`` model, after checking that it
    sets no endpoint key the backend does not use (``models.2.base_url: not used by the
    llamacpp backend``) and what the backend refuses of any spec (``check_spec``: it reads
    more than the options, so it is not memoized). Raises ``ConfigError`` naming the dotted
    field."""
    options = _checked_spec(spec)[0]
    backend_class(spec.backend).check_spec(spec)
    return options


def key_options(spec: ModelSpec) -> dict[str, Any]:
    """The options of ``spec`` that go into its request keys (``BackendOptions.key_options``),
    after ``validate``."""
    return _checked_spec(spec)[1]


def create_backend(spec: ModelSpec, store: Store | None = None) -> Backend:
    """Instantiate the backend a model spec names (imports its module on first use), after
    ``validate``.

    Every backend class is constructed as ``cls(spec, store=store)``; only backends with
    state of their own to persist (the batch backends record batch ids) use the store.
    """
    validate(spec)
    cls = backend_class(spec.backend)
    backend: Backend = cls(spec, store=store)
    return backend


__all__ = [
    "BUILTIN", "Backend", "BackendOptions", "available", "backend_class", "create_backend",
    "key_options", "register", "validate",
]
