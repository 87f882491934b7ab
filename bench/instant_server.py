"""An OpenAI- and Anthropic-compatible server on loopback that answers every request at once.

A raw ``asyncio.Protocol`` HTTP/1.1 server with keep-alive (and pipelining): no framework, no
per-request allocation beyond slicing the buffer, one prebuilt response. It costs a few tens of
microseconds of CPU per request, so on its own core it outruns any Python client by several
times — ``bench/overhead.py`` measures that and prints it.

Endpoints:

* ``POST /v1/chat/completions`` (any query string): a fixed small completion (choices, usage);
  counted.
* ``POST /v1/messages``: a fixed small Anthropic Messages answer (content, stop_reason, usage)
  of the same text; counted.
* ``GET /count``: the number of completions answered so far, as plain text.
* ``GET /stats``: ``{"count": ..., "cpu": ...}`` — the count and this process's CPU seconds.

Only ``Content-Length`` bodies are understood (every client here sends one); a chunked request
gets a 411 so that a mismatch is loud rather than a hang.

Run: ``python bench/instant_server.py [--port 0] [--cpu 1]``. It prints ``PORT <n>`` on stdout
once listening (and whether it pinned itself) and serves until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time

import orjson

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench-model",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "An instant answer of a few words."},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 21, "completion_tokens": 8, "total_tokens": 29},
    }
)


MESSAGE = orjson.dumps(
    {
        "id": "msg_bench",
        "type": "message",
        "role": "assistant",
        "model": "bench-model",
        "content": [{"type": "text", "text": "An instant answer of a few words."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": 21, "output_tokens": 8},
    }
)


def _response(body: bytes, status: bytes = b"200 OK", ctype: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
        + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


RESP_COMPLETION = _response(COMPLETION)
RESP_MESSAGE = _response(MESSAGE)
RESP_404 = _response(b'{"error": {"message": "not found"}}', b"404 Not Found")
RESP_411 = _response(b'{"error": {"message": "send Content-Length"}}', b"411 Length Required")


class _State:
    count = 0


class HttpProtocol(asyncio.Protocol):
    """One keep-alive connection: parse request heads, skip bodies, answer."""

    __slots__ = ("buf", "transport")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        while True:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                break
            head = bytes(buf[pos:end]).lower()
            i = head.find(b"\r\ncontent-length:")
            if i >= 0:
                j = head.find(b"\r\n", i + 2)
                clen = int(head[i + 17 : j if j >= 0 else len(head)])
            elif b"\r\ntransfer-encoding:" in head:
                out.append(RESP_411)
                self._send(out, close=True)
                return
            else:
                clen = 0
            total = end + 4 + clen
            if total > n:
                break
            path = head[head.find(b" ") + 1 :]
            path = path[: path.find(b" ")]
            if path.startswith(b"/v1/chat/completions"):
                _State.count += 1
                out.append(RESP_COMPLETION)
            elif path.startswith(b"/v1/messages"):
                _State.count += 1
                out.append(RESP_MESSAGE)
            elif path == b"/count":
                out.append(_response(str(_State.count).encode(), ctype=b"text/plain"))
            elif path == b"/stats":
                stats = {"count": _State.count, "cpu": time.process_time()}
                out.append(_response(orjson.dumps(stats)))
            else:
                out.append(RESP_404)
            pos = total
        if pos:
            del buf[:pos]
        if out:
            self._send(out)

    def _send(self, out: list[bytes], close: bool = False) -> None:
        assert self.transport is not None
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(HttpProtocol, host, port, backlog=1024)
    bound = server.sockets[0].getsockname()[1]
    print(f"PORT {bound}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--cpu", type=int, default=None, help="pin this process to one core")
    args = ap.parse_args(argv)
    pinned = "not pinned"
    if args.cpu is not None and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, {args.cpu})
            pinned = f"pinned to core {args.cpu}"
        except OSError as e:
            pinned = f"not pinned ({e})"
    print(f"AFFINITY {pinned}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))
    sys.exit(0)


if __name__ == "__main__":
    main()
