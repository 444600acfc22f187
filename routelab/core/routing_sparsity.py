"""Activation sparsity of one routing batch (torch, on the router's device): token-level
(TLS) and chunk-level (CLS) sparsity, reported by ReLU routers in ``Routing.stats``.

Definitions from BlockFFN (Song et al. 2025, "BlockFFN: Towards End-Side Acceleration-Friendly
Mixture-of-Experts with Chunk-Level Activation Sparsity", arXiv 2507.08771):

* ``TLS = 1 - nnz(G) / (T * E)``: the fraction of (token, expert) pairs that are inactive.
* ``CLS(W) = 1 - (active (window, expert) pairs) / (windows * E)``: windows are ``W``
  consecutive tokens of one sequence; an expert is active in a window when it is active
  for at least one of its tokens. A low CLS means consecutive tokens keep re-using
  different experts, which defeats expert caching and chunked decoding.

Windows never cross a sequence boundary. As in the BlockFFN statistics, only full windows
are counted; a batch without any full window (every sequence shorter than ``W``) is
measured on its partial windows instead, so the value is always defined.

Pure functions over ``[T, E]`` activity masks. ``routelab.metrics.sparsity`` computes the
same quantities over a recorded trace (numpy, ``token_level_sparsity`` /
``chunk_level_sparsity``, plus sliding windows); a test checks that the two agree.
"""

from __future__ import annotations

import torch

from routelab.core.errors import ConfigError


def activity_mask(topk_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """The ``[T, E]`` boolean activity mask of a top-k map (``-1`` slots ignored)."""
    num_tokens = topk_idx_TK.shape[0]
    mask_TE = torch.zeros(num_tokens, num_experts + 1, dtype=torch.bool, device=topk_idx_TK.device)
    slot_TK = torch.where(topk_idx_TK >= 0, topk_idx_TK, torch.full_like(topk_idx_TK, num_experts))
    mask_TE.scatter_(1, slot_TK, True)
    return mask_TE[:, :num_experts]


def tls_of_mask(mask_TE: torch.Tensor) -> torch.Tensor:
    """``1 - nnz / (T*E)`` of a ``[T, E]`` activity mask (1.0 for an empty batch)."""
    total = mask_TE.numel()
    if total == 0:
        return torch.ones((), device=mask_TE.device)
    return 1.0 - mask_TE.sum().to(torch.float32) / total


def cls_of_mask(
    mask_TE: torch.Tensor,
    seq_id_T: torch.Tensor,
    position_T: torch.Tensor,
    window: int = 8,
) -> torch.Tensor:
    """CLS(W) of a ``[T, E]`` activity mask; tokens are located by sequence id and position.

    Args:
        mask_TE: bool ``[T, E]``, True where the expert is active for the token.
        seq_id_T: sequence of each token.
        position_T: position of each token inside its sequence.
        window: ``W`` (>= 1). ``W = 1`` gives TLS.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ConfigError(f"window must be an integer >= 1, got {window!r}.")
    num_tokens, num_experts = mask_TE.shape
    device = mask_TE.device
    if num_tokens == 0 or num_experts == 0:
        return torch.ones((), device=device)
    seq_id_T = seq_id_T.long()
    chunk_T = torch.div(position_T.long(), window, rounding_mode="floor")
    chunks_per_seq = int(chunk_T.max()) + 1
    window_T = seq_id_T * chunks_per_seq + chunk_T
    num_windows = int(seq_id_T.max() + 1) * chunks_per_seq
    tokens_W = torch.bincount(window_T, minlength=num_windows)
    active_WE = torch.zeros(num_windows, num_experts, device=device).index_add_(0, window_T, mask_TE.to(torch.float32))
    full_W = tokens_W == window
    counted_W = full_W if bool(full_W.any()) else tokens_W > 0
    active_pairs = (active_WE[counted_W] > 0).sum().to(torch.float32)
    return 1.0 - active_pairs / (int(counted_W.sum()) * num_experts)


def sparsity_stats(
    mask_TE: torch.Tensor, seq_id_T: torch.Tensor, position_T: torch.Tensor, window: int = 8
) -> dict[str, torch.Tensor]:
    """``{"tls", "cls", "cls_window"}`` for ``Routing.stats``."""
    with torch.no_grad():
        return {
            "tls": tls_of_mask(mask_TE),
            "cls": cls_of_mask(mask_TE, seq_id_T, position_T, window),
            "cls_window": torch.tensor(float(window), device=mask_TE.device),
        }
