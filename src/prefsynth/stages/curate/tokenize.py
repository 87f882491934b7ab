"""The one tokenizer curation uses on prompts and eval sets alike: lowercased words.

A token is a maximal run of word characters (``re.findall(r"\\w+", text.lower())``: Unicode
letters, digits and ``_``), as UTF-8 bytes. Punctuation and whitespace only separate tokens,
so "Hello, world!" and "hello world" are the same two tokens. No model, no download: both
sides of every comparison go through this function, which is all an n-gram overlap needs.
Scripts written without spaces (Chinese, Japanese) come out as one token per run of
characters, so overlap there is found only for long verbatim copies.

ASCII text, the common case, takes a faster path (a byte translation table and ``split``)
that gives exactly the tokens of the regular expression; the tests hold the two equal.
"""

from __future__ import annotations

import re

from prefsynth.records import Prompt

_WORD = re.compile(r"\w+")
_ASCII_WORD = bytes(c if chr(c).isalnum() or chr(c) == "_" else 32 for c in range(128))
#: ASCII letters lowercased, every other ASCII non-word byte a space
_TABLE = bytes.maketrans(bytes(range(128)), _ASCII_WORD.lower())


def words(text: str) -> list[bytes]:
    """The tokens of ``text``: lowercased words as UTF-8 bytes."""
    if text.isascii():
        return text.encode("ascii").translate(_TABLE).split()
    return [w.encode("utf-8") for w in _WORD.findall(text.lower())]


def words_regex(text: str) -> list[bytes]:
    """The definition ``words`` implements, kept for tests and the reference scan."""
    return [w.encode("utf-8") for w in _WORD.findall(text.lower())]


def user_turns(prompt: Prompt) -> list[str]:
    """The text curation reads from a prompt: every user turn (a system prompt is shared
    boilerplate and an assistant turn is an answer, not the question an eval asks)."""
    return [m["content"] for m in prompt.messages if m["role"] == "user"]
