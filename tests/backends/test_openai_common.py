"""``result_from_completion``: every payload shape a server might send becomes a result."""

from __future__ import annotations

from typing import Any

import pytest

from prefsynth.backends.openai_common import MAX_TOKENS, result_from_completion


def payload(content: Any = "hi", usage: Any = None, finish: Any = "stop") -> dict[str, Any]:
    return {"choices": [{"message": {"content": content}, "finish_reason": finish}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1} if usage is None else usage}


def test_a_good_payload() -> None:
    r = result_from_completion("k", payload())
    assert r.ok and r.text == "hi" and r.finish_reason == "stop"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 1)
    assert result_from_completion("k", payload(usage={})).usage.prompt_tokens == 0
    whole = payload(usage={"prompt_tokens": 3.0, "completion_tokens": 1})  # a float count
    assert result_from_completion("k", whole).usage.prompt_tokens == 3


@pytest.mark.parametrize("body", [
    payload(content={"text": "hi"}),                       # content an object
    payload(content=7),                                    # content an integer
    payload(content=["a", "b"]),
    payload(usage={"prompt_tokens": 10**30, "completion_tokens": 1}),
    payload(usage={"prompt_tokens": MAX_TOKENS + 1, "completion_tokens": 1}),
    payload(usage={"prompt_tokens": -1, "completion_tokens": 1}),
    payload(usage={"prompt_tokens": 1.5, "completion_tokens": 1}),
    payload(usage={"prompt_tokens": "12", "completion_tokens": 1}),
    payload(usage={"prompt_tokens": True, "completion_tokens": 1}),
    payload(usage={"prompt_tokens": float("nan"), "completion_tokens": 1}),
    payload(usage="abc"),
    payload(usage=[1, 2]),
    payload(finish={"why": "stop"}),
    {"choices": [{"message": "hi"}]},
    {"choices": []},
    {"choices": "abc"},
    [1, 2, 3],
    "abc",
    42,
    None,
])  # fmt: skip
def test_a_payload_of_the_wrong_shape_is_that_requests_error(body: Any) -> None:
    """These used to raise (``int(10**30)`` went on to overflow SQLite, ``"abc".get`` an
    AttributeError) and took the other answers of the batch down with them."""
    r = result_from_completion("k", body)
    assert not r.ok and r.text is None
    assert r.error is not None and r.error.startswith("malformed completion payload"), r.error
