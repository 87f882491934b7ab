"""Files of an output folder: the one atomic-write helper, the ownership marker, stale files.

Every file prefsynth leaves in an output folder is written under a hidden temporary name and
renamed into place (``AtomicFile``, ``atomic_write``), so a reader never sees half a file.

An output folder is recognised by its ``.prefsynth/`` marker folder (where the request store
lives by default). ``claim_output_dir`` refuses a non-empty folder without it, before any
model call: ``--output`` pointed at a user's folder once replaced their ``README.md``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from prefsynth.errors import InputError

#: the folder that marks an output folder as prefsynth's (it also holds the request store)
MARKER = ".prefsynth"


class AtomicFile:
    """A file written at ``tmp`` and renamed to ``path`` by ``commit``: all or nothing.

    For writers that fill a file over several calls (the streamed parquet sinks); whole
    files use ``atomic_write``.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp")

    def open(self) -> Path:
        """Create the parent folder and return the temporary path to write to."""
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        return self.tmp

    def commit(self) -> None:
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write ``path`` by calling ``write(tmp)`` then renaming; a failed write leaves the old
    file (if any) in place and no temporary behind."""
    f = AtomicFile(path)
    try:
        write(f.open())
    except BaseException:
        f.discard()
        raise
    f.commit()


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda t: t.write_text(text, encoding="utf-8"))


def write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda t: t.write_bytes(data))


def claim_output_dir(path: Path, force: bool = False) -> None:
    """Refuse to write into ``path`` when it is a non-empty folder that is not a prefsynth
    output (no ``.prefsynth/``), unless ``force``; then mark it as one.

    Called before any model call, so a wrong ``--output`` costs nothing. Marking it at once
    means a run interrupted before its first file is written is not refused when rerun.
    """
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: the output path is a file, not a folder")
    owned = (path / MARKER).is_dir()
    if path.is_dir() and not owned and not force and any(path.iterdir()):
        raise InputError(f"{path}: the output folder is not empty and not a prefsynth output "
                         f"(no {MARKER}/); choose another folder or pass --force to write "
                         "into it")
    (path / MARKER).mkdir(parents=True, exist_ok=True)


def remove_stale(folder: Path, keep: set[str]) -> None:
    """Delete everything in ``folder`` but the entries named in ``keep``: a stray parquet left
    by an earlier write would be read by ``datasets``, mixed by ``prefsynth mix`` and uploaded
    by ``prefsynth push`` as if it were part of this output."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
