"""``prefsynth push``: publish an output folder as a Hugging Face dataset repository.

What goes up is what the card describes: ``pairs/``, ``annotations/``, the ``README.md``
card, ``run.json`` and ``report.html`` when there is one. The request store
(``.prefsynth/``: every prompt and raw answer, keyed for resuming) never does, nor do the
JSONL copies (the parquet files are the dataset) or temporary files of an interrupted export.

The token is read from an environment variable (``HF_TOKEN`` by default), or from the
``huggingface_hub`` login as a fallback; it is passed to ``HfApi`` only, and never written,
logged or put in a message.
"""

from __future__ import annotations

import os
from pathlib import Path

from prefsynth.errors import BackendError, InputError, MissingExtraError

#: what a dataset repository gets from an output folder (``upload_folder`` glob patterns)
ALLOW_PATTERNS = ["pairs/*.parquet", "annotations/*.parquet", "README.md", "run.json",
                  "report.html"]
#: never uploaded, even if a future layout would otherwise match ``ALLOW_PATTERNS``
IGNORE_PATTERNS = [".prefsynth/*", ".prefsynth/**", "**/.prefsynth/**", "*.tmp", "**/*.tmp",
                   ".*", "**/.*"]


def _token(token_env: str) -> str:
    """The token from ``token_env``, else the locally saved login; ``BackendError`` naming
    the variable (never a value) when neither is there."""
    token = os.environ.get(token_env, "").strip()
    if not token:
        from huggingface_hub import get_token

        token = (get_token() or "").strip()
    if not token:
        raise BackendError(f"prefsynth push needs a Hugging Face token with write access: set "
                           f"{token_env} (or run `hf auth login`)")
    return token


def push(outdir: str | Path, repo_id: str, *, private: bool = False, token_env: str = "HF_TOKEN",
         endpoint: str | None = None, commit_message: str | None = None) -> str:
    """Create (or reuse) the dataset repo ``repo_id`` and upload the output folder to it.

    Returns the dataset's URL. ``endpoint`` points at another Hub (default: ``HF_ENDPOINT``
    or huggingface.co, as ``huggingface_hub`` decides). Raises ``InputError`` when ``outdir``
    is not an output folder, ``BackendError`` without a token, ``MissingExtraError`` without
    ``huggingface_hub``.
    """
    try:
        from huggingface_hub import HfApi
        from huggingface_hub import errors as hf_errors
    except ImportError as e:
        raise MissingExtraError("prefsynth push", "hf") from e
    out = Path(outdir)
    if not (out / "README.md").is_file() or not any((out / "pairs").glob("*.parquet")):
        raise InputError(f"{out}: not a prefsynth output folder (needs README.md and "
                         "pairs/*.parquet)")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise InputError(f"{repo_id!r}: a Hub dataset id is 'owner/name'")
    token = _token(token_env)
    api = HfApi(endpoint=endpoint, token=token)
    # HTTP status errors, connection errors and offline mode (OSError or httpx's HTTPError in
    # huggingface_hub >= 1.0) and the Hub rejecting the card's metadata (ValueError) become
    # one line; anything else keeps its traceback
    net_errors = (OSError, ValueError, getattr(hf_errors, "HTTPError", OSError))
    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=out,
                          allow_patterns=list(ALLOW_PATTERNS),
                          ignore_patterns=list(IGNORE_PATTERNS),
                          commit_message=commit_message or "Upload dataset with prefsynth")
    except net_errors as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].replace(token, "***")
        raise BackendError(f"push to {repo_id} failed: {first}") from None
    return str(url)
