"""The prepared corpus a lab run trained on, read back from its ``config.json``, and its
splits cut into ``(domain, token ids)`` sequences (what ``routelab trace`` records when no
``--corpus`` is given)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import numpy as np

from routelab.core.errors import ConfigError, InputError
from routelab.core.json_files import read_json
from routelab.lab.data import CorpusOptions, PreparedCorpus, prepare_corpus


def run_config_path(checkpoint: str | Path) -> Path:
    """``config.json`` of the run folder holding ``checkpoint`` (a file in it, or the folder)."""
    path = Path(checkpoint)
    return (path if path.is_dir() else path.parent) / "config.json"


def run_corpus(checkpoint: str | Path, cache_dir: str | Path | None = None) -> PreparedCorpus:
    """Prepare (or reuse from the cache) the corpus the run of ``checkpoint`` trained on.

    Raises when the run folder has no ``config.json`` or when the corpus no longer has the
    content it had in training (its files changed), since the split would differ.
    """
    config_file = run_config_path(checkpoint)
    if not config_file.is_file():
        raise ConfigError(
            f"{str(checkpoint)!r} is not in a lab run folder (no {config_file.name} next to it), so its training "
            "corpus is unknown; name the text to trace with --corpus [DOMAIN=]PATH."
        )
    recorded = read_json(config_file, "run config").get("corpus") or {}
    known = {f.name for f in fields(CorpusOptions)}
    options = CorpusOptions(**{k: v for k, v in (recorded.get("options") or {}).items() if k in known})
    prepared = prepare_corpus(options, cache_dir=cache_dir)
    expected = recorded.get("content_hash")
    if expected and prepared.content_hash != expected:
        raise InputError(
            f"the corpus of {str(checkpoint)!r} ({options.source!r}) has changed since training (content hash "
            f"{prepared.content_hash[:12]} != {expected[:12]}), so its validation split differs; pass --corpus to "
            "trace other text."
        )
    return prepared


def split_sequences(prepared: PreparedCorpus, split: str, seq_len: int) -> Iterator[tuple[str, list[int]]]:
    """``split``'s tokens as ``(domain, ids)`` pieces of at most ``seq_len``; no piece spans two domains."""
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}.")
    tokens = np.asarray(prepared.tokens(split))
    labels = np.asarray(prepared.domain_labels(split))
    bounds = [0, *(np.flatnonzero(np.diff(labels)) + 1).tolist(), len(tokens)]
    for start, end in zip(bounds[:-1], bounds[1:]):
        domain = prepared.domains[int(labels[start])]
        for piece_start in range(start, end, seq_len):
            yield domain, tokens[piece_start : min(piece_start + seq_len, end)].astype(np.int64).tolist()
