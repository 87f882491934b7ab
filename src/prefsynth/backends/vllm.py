"""The ``vllm`` backend: an in-process ``vllm.LLM`` on the GPU(s) of this machine.

vLLM's throughput comes from continuous batching, so it wants many requests per call: the
executor hands over up to ``batch_size`` (4096) requests at once and runs one call at a time.

* **Lazy.** A run creates every backend before any work, to fail fast on a missing key or
  extra; loading a 70B model takes minutes and the whole GPU, so construction only checks that
  vLLM is installed (``importlib.util.find_spec``, no import) and the engine is built on the
  first ``complete()``. ``aclose()`` shuts the engine down and frees its GPU memory, so pool
  models can run one after another on one GPU.
* **One engine on the GPU at a time.** All in-process vLLM work in a process is serialised
  by one lock, and loading a model unloads another backend's engine first (logged): two
  engines sized by ``gpu_memory_utilization`` would not fit together. Drive vLLM models one
  after another; interleaving their batches would reload engines over and over.
* **Per request, never per batch.** Every request gets its own ``SamplingParams`` with its own
  ``seed``, so an answer does not depend on what else was in the batch (a resumed run gives
  the answers of an uninterrupted one). A prompt that does not fit ``max_model_len`` (counted
  with the model's tokenizer and chat template before submitting) becomes that request's
  error; ``max_tokens`` is clamped to the room left. If vLLM still rejects a batch, it is
  split in halves until the offending request is isolated, so one bad request costs one
  error, never the batch. Only a dead engine raises (``BackendError``).
* **Structured output** uses vLLM's own constrained decoding: ``StructuredOutputsParams``
  (``SamplingParams.structured_outputs``, vLLM >= 0.10.2) or, on older versions,
  ``GuidedDecodingParams`` (``SamplingParams.guided_decoding``, removed in 0.12).

Options (``VLLMOptions``): ``batch_size`` (4096); every other option set is passed to
``vllm.LLM``: ``tensor_parallel_size``, ``gpu_memory_utilization``, ``max_model_len``,
``dtype``, ``quantization``, ``enable_prefix_caching``... Those that change answers
(``max_model_len``, ``dtype``, ``quantization``, ``revision``, ``tokenizer``...) are part of
the request key. Any other ``LLM``/``EngineArgs`` keyword goes under ``engine_args``, which is
keyed as a whole (prefsynth cannot tell what it changes); it and ``hf_overrides`` are
written as JSON text, since config options are scalars: ``engine_args: '{"swap_space": 8}'``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib.util
import logging
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from pydantic import Field, field_validator

from prefsynth.backends.base import (
    BackendOptions,
    BaseBackend,
    ResultSink,
    key_option,
    parse_options,
)
from prefsynth.config import ModelSpec
from prefsynth.errors import BackendError, ConfigError, MissingExtraError
from prefsynth.records import ChatRequest, ChatResult, Usage

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = 4096
#: serialises every in-process engine's load, generate and free (one GPU, one engine)
_GPU_LOCK = threading.RLock()
#: the backend whose engine is loaded now, if any
_resident: VLLMBackend | None = None
#: exception class names after which the engine is unusable: splitting the batch won't help
_FATAL = {"EngineDeadError", "OutOfMemoryError"}


def vllm_installed() -> bool:
    """Whether ``import vllm`` would find a package, without importing it (slow, and it
    initialises CUDA). A module already in ``sys.modules`` counts (tests inject a fake)."""
    if "vllm" in sys.modules:
        return sys.modules["vllm"] is not None
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def structured_kwargs(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The ``SamplingParams`` keyword that constrains output to a JSON schema, for the vLLM
    installed: ``structured_outputs`` (new) or ``guided_decoding`` (before 0.12)."""
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:
        pass
    else:
        return {"structured_outputs": StructuredOutputsParams(json=dict(schema))}
    try:
        from vllm.sampling_params import GuidedDecodingParams
    except ImportError:
        raise BackendError("vllm: this vLLM version has neither StructuredOutputsParams nor "
                           "GuidedDecodingParams; use judge.mode: text") from None
    return {"guided_decoding": GuidedDecodingParams(json=dict(schema))}


