"""Count a request's input tokens the way the model will, offline, or say it is approximate.

Used by ``prefsynth estimate`` (and reusable wherever a token count matters, e.g. rate limits):

* ``llamacpp``: the GGUF's own tokenizer (vocab only, no weights) and chat template, applied as
  llama-cpp-python applies them when it answers, so the count equals its ``prompt_tokens``;
* OpenAI model names: ``tiktoken`` plus OpenAI's documented chat overhead, only if tiktoken is
  installed *and* its encoding file is already cached: tiktoken downloads encodings on first
  use, and here that download is refused (never attempted, never left to hang);
* a Hugging Face tokenizer with its chat template, from the local cache only (``transformers``);
* otherwise ``≈ chars/4``, labelled as such, with the reason no tokenizer was found (for a
  Claude model: it has none offline; Anthropic counts tokens only through its API).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from prefsynth.config import ModelSpec
from prefsynth.output.licenses import licence_for_model
from prefsynth.records import Message

APPROX = "≈ chars/4"
#: why a Claude model is counted as ``APPROX``: no tokenizer to install would help
NO_CLAUDE_TOKENIZER = "Claude has no offline tokenizer (Anthropic counts tokens only in its API)"


class TokenCounter(Protocol):
    label: str

    def count(self, messages: Sequence[Message]) -> int: ...


@dataclass(slots=True)
class CharCounter:
    """The stated approximation: 4 characters per token. ``why`` says why no tokenizer."""

    why: str = ""
    label: str = APPROX

    def count(self, messages: Sequence[Message]) -> int:
        return math.ceil(sum(len(m["content"]) for m in messages) / 4)


class GGUFCounter:
    """A GGUF file's own tokenizer (vocab only: no weights loaded) and chat template, applied
    exactly as llama-cpp-python applies them when it answers."""

    label = "gguf tokenizer"

    def __init__(self, path: Path) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        quiet: Any = contextlib.nullcontext()
        with contextlib.suppress(ImportError):  # llama.cpp warns on the C side: keep CLI clean
            from llama_cpp._utils import suppress_stdout_stderr

            quiet = suppress_stdout_stderr(disable=False)
        with quiet:
            self.llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False,
                                       n_ctx=16)
        template = self.llm.metadata.get("tokenizer.chat_template")
        self.formatter = None
        if template:
            eos, bos = self.llm.token_eos(), self.llm.token_bos()
            self.formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self.llm._model.token_get_text(eos) if eos != -1 else "",
                bos_token=self.llm._model.token_get_text(bos) if bos != -1 else "")

    def count(self, messages: Sequence[Message]) -> int:
        if self.formatter is not None:
            res = self.formatter(messages=list(messages))  # type: ignore[arg-type]
            text, add_bos = res.prompt, not res.added_special
        else:
            text, add_bos = "\n".join(m["content"] for m in messages), True
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))


class TiktokenCounter:
    """OpenAI models: tiktoken plus OpenAI's documented chat overhead (3 tokens per message,
    3 to prime the reply)."""

    def __init__(self, encoding: Any) -> None:
        self.enc = encoding
        self.label = f"tiktoken {encoding.name}"

    def count(self, messages: Sequence[Message]) -> int:
        enc = self.enc.encode_ordinary
        return 3 + sum(3 + len(enc(m["role"])) + len(enc(m["content"])) for m in messages)


class HFCounter:
    """A Hugging Face tokenizer from the local cache, with the model's chat template."""

    label = "hf tokenizer"

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer

    def count(self, messages: Sequence[Message]) -> int:
        try:
            ids = self.tok.apply_chat_template(list(messages), add_generation_prompt=True,
                                               tokenize=True)
            if isinstance(ids, Mapping) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            return len(ids)
        except Exception:  # no chat template: the contents alone
            return len(self.tok.encode("\n".join(m["content"] for m in messages)))


_TIKTOKEN_LOCK = threading.Lock()


def offline_tiktoken(model: str) -> Any | None:
    """tiktoken's encoding for an OpenAI model name, only from files already on disk.

    tiktoken fetches an encoding over HTTP on first use (``tiktoken.load.read_file``) with no
    timeout; here that function is swapped, for the duration of the call, for one that refuses
    URLs, so an uncached encoding fails at once instead of hanging or phoning home.
    """
    try:
        import tiktoken
        import tiktoken.load as tl
    except ImportError:
        return None
    real = tl.read_file

    def refuse_urls(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise OSError(f"{blobpath} is not cached (estimate never downloads)")
        return real(blobpath)

    with _TIKTOKEN_LOCK:
        tl.read_file = refuse_urls
        try:
            return tiktoken.encoding_for_model(model)
        except Exception:  # unknown model name, no cached file, corrupt cache
            return None
        finally:
            tl.read_file = real


def _hf_tokenizer(name: str) -> Any | None:
    if "/" not in name and not Path(name).is_dir():
        return None  # not a Hub id or a local folder: don't let transformers guess
    try:
        from transformers import AutoTokenizer
    except ImportError:
        return None
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception:  # not cached, gated, malformed
        return None


_COUNTERS: dict[tuple[str, str], TokenCounter] = {}


def token_counter(spec: ModelSpec) -> TokenCounter:
    """The best offline token counter for a model (cached per backend and model)."""
    tok_name = str(spec.options.get("tokenizer") or spec.model)
    key = (spec.backend, tok_name)
    if key not in _COUNTERS:
        _COUNTERS[key] = _make_counter(spec.backend, spec.model, tok_name)
    return _COUNTERS[key]


def _make_counter(backend: str, model: str, tok_name: str) -> TokenCounter:
    if backend == "llamacpp":
        try:
            from prefsynth.backends.llamacpp import resolve_model_path

            return GGUFCounter(resolve_model_path(model))
        except Exception as e:  # llama_cpp missing, file missing, unreadable GGUF
            return CharCounter(f"GGUF tokenizer unavailable ({type(e).__name__})")
    if licence_for_model(tok_name) == "anthropic":
        return CharCounter(NO_CLAUDE_TOKENIZER)
    enc = offline_tiktoken(model)
    if enc is not None:
        return TiktokenCounter(enc)
    hf = _hf_tokenizer(tok_name)
    if hf is not None:
        return HFCounter(hf)
    return CharCounter(_why_no_tokenizer(tok_name))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _why_no_tokenizer(name: str) -> str:
    if "/" in name or Path(name).is_dir():
        if not _installed("transformers"):
            return "transformers not installed"
        return "tokenizer not in the local Hugging Face cache"
    if not _installed("tiktoken"):
        return "tiktoken not installed"
    return "no tiktoken encoding cached for this model name"


def count_tokens(messages: Sequence[Message], spec: ModelSpec) -> tuple[int, str]:
    """``(input tokens, how they were counted)`` for one request's messages to ``spec``."""
    counter = token_counter(spec)
    return counter.count(messages), counter.label
