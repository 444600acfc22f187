"""Token-level and chunk-level activation sparsity of a recorded routing (BlockFFN).

From BlockFFN (Song et al., "BlockFFN: towards end-side acceleration-friendly
mixture-of-experts with chunk-level activation sparsity", arXiv 2507.08771); the routers
report the same quantities per batch with ``routelab.core.routing_sparsity``:

- ``TLS = 1 - nnz(A) / (T·E)``: the share of inactive (token, expert) pairs.
- ``CLS(W) = 1 - (active (chunk, expert) pairs) / (chunks·E)``: chunks are ``W``
  consecutive tokens of one sequence (positions ``[jW, (j+1)W)``); an expert is active in a
  chunk when any of its tokens uses it. Only full chunks count; when no sequence has a full
  chunk the partial ones are used so the value stays defined.

``sliding=True`` uses every sliding window of ``W`` tokens instead of aligned chunks: then
``1 - CLS`` is moe-lrc's window-union activation (arXiv 2505.16056), computed from the same
histogram as SRP. Oracle: active sets {0},{0},{1},{0}, E = 4 give TLS 0.75 and CLS(4) 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from routelab.core.errors import ConfigError, InputError
from routelab.metrics.replay import window_count_histogram


def active_mask(topk_idx_TK: np.ndarray, num_experts: int) -> np.ndarray:
    """bool ``[T, E]`` activity mask of a top-k map (``-1`` slots ignored)."""
    idx = np.asarray(topk_idx_TK)
    mask = np.zeros((idx.shape[0], num_experts + 1), dtype=bool)
    mask[np.repeat(np.arange(idx.shape[0]), idx.shape[1]), np.where(idx >= 0, idx, num_experts).ravel()] = True
    return mask[:, :num_experts]


def token_level_sparsity(topk_idx_TK: np.ndarray, num_experts: int) -> float:
    """``1 - nnz / (T·E)`` (1.0 for no tokens)."""
    idx = np.asarray(topk_idx_TK)
    if idx.shape[0] == 0:
        return 1.0
    return 1.0 - float(active_mask(idx, num_experts).sum()) / (idx.shape[0] * num_experts)


def chunk_level_sparsity(
    topk_idx_TK: np.ndarray,
    num_experts: int,
    seq_offsets: np.ndarray,
    window: int = 8,
    *,
    sliding: bool = False,
) -> float:
    """CLS(W) over the sequences ``[seq_offsets[s], seq_offsets[s+1])``.

    Args:
        window: ``W >= 1`` (``W = 1`` gives TLS).
        sliding: every sliding window of ``W`` tokens instead of aligned chunks.
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ConfigError(f"window must be an integer >= 1, got {window!r}.")
    idx = np.asarray(topk_idx_TK)
    offsets = np.asarray(seq_offsets, dtype=np.int64)
    if idx.shape[0] == 0:
        return 1.0
    if offsets[0] != 0 or offsets[-1] != idx.shape[0]:
        raise InputError(f"seq_offsets must run from 0 to the number of tokens ({idx.shape[0]}).")
    if sliding:
        hist = window_count_histogram(idx, num_experts, int(window), seg_offsets=offsets)
        total = hist.sum()
        if total == 0:
            raise InputError(f"no sequence has {window} tokens; use a smaller window.")
        return float(hist[0] / total)
    mask = active_mask(idx, num_experts)
    lengths = np.diff(offsets)
    seq_of_token = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(idx.shape[0]) - np.repeat(offsets[:-1], lengths)
    chunk_of_token = position // window
    chunks_per_seq = (lengths + window - 1) // window
    chunk_base = np.concatenate([[0], np.cumsum(chunks_per_seq)[:-1]])
    chunk_id = chunk_base[seq_of_token] + chunk_of_token
    num_chunks = int(chunks_per_seq.sum())
    active = np.zeros((num_chunks, num_experts), dtype=bool)
    rows, cols = np.nonzero(mask)
    active[chunk_id[rows], cols] = True
    tokens_per_chunk = np.bincount(chunk_id, minlength=num_chunks)
    full = tokens_per_chunk == window
    counted = full if full.any() else tokens_per_chunk > 0
    return 1.0 - float(active[counted].sum()) / (int(counted.sum()) * num_experts)


def sparsity_by_layer(
    trace,  # noqa: ANN001 - TraceLike
    windows: Sequence[int] = (1, 8, 64),
    *,
    sliding: bool = False,
) -> dict[int, dict[str, float]]:
    """``{layer: {"tls": ..., "cls_8": ..., ...}}`` for every layer of a trace."""
    offsets = trace.sequence_offsets()
    out = {}
    for layer in trace.layers:
        idx = trace.topk_idx(layer)
        row = {"tls": token_level_sparsity(idx, trace.num_experts)}
        for w in windows:
            row[f"cls_{w}"] = chunk_level_sparsity(idx, trace.num_experts, offsets, int(w), sliding=sliding)
        out[layer] = row
    return out
