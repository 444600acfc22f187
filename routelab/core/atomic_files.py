"""Files replaced atomically: write a private temporary file next to the target, then rename.

The temporary name is unique per call (``tempfile.mkstemp`` in the target's folder), so two
processes never share one, and it is removed when writing fails (a full disk, say), so a
failed write leaves the previous file intact and no partial file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on error it is deleted.

    The temporary file keeps ``path``'s suffix (``np.savez`` appends ``.npz`` otherwise).
    """
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException as error:
        if isinstance(error, OSError) and error.filename in (None, tmp):
            error.filename = str(target)  # name the file the user knows, not the temporary one
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | os.PathLike[str], data: Any, indent: int | None = 1) -> None:
    """Replace ``path`` by ``data`` as JSON atomically."""
    atomic_write_text(path, json.dumps(data, indent=indent))