def sampling_kwargs(req: ChatRequest, max_tokens: int | None = None) -> dict[str, Any]:
    """``SamplingParams`` keywords for one request. ``max_tokens`` overrides the request's
    (clamped to the context left); vLLM's own default (16) is never used by accident."""
    p = req.params
    kw: dict[str, Any] = {
        "temperature": float(p.get("temperature", 1.0)),
        "top_p": float(p.get("top_p", 1.0)),
        "max_tokens": int(max_tokens if max_tokens is not None else p.get("max_tokens") or 512),
        "seed": p.get("seed"),
        "stop": list(p["stop"]) if p.get("stop") else None,
    }
    if req.response_format is not None:
        schema = req.response_format.get("schema", req.response_format)
        kw.update(structured_kwargs(schema))
    return kw


def _prompt_len(tokenizer: Any, messages: list[dict[str, str]]) -> int | None:
    """Tokens of the chat-templated prompt, or ``None`` when the template cannot be applied
    here (vLLM then decides, and a failure is isolated by splitting the batch)."""
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception:  # tokenizers raise anything from ValueError to jinja errors
        return None
    if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):  # transformers 5 returns a dict
        ids = ids["input_ids"]
    try:
        return len(ids)
    except TypeError:
        return None


def _result(req: ChatRequest, out: Any) -> ChatResult:
    """One vLLM ``RequestOutput`` as a ``ChatResult`` (finish reason and token usage)."""
    outputs = getattr(out, "outputs", None) or []
    if not outputs:
        return ChatResult(req.key, error="vllm: no output for this request")
    first = outputs[0]
    reason = getattr(first, "finish_reason", None)
    usage = Usage(len(getattr(out, "prompt_token_ids", None) or []),
                  len(getattr(first, "token_ids", None) or []))
    if reason == "abort":
        return ChatResult(req.key, finish_reason=reason, usage=usage,
                          error="vllm: request aborted")
    return ChatResult(req.key, text=first.text or "", finish_reason=reason or "stop", usage=usage)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


class VLLMOptions(BackendOptions):
    """``vllm`` options. ``key_option`` fields change answers (the context that decides
    which prompts fit, weights, numerics, tokenizer, the generation defaults vLLM reads from
    the model); the others are placement and speed. Set ones reach ``vllm.LLM`` as given."""

    batch_size: int = Field(DEFAULT_BATCH_SIZE, ge=1)  # requests per call, not for vLLM
    max_model_len: int | None = key_option(None, ge=1)
    dtype: str | None = key_option(None)
    quantization: str | None = key_option(None)
    kv_cache_dtype: str | None = key_option(None)
    revision: str | None = key_option(None)
    tokenizer: str | None = key_option(None)
    tokenizer_revision: str | None = key_option(None)
    tokenizer_mode: str | None = key_option(None)
    generation_config: str | None = key_option(None)
    hf_overrides: dict[str, Any] | None = key_option(None)
    load_format: str | None = key_option(None)
    seed: int | None = key_option(None)
    #: any other ``vllm.LLM`` keyword; keyed as a whole, since its effect is unknown here
    engine_args: dict[str, Any] = key_option({})
    tensor_parallel_size: int | None = Field(None, ge=1)
    pipeline_parallel_size: int | None = Field(None, ge=1)
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1)
    enforce_eager: bool | None = None
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    max_num_seqs: int | None = Field(None, ge=1)

    @field_validator("hf_overrides", "engine_args", mode="before")
    @classmethod
    def _json_object(cls, value: Any) -> Any:
        """Config options are scalars (a YAML mapping there is refused), so the two
        structured settings are written as JSON text: ``engine_args: '{"swap_space": 8}'``."""
        if isinstance(value, str):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError as e:
                raise ValueError(f"not a JSON object ({e})") from None
            if not isinstance(value, dict):
                raise ValueError("must be a JSON object")
        return value
    max_num_batched_tokens: int | None = Field(None, ge=1)
    swap_space: float | None = Field(None, ge=0)
    cpu_offload_gb: float | None = Field(None, ge=0)
    download_dir: str | None = None
    trust_remote_code: bool | None = None
    distributed_executor_backend: str | None = None


