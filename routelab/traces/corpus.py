"""Tracing a model over a corpus of labelled text: documents -> sequences -> batches -> trace.

A corpus is given as ``[DOMAIN=]PATH`` entries: a text file or a folder of text files (read
recursively, in sorted order, files that are not UTF-8 text skipped). Each file is one
document; it is tokenised, cut into sequences of at most ``seq_len`` tokens, and the
sequences are run in batches. The order is deterministic, so an interrupted run resumes by
skipping the batches its last commit recorded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from routelab.core.errors import ConfigError, InputError
from routelab.core.text import read_text
from routelab.traces.recorder import TraceRecorder
from routelab.traces.writer import TraceWriter


@dataclass(frozen=True)
class CorpusEntry:
    """One ``[DOMAIN=]PATH`` argument: its domain name and the files it names."""

    domain: str
    path: Path
    files: tuple[Path, ...]


def parse_corpus(specs: Sequence[str]) -> list[CorpusEntry]:
    """Parse ``[DOMAIN=]PATH`` entries; the domain defaults to the file or folder name."""
    if not specs:
        raise ConfigError("give at least one corpus: --corpus [DOMAIN=]PATH (a text file or a folder of text files).")
    entries = []
    for spec in specs:
        name, sep, raw = spec.partition("=")
        if not sep:
            name, raw = "", spec
        path = Path(raw).expanduser()
        if not path.exists():
            raise ConfigError(f"corpus path {str(path)!r} (from --corpus {spec!r}) does not exist.")
        domain = name or (path.stem if path.is_file() else path.name)
        files = (path,) if path.is_file() else tuple(sorted(p for p in path.rglob("*") if p.is_file()))
        if not files:
            raise ConfigError(f"corpus folder {str(path)!r} holds no files.")
        if not any(read_text(f) for f in files):
            raise ConfigError(f"corpus {str(path)!r} (from --corpus {spec!r}) holds no UTF-8 text (only binary or "
                              "empty files).")
        entries.append(CorpusEntry(domain, path, files))
    return entries


def token_sequences(
    entries: Sequence[CorpusEntry], encode: Callable[[str], Sequence[int]], seq_len: int
) -> Iterator[tuple[str, list[int]]]:
    """``(domain, token ids)`` of every sequence, documents cut into ``seq_len`` pieces."""
    if seq_len < 1:
        raise ConfigError(f"seq_len must be >= 1, got {seq_len}.")
    for entry in entries:
        for path in entry.files:
            text = read_text(path)
            if not text:
                continue
            ids = list(encode(text))
            for start in range(0, len(ids), seq_len):
                piece = ids[start : start + seq_len]
                if piece:
                    yield entry.domain, piece


def encoder_of(tokenizer: Any) -> Callable[[str], list[int]]:
    """A ``text -> ids`` function for a Hugging Face ``tokenizers.Tokenizer``, a
    transformers tokenizer, or any object whose ``encode`` returns ids."""
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        raise ConfigError(f"the tokenizer ({type(tokenizer).__name__}) has no encode(text) method.")

    def run(text: str) -> list[int]:
        out = encode(text)
        ids = getattr(out, "ids", out)
        return [int(i) for i in ids]

    return run


def batches(
    sequences: Iterable[tuple[str, list[int]]], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """``(input_ids [B, S], padding_mask [B, S], domains)`` with right padding (id 0)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}.")
    pending: list[tuple[str, list[int]]] = []

    def emit() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        width = max(len(ids) for _, ids in pending)
        input_ids = torch.zeros(len(pending), width, dtype=torch.long)
        mask = torch.zeros(len(pending), width, dtype=torch.bool)
        for row, (_, ids) in enumerate(pending):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = True
        return input_ids, mask, [d for d, _ in pending]

    for item in sequences:
        pending.append(item)
        if len(pending) == batch_size:
            yield emit()
            pending = []
    if pending:
        yield emit()


def record_corpus(
    recorder: TraceRecorder,
    sequences: Iterable[tuple[str, list[int]]],
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
    commit_every: int = 16,
    on_batch: Callable[[int], None] | None = None,
    device: str | torch.device = "cpu",
) -> int:
    """Run ``sequences`` through ``recorder`` in batches; returns the tokens recorded.

    Resumes where ``recorder.writer.resume_state`` says (``{"batches_done", "tokens",
    "next_seq_id"}``); commits that state every ``commit_every`` batches.
    ``max_tokens`` stops after that many tokens (the last batch is cut at a sequence).
    """
    writer: TraceWriter = recorder.writer
    state = writer.resume_state or {"batches_done": 0, "tokens": 0, "next_seq_id": 0}
    done, tokens = int(state["batches_done"]), int(state["tokens"])
    recorder.next_seq_id = int(state["next_seq_id"])
    for index, (input_ids, mask, domains) in enumerate(batches(sequences, batch_size)):
        if index < done:
            continue
        if max_tokens is not None:
            room = max_tokens - tokens
            if room <= 0:
                break
            lengths = mask.sum(dim=1).tolist()
            keep = 0
            while keep < len(lengths) and sum(lengths[: keep + 1]) <= room:
                keep += 1
            if keep < len(lengths):
                if keep == 0:
                    break
                input_ids, mask, domains = input_ids[:keep], mask[:keep], domains[:keep]
        n = recorder.record(input_ids.to(device), mask.to(device), domains_B=domains)
        tokens += n
        done = index + 1
        if on_batch is not None:
            on_batch(n)
        if done % commit_every == 0:
            writer.commit({"batches_done": done, "tokens": tokens, "next_seq_id": recorder.next_seq_id})
    writer.commit({"batches_done": done, "tokens": tokens, "next_seq_id": recorder.next_seq_id})
    if tokens == 0:
        raise InputError(
            "the corpus produced no tokens to trace (empty files, or max_tokens too small for one sequence)."
        )
    return tokens


def corpus_description(entries: Sequence[CorpusEntry]) -> list[dict[str, Any]]:
    """JSON description of the corpus for the trace header."""
    return [{"domain": e.domain, "path": os.fspath(e.path), "files": len(e.files)} for e in entries]


def corpus_fingerprint(entries: Sequence[CorpusEntry]) -> list[dict[str, Any]]:
    """Per domain, a SHA-256 of its files' bytes: what a resumed trace must find unchanged."""
    from routelab.traces.resume_check import file_sha256

    return [{"domain": e.domain, "files": len(e.files), "sha256": file_sha256(e.files)} for e in entries]
