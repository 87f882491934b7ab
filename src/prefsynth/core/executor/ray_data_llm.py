"""``ray.data_llm``: a vLLM model answered through Ray Data's LLM processor, not our workers.

``ray.data.llm.build_llm_processor(vLLMEngineProcessorConfig(...))`` runs a Ray Data pipeline
(chat template, tokenize, vLLM engine, detokenize) over a Dataset, with its own actor pool of
``concurrency`` engines and its own placement groups for tensor/pipeline parallelism. Per stage,
the requests still missing from the store become a Dataset of Arrow shards; the answers come
back to the driver through ``iter_batches`` (in a thread, handed to the event loop) and are
committed as they arrive, exactly like the workers' streamed tables.

Why it is an option and not the default: each stage call builds a new pipeline and loads the
engines again (the in-worker vLLM loads once per shard), the whole stage is encoded before it
starts (judge rubrics included), and Ray 2.52's processor maps structured output to vLLM's
``GuidedDecodingParams``, which vLLM 0.12 removed. ``ray.data.llm`` imports torch and
transformers at module level, so it is imported here, on first use, and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import orjson
import pyarrow as pa

from prefsynth.config import ModelSpec, RaySettings
from prefsynth.core.executor.arrow import RESULTS, requests_table, results_from
from prefsynth.errors import MissingExtraError
from prefsynth.records import ChatRequest, ChatResult, RequestState

DEFAULT_BATCH_SIZE = 256


def _preprocess(row: dict[str, Any]) -> dict[str, Any]:
    """A request row -> what the processor wants: ``messages`` and ``sampling_params``."""
    d = orjson.loads(row["request"])
    p = d["params"]
    sampling: dict[str, Any] = {
        "temperature": float(p.get("temperature", 1.0)), "top_p": float(p.get("top_p", 1.0)),
        "max_tokens": int(p.get("max_tokens") or 512), "seed": p.get("seed"),
    }
    if p.get("stop"):
        sampling["stop"] = list(p["stop"])
    if d["response_format"] is not None:
        sampling["guided_decoding"] = {"json": d["response_format"].get("schema")}
    return {"key": row["key"], "messages": d["messages"], "sampling_params": sampling,
            "max_tokens": sampling["max_tokens"]}


def _postprocess(row: dict[str, Any]) -> dict[str, Any]:
    """The processor's output row -> a ``core.executor.arrow.RESULTS`` row."""
    generated = int(row.get("num_generated_tokens") or 0)
    return {"key": row["key"], "text": row.get("generated_text") or "",
            "finish_reason": "length" if generated >= int(row["max_tokens"]) else "stop",
            "prompt_tokens": int(row.get("num_input_tokens") or 0),
            "completion_tokens": generated, "error": None, "attempts": 1,
            "state": RequestState.ANSWERED.value}


class DataLLMPool:
    """The ``WorkerPool`` interface the Ray executor drives, on ``ray.data.llm``."""

    started = False  # nothing lives between stages: each one is its own Dataset

    def __init__(self, spec: ModelSpec, settings: RaySettings) -> None:
        self.spec = spec
        from prefsynth.backends.base import parse_options
        from prefsynth.backends.vllm import VLLMBackend, VLLMOptions, engine_kwargs

        self.size = settings.workers_per_model.get(spec.name, settings.workers)
        opts = parse_options(VLLMOptions, spec)  # the vllm backend's options, as it reads them
        self.batch_size = opts.batch_size if "batch_size" in opts.model_fields_set \
            else DEFAULT_BATCH_SIZE
        self.engine_kwargs = engine_kwargs(opts)
        self.shard_size = settings.shard_requests or 1024
        self.max_concurrency = 1
        self.gpus = VLLMBackend.gpus(spec)
        self.resources = {"CPU": 0.0, "GPU": self.gpus * self.size}
        self.info: dict[int, dict[str, Any]] = {}

    async def start(self) -> None:
        return None

    def _processor(self) -> Any:
        try:
            from ray.data.llm import build_llm_processor, vLLMEngineProcessorConfig
        except ImportError as e:
            raise MissingExtraError(f"ray.data_llm ({e.name or 'vllm'})", "vllm") from None
        config = vLLMEngineProcessorConfig(
            model_source=self.spec.model, engine_kwargs=self.engine_kwargs,
            concurrency=self.size, batch_size=self.batch_size, apply_chat_template=True,
            tokenize=True, detokenize=True)
        return build_llm_processor(config, preprocess=_preprocess, postprocess=_postprocess)

    async def drive(self, todo: Sequence[ChatRequest], ingest: Callable[[list[ChatResult]], None],
                    depth: int) -> None:
        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the run's own bars show this stage
        context.print_on_execution_start = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        tables = [requests_table(todo[i : i + self.shard_size])
                  for i in range(0, len(todo), self.shard_size)]
        dataset = self._processor()(ray.data.from_arrow(tables))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[pa.Table | BaseException | None] = asyncio.Queue()
        stop = threading.Event()

        def pump() -> None:  # iter_batches blocks: a thread feeds the event loop
            try:
                for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                    if stop.is_set():
                        return
                    loop.call_soon_threadsafe(queue.put_nowait, batch.select(RESULTS.names))
            except BaseException as e:
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, None)

        thread = threading.Thread(target=pump, name=f"ray-data-llm-{self.spec.name}",
                                  daemon=True)
        thread.start()
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                ingest(results_from(item.cast(RESULTS)))
        finally:
            stop.set()

    async def close(self) -> None:
        return None


__all__ = ["DataLLMPool"]
