"""Refusing a resume that would mix two different tracings in one trace.

A trace written by ``routelab trace`` records in its header (``metadata.trace_setup``)
everything that decides which rows it holds: a fingerprint of the checkpoint, of the corpus,
and the sequence length, batch size and token limit. ``--resume`` continues only when the
resumed command has the same setup; otherwise the rows appended would come from another
model or another cut of the text under the first one's metadata.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from routelab.core.errors import ConfigError
from routelab.traces.format import read_header, resolve_trace_dir

SETUP_KEY = "trace_setup"

# how each setup entry is given on the command line, for the error message
FLAG_NAMES = {
    "checkpoint_sha256": "CHECKPOINT (its content)",
    "checkpoint": "CHECKPOINT",
    "corpus": "--corpus (its content)",
    "seq_len": "--seq-len",
    "batch_size": "--batch-size",
    "max_tokens": "--max-tokens",
    "dtype": "--dtype",
    "replaced_router": "--router",
    "tokenizer": "--tokenizer",
}


def file_sha256(paths: Iterable[str | os.PathLike[str]], chunk_bytes: int = 1 << 20) -> str:
    """SHA-256 over the bytes of ``paths`` in order (each preceded by its size)."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        digest.update(str(path.stat().st_size).encode() + b"\0")
        with path.open("rb") as handle:
            while block := handle.read(chunk_bytes):
                digest.update(block)
    return digest.hexdigest()


def check_resume_setup(trace_path: str | os.PathLike[str], setup: dict[str, Any]) -> None:
    """Raise ``ConfigError`` unless the trace at ``trace_path`` was started with ``setup``."""
    trace_dir = resolve_trace_dir(trace_path)
    header = read_header(trace_dir)
    stored = (header.get("metadata") or {}).get(SETUP_KEY)
    if stored is None:
        raise ConfigError(
            f"cannot resume {str(trace_dir)!r}: its header does not record how it was traced (checkpoint, corpus, "
            "--seq-len, ...), so a resume cannot be checked to continue the same tracing; start it again with "
            "--overwrite."
        )
    differences = []
    for key in sorted(set(stored) | set(setup)):
        before, now = stored.get(key), setup.get(key)
        if before != now:
            name = FLAG_NAMES.get(key, key)
            if key.endswith("sha256") or key == "corpus":
                differences.append(f"{name} differs")
            else:
                differences.append(f"{name} was {before!r}, now {now!r}")
    if differences:
        raise ConfigError(
            f"cannot resume {str(trace_dir)!r}: it was started with other settings ({'; '.join(differences)}). "
            "Resume with the original checkpoint, corpus and settings, or start a new trace (--overwrite, or "
            "another --out)."
        )
