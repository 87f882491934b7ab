"""One loaded llama.cpp model per GGUF file, and prompt-prefix reuse that never changes answers.

Why both live here:

- **One model, many users.** The quickstart's four pool variants and its judge are one GGUF;
  a ``Llama`` per backend loaded five copies of weights, KV cache and compute buffers (about
  1.2 GB). ``acquire`` returns the process's ``SharedLlama`` for a (file, load options) key,
  counted per user and closed with the last. Its context is as long as the longest any user
  asks for: a longer KV cache holds the same values, so answers do not change, while each
  backend still refuses prompts longer than its own ``n_ctx``. Requests run one at a time
  under its lock (a ``Llama`` is not thread-safe).
- **Prefix reuse.** The judge's requests share their system prompt and rubric; the pool's
  variants share whole prompts. llama-cpp-python keeps the KV cache of the last request and
  evaluates only the part of a new prompt past the longest common prefix. Left to itself that
  changes answers (``bench/llamacpp_throughput.py``: 1 judge answer in 24): on the CPU a
  one-token evaluation chunk takes another kernel than a longer one, so its logits differ in
  the last bits. ``aligned_keep`` keeps only as much of the cached prefix as lets the rest be
  evaluated in chunks that end where a reset cache's chunks end, never leaving a prompt token
  alone where a reset cache would not. The KV values of a token do not depend on how the
  prompt before it was split, so the answers are bitwise those of a reset cache (tested), and
  a resumed run, which sees other cache states, gives the same dataset.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token lists (binary search on C-level slice
    compares: prompts are thousands of tokens)."""
    lo, hi = 0, min(len(a), len(b))
    a, b = [int(t) for t in a[:hi]], list(b[:hi])  # ``a`` may be a numpy array
    if a == b:
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo] and a[:hi+1] != b[:hi+1]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def aligned_keep(cached: int, n: int, n_batch: int) -> int:
    """How many of ``cached`` prompt tokens to keep, of a prompt of ``n``, so that the rest,
    evaluated in chunks ending at multiples of ``n_batch`` (as a reset cache chunks it), has a
    one-token chunk only where the reset cache has one: its last, when ``n`` is one past a
    boundary. At least one token is always evaluated: its logits start the sampling."""
    keep = max(0, min(cached, n - 1))
    if n_batch < 2:
        return keep  # every chunk is one token either way
    last = (n - 1) // n_batch * n_batch  # where a reset cache's last chunk starts
    if n - last > 1:
        keep = min(keep, n - 2)  # [keep, n) is not one token
    if keep < last and keep % n_batch == n_batch - 1:
        keep -= 1  # [keep, next boundary) is not one token
    return keep


@dataclass(slots=True, eq=False)
class SharedLlama:
    """A loaded GGUF shared by the backends whose file and load options match."""

    key: tuple[Any, ...]
    load: Callable[[int], Any]  # n_ctx -> a llama_cpp.Llama
    n_ctx: int
    llm: Any = None
    users: int = 0
    #: whether the request now running may start from a cached prefix (its backend's
    #: ``prefix_cache``; set under ``lock`` before each request)
    reuse: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)
    #: prompt tokens asked, of which ``cached`` came from the KV cache; requests run
    stats: dict[str, int] = field(default_factory=lambda: {"prompt": 0, "cached": 0,
                                                            "requests": 0})

    def generate_wrapper(self, llm: Any) -> Callable[..., Any]:
        """``llm.generate`` with the reuse of ``aligned_keep``: before llama-cpp-python looks
        for a cached prefix, its cache is cut to the aligned length and the tokens up to the
        next chunk boundary are evaluated, so its own chunks start on a boundary."""
        generate = llm.generate  # the bound method of the class

        def wrapped(tokens: Sequence[int], *args: Any, **kwargs: Any) -> Any:
            tokens = list(tokens)
            n, n_batch = len(tokens), llm.n_batch
            keep = 0
            if self.reuse and llm.n_tokens > 0:
                cached = common_prefix(llm._input_ids, tokens)
                keep = aligned_keep(cached, n, n_batch)
            self.stats["prompt"] += n
            self.stats["cached"] += keep
            self.stats["requests"] += 1
            if keep == 0:
                llm.reset()
            else:
                llm.n_tokens = keep  # generate() matches only within input_ids[:n_tokens]
                boundary = (keep // n_batch + 1) * n_batch
                if keep % n_batch and boundary < n:  # a chunk up to the boundary first
                    llm.eval(tokens[keep:boundary])  # (aligned_keep: 2 tokens or more)
            return generate(tokens, *args, **kwargs)

        return wrapped

    def ensure_loaded(self) -> Any:
        if self.llm is None:
            llm = self.load(self.n_ctx)
            llm.generate = self.generate_wrapper(llm)  # the instance attribute wins
            self.llm = llm
            log.info("llama.cpp: loaded %s with a %d-token context", self.key[0], self.n_ctx)
        return self.llm

    def close(self) -> None:
        llm, self.llm = self.llm, None
        close = getattr(llm, "close", None)
        if close is not None:
            close()


_MODELS: dict[tuple[Any, ...], SharedLlama] = {}
_MODELS_LOCK = threading.Lock()


def acquire(key: tuple[Any, ...], load: Callable[[int], Any], *, n_ctx: int,
            probe: Callable[[], None] | None = None) -> SharedLlama:
    """The shared model for ``key``. It is loaded at its first request, with the longest
    context any user asked for by then (backends are all made before any work), so it is
    loaded once, and not at all by a run whose answers are all stored. ``probe`` (reading the
    file's header) runs for the first user, so a file that is not a GGUF fails
    before any work; a user needing a longer context after requests have run has the model
    loaded again at the next request."""
    with _MODELS_LOCK:
        shared = _MODELS.get(key)
        first = shared is None
        if shared is None:
            shared = _MODELS[key] = SharedLlama(key, load, n_ctx)
        elif n_ctx > shared.n_ctx:
            shared.n_ctx = n_ctx
            if shared.llm is not None:
                with shared.lock:
                    shared.close()
        shared.users += 1
    if first and probe is not None:
        try:
            probe()
        except BaseException:
            release(shared)
            raise
    return shared


def release(shared: SharedLlama) -> None:
    """One user fewer; the last one frees the model."""
    with _MODELS_LOCK:
        shared.users -= 1
        if shared.users > 0:
            return
        _MODELS.pop(shared.key, None)
    with shared.lock:
        shared.close()


def loaded() -> int:
    """How many models this process holds (tests and the benchmark read it)."""
    with _MODELS_LOCK:
        return sum(1 for m in _MODELS.values() if m.llm is not None)
