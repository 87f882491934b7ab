"""``prefsynth push`` against a loopback stand-in for the Hub.

The server implements exactly the endpoints ``HfApi.create_repo`` and ``HfApi.upload_folder``
call (huggingface_hub >= 1.0): ``POST /api/repos/create``, ``POST
/api/datasets/{repo}/preupload/{rev}`` (it answers "regular" for every file, so no LFS/Xet
transfer is needed) and ``POST /api/datasets/{repo}/commit/{rev}`` with the NDJSON commit
whose lines carry the base64 file contents. Everything else is a 404 and recorded, so an
unexpected call fails the test. The real ``huggingface_hub`` client code runs end to end.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("huggingface_hub")

from prefsynth.config import parse_config
from prefsynth.core.pipeline import run
from prefsynth.errors import BackendError, InputError
from prefsynth.output.hub import push
from tests.conftest import fake_config

TOKEN = "hf_test_SECRET_token_0123456789"


class FakeHub:
    """State of the stand-in Hub: repos, committed files, every request seen."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, Any]] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, authorization
        self.unexpected: list[str] = []
        self.fail_commit = False
        self.validated: list[dict[str, Any]] = []
        self.base = ""


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # keep pytest output clean
            pass

        def _send(self, code: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            hub.requests.append(("GET", self.path, self.headers.get("authorization")))
            hub.unexpected.append(f"GET {self.path}")
            self._send(404, {"error": "not implemented"})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            path = self.path.split("?")[0]
            hub.requests.append(("POST", path, self.headers.get("authorization")))
            if path == "/api/validate-yaml":  # the client checks README.md's metadata first
                req = json.loads(body)
                hub.validated.append(req)
                try:
                    meta = yaml.safe_load(req["content"].split("---\n")[1])
                    assert isinstance(meta, dict) and meta.get("license")
                except Exception as e:  # the real Hub answers 400 with a list of errors
                    return self._send(400, {"errors": [{"message": f"invalid YAML: {e}"}]})
                return self._send(200, {"warnings": []})
            if path == "/api/repos/create":
                req = json.loads(body)
                repo = f"{req['organization']}/{req['name']}"
                if repo in hub.repos:
                    return self._send(409, {"error": "You already created this dataset repo",
                                            "url": f"{hub.base}/datasets/{repo}"})
                hub.repos[repo] = req
                return self._send(200, {"url": f"{hub.base}/datasets/{repo}"})
            parts = path.split("/")  # ['', 'api', 'datasets', org, name, op, rev]
            if len(parts) == 7 and parts[2] == "datasets" and f"{parts[3]}/{parts[4]}" in hub.repos:
                repo, op = f"{parts[3]}/{parts[4]}", parts[5]
                if op == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in files]})
                if op == "commit":
                    if hub.fail_commit:
                        return self._send(403, {"error": "You don't have the rights"})
                    assert self.headers.get("content-type") == "application/x-ndjson"
                    for line in body.splitlines():
                        item = json.loads(line)
                        if item["key"] == "file":
                            v = item["value"]
                            hub.files.setdefault(repo, {})[v["path"]] = base64.b64decode(
                                v["content"])
                        elif item["key"] != "header":
                            hub.unexpected.append(f"commit op {item['key']}")
                    return self._send(200, {"commitUrl": f"{hub.base}/datasets/{repo}/commit/"
                                            + "0" * 40, "commitOid": "0" * 40})
            hub.unexpected.append(f"POST {path}")
            return self._send(404, {"error": "not implemented"})

    return Handler


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    state = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def outdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("push")
    run(parse_config(fake_config(tmp)))
    out = tmp / "out"
    (out / "report.html").write_text("<html>report</html>", encoding="utf-8")
    (out / "pairs" / ".train.parquet.tmp").write_bytes(b"half-written")  # interrupted export
    assert (out / ".prefsynth").is_dir()
    return out


def test_push_uploads_the_dataset_and_nothing_else(hub: FakeHub, outdir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFSYNTH_TEST_TOKEN", TOKEN)
    url = push(outdir, "me/prefs", private=True, token_env="PREFSYNTH_TEST_TOKEN",
               endpoint=hub.base)
    assert url == f"{hub.base}/datasets/me/prefs"
    assert hub.repos["me/prefs"]["type"] == "dataset"
    assert hub.repos["me/prefs"]["visibility"] == "private"
    assert set(hub.files["me/prefs"]) == {"README.md", "run.json", "report.html",
                                          "pairs/train.parquet", "annotations/train.parquet"}
    for rel, data in hub.files["me/prefs"].items():
        assert data == (outdir / rel).read_bytes(), rel
    assert hub.unexpected == []
    assert [v["repoType"] for v in hub.validated] == ["dataset"]
    # every request authenticated with the token from the named variable
    assert {auth for _, _, auth in hub.requests} == {f"Bearer {TOKEN}"}


def test_push_public_and_existing_repo(hub: FakeHub, outdir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push(outdir, "me/again", endpoint=hub.base)
    assert hub.repos["me/again"].get("visibility") in (None, "public")
    push(outdir, "me/again", endpoint=hub.base)  # exists: 409 is fine, files committed again
    assert [p for m, p, _ in hub.requests if p.endswith("/commit/main")] == [
        "/api/datasets/me/again/commit/main"] * 2
    assert hub.unexpected == []


def test_token_is_never_written_to_the_folder(hub: FakeHub, outdir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    push(outdir, "me/secret", endpoint=hub.base)
    for f in outdir.rglob("*"):
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f
    for data in hub.files["me/secret"].values():
        assert TOKEN.encode() not in data


def test_missing_token_names_the_variable(outdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.delenv("MY_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(BackendError, match="MY_HUB_TOKEN") as err:
        push(outdir, "me/prefs", token_env="MY_HUB_TOKEN", endpoint="http://127.0.0.1:9")
    assert "\n" not in str(err.value)


def test_token_falls_back_to_the_saved_login(hub: FakeHub, outdir: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.delenv("MY_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: TOKEN)
    push(outdir, "me/login", token_env="MY_HUB_TOKEN", endpoint=hub.base)
    assert {auth for _, _, auth in hub.requests} == {f"Bearer {TOKEN}"}


def test_hub_error_is_one_line_without_the_token(hub: FakeHub, outdir: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.fail_commit = True
    with pytest.raises(BackendError, match="push to me/denied failed") as err:
        push(outdir, "me/denied", endpoint=hub.base)
    assert TOKEN not in str(err.value) and "\n" not in str(err.value)


def test_not_an_output_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(InputError, match=str(tmp_path)):
        push(tmp_path, "me/prefs", endpoint="http://127.0.0.1:9")


def test_bad_repo_id(outdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(InputError, match="owner/name"):
        push(outdir, "just-a-name", endpoint="http://127.0.0.1:9")
