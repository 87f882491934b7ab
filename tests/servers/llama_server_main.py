"""``python -m tests.servers.llama_server_main ARGS`` = ``python -m llama_cpp.server ARGS``, with
every completion evaluated from an empty KV cache.

llama.cpp reuses the longest cached prompt prefix between requests, so an answer depends on
which request ran before it (logits for a token evaluated in a different batch split differ in
the last bits, and sampling can flip). Production servers behave like that too; the tests that
assert "a faulted run equals a clean run" need a server whose answer depends only on the
request, which is what prefsynth's own in-process llamacpp backend does (it resets per request).
"""

from __future__ import annotations

import runpy
from collections.abc import Iterator
from typing import Any

import llama_cpp

_generate = llama_cpp.Llama.generate


def _fresh_generate(self: llama_cpp.Llama, *args: Any, **kwargs: Any) -> Iterator[int]:
    self.reset()
    yield from _generate(self, *args, **kwargs)


llama_cpp.Llama.generate = _fresh_generate  # type: ignore[method-assign]

if __name__ == "__main__":
    runpy.run_module("llama_cpp.server", run_name="__main__", alter_sys=True)