def engine_kwargs(opts: VLLMOptions) -> dict[str, Any]:
    """The ``vllm.LLM`` keywords of a model's options: those set, and ``engine_args``."""
    return {**opts.model_dump(exclude_unset=True, exclude={"batch_size", "engine_args"}),
            **opts.engine_args}


class VLLMBackend(BaseBackend):
    #: holds a whole GPU: the pipeline runs exclusive backends one after another and closes
    #: each once its requests are done, so several pool models share one GPU in turn
    exclusive = True
    costly_shards = True  # the model reloads for every shard
    """``vllm`` backend: see the module docstring. Constructing it loads nothing."""

    max_concurrency = 1
    Options = VLLMOptions

    @classmethod
    def gpus(cls, spec: ModelSpec) -> float:
        """A Ray worker holding this engine reserves tensor x pipeline parallel GPUs."""
        opts = parse_options(VLLMOptions, spec)
        return float((opts.tensor_parallel_size or 1) * (opts.pipeline_parallel_size or 1))

    def __init__(self, spec: ModelSpec, store: Any = None) -> None:
        opts = parse_options(VLLMOptions, spec)
        if not vllm_installed():
            raise MissingExtraError("the vllm backend", "vllm")
        self.name = spec.name
        self.spec = spec
        self.batch_size = opts.batch_size
        self.engine_kwargs: dict[str, Any] = engine_kwargs(opts)
        self.llm: Any = None  # the vllm.LLM, once loaded
        self.tokenizer: Any = None
        self.max_model_len: int | None = None
        self._lock = asyncio.Lock()

    # --- engine lifetime -------------------------------------------------------------------

    def _load(self) -> Any:
        """Build the engine (called under ``_GPU_LOCK``), unloading another one first."""
        global _resident
        if self.llm is not None:
            return self.llm
        if _resident is not None and _resident is not self:
            log.warning("vllm: unloading %s to load %s (one engine on the GPU at a time)",
                        _resident.name, self.name)
            _resident._free()
        import vllm

        log.info("vllm: loading %s", self.spec.model)
        try:
            llm = vllm.LLM(model=self.spec.model, **self.engine_kwargs)
        except TypeError as e:
            raise ConfigError(f"{self.spec.where}.options: {_first_line(e)}") from None
        except Exception as e:  # vLLM raises ValueError/RuntimeError/OSError/OOM on load
            raise BackendError(f"{self.spec.where}: vLLM cannot load {self.spec.model}: "
                               f"{_first_line(e)}") from None
        self.llm = llm
        _resident = self
        try:
            self.tokenizer = llm.get_tokenizer()
        except Exception:
            self.tokenizer = None
        self.max_model_len = self._context_length(llm)
        return llm

    def _context_length(self, llm: Any) -> int | None:
        for owner in (getattr(llm, "llm_engine", None), llm):
            n = getattr(getattr(owner, "model_config", None), "max_model_len", None)
            if isinstance(n, int) and n > 0:
                return n
        n = self.engine_kwargs.get("max_model_len")
        return int(n) if n else None

    def _free(self) -> None:
        """Shut the engine down and release its GPU memory (idempotent)."""
        global _resident
        with _GPU_LOCK:
            llm, self.llm, self.tokenizer = self.llm, None, None
            if _resident is self:
                _resident = None
            if llm is None:
                return
            log.info("vllm: freeing %s", self.spec.model)
            # newer vLLM: LLM.shutdown(); V1: the engine core (its own process) shuts down
            shutdown = getattr(llm, "shutdown", None)
            if not callable(shutdown):
                core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
                shutdown = getattr(core, "shutdown", None)
            if callable(shutdown):
                with contextlib.suppress(Exception):
                    shutdown()
            del llm, shutdown
            with contextlib.suppress(Exception):  # model-parallel groups of in-process engines
                from vllm.distributed import cleanup_dist_env_and_memory

                cleanup_dist_env_and_memory()
            gc.collect()
            torch = sys.modules.get("torch")  # loaded by vLLM; never import it just to free
            if torch is not None:
                with contextlib.suppress(Exception):
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()

    async def aclose(self) -> None:
        async with self._lock:
            if self.llm is not None:
                await asyncio.to_thread(self._free)

    # --- requests --------------------------------------------------------------------------

    def _prepare(self, req: ChatRequest) -> tuple[Any, ChatResult | None]:
        """``(SamplingParams, None)``, or ``(None, error result)`` for a prompt that does
        not fit the context."""
        import vllm

        max_tokens = int(req.params.get("max_tokens") or 512)
        n = _prompt_len(self.tokenizer, req.messages) if self.tokenizer is not None else None
        limit = self.max_model_len
        if n is not None and limit is not None:
            if n >= limit:
                return None, ChatResult(req.key, usage=Usage(n, 0), error=(
                    f"prompt too long: {n} tokens, max_model_len={limit} leaves no room"))
            max_tokens = min(max_tokens, limit - n)
        return vllm.SamplingParams(**sampling_kwargs(req, max_tokens)), None

    def _submit(self, items: list[tuple[int, ChatRequest, Any]],
                out: list[ChatResult | None],
                deliver: Callable[[ChatResult], None] | None = None) -> None:
        """Run ``items`` in one ``llm.chat`` call; on failure, split to isolate the culprit.
        Each call's results go to ``deliver`` as soon as that call returns."""
        try:
            outputs = self.llm.chat([r.messages for _, r, _ in items],
                                    [sp for _, _, sp in items], use_tqdm=False)
            if len(outputs) != len(items):
                raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(items)}")
        except Exception as e:
            if type(e).__name__ in _FATAL:
                raise BackendError(f"{self.spec.where}: vLLM engine failed: "
                                   f"{_first_line(e)}") from None
            if len(items) == 1:
                i, r, _ = items[0]
                out[i] = res = ChatResult(r.key, error=f"vllm: {_first_line(e)}")
                if deliver is not None:
                    deliver(res)
                return
            mid = len(items) // 2
            self._submit(items[:mid], out, deliver)
            self._submit(items[mid:], out, deliver)
            return
        for (i, r, _), o in zip(items, outputs, strict=True):
            out[i] = res = _result(r, o)
            if deliver is not None:
                deliver(res)

    def _complete_sync(self, requests: Sequence[ChatRequest],
                       deliver: Callable[[ChatResult], None] | None = None) -> list[ChatResult]:
        with _GPU_LOCK:
            self._load()
            out: list[ChatResult | None] = [None] * len(requests)
            items: list[tuple[int, ChatRequest, Any]] = []
            for i, req in enumerate(requests):
                try:
                    sp, err = self._prepare(req)
                except BackendError:
                    raise
                except Exception as e:  # bad params for vLLM (e.g. top_p 0): this request only
                    sp, err = None, ChatResult(req.key, error=f"vllm: {_first_line(e)}")
                if err is not None:
                    out[i] = err
                    if deliver is not None:
                        deliver(err)
                else:
                    items.append((i, req, sp))
            if items:
                self._submit(items, out, deliver)
        return [r if r is not None else ChatResult(q.key, error="vllm: no result")
                for r, q in zip(out, requests, strict=True)]

    async def complete(self, requests: Sequence[ChatRequest],
                       on_result: ResultSink | None = None) -> list[ChatResult]:
        """``llm.chat`` returns a whole batch at once, so ``on_result`` gets results per
        ``llm.chat`` call (the batch, or its halves when a bad request is being isolated)."""
        if not requests:
            return []
        deliver: Callable[[ChatResult], None] | None = None
        if on_result is not None:
            loop = asyncio.get_running_loop()

            def deliver(res: ChatResult) -> None:  # from the worker thread to the loop
                loop.call_soon_threadsafe(on_result, res)

        async with self._lock:
            return await asyncio.to_thread(self._complete_sync, list(requests), deliver)
