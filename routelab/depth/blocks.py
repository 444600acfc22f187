"""Running the sublayers of a TinyLM block on all tokens or on a subset of them.

A subset is given per sequence as ``idx_BN`` (positions in ascending order) with a
``valid_BN`` mask: ``selection_index`` builds it from a boolean selection so that the
selected positions come first, in order, and the remaining slots point at distinct
unselected positions (ignored when adding the block's update back with ``add_to_tokens``). Selected tokens keep their original positions for the rotary embedding: the
cos/sin rows are gathered at ``idx_BN``, never renumbered ``0..N-1``.
"""

from __future__ import annotations

import torch
from torch import nn

from routelab.core.context import RoutingContext
from routelab.core.routing import Routing
from routelab.depth.flops import FlopCounter, causal_pairs
from routelab.depth.result import DepthResult

KV_CACHE_KEY = "depth_kv_cache"


def selection_index(selected_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx_BN, valid_BN)`` of a boolean ``[batch, seq]`` selection, ``N`` = the largest count."""
    counts_B = selected_BS.sum(dim=1)
    width = int(counts_B.max()) if selected_BS.numel() else 0
    order_BS = torch.sort((~selected_BS).to(torch.int8), dim=1, stable=True).indices
    idx_BN = order_BS[:, :width]
    valid_BN = torch.arange(width, device=selected_BS.device).unsqueeze(0) < counts_B.unsqueeze(1)
    return idx_BN, valid_BN


def gather_tokens(x_BSD: torch.Tensor, idx_BN: torch.Tensor) -> torch.Tensor:
    return x_BSD.gather(1, idx_BN.unsqueeze(-1).expand(-1, -1, x_BSD.shape[-1]))


def add_to_tokens(x_BSD: torch.Tensor, idx_BN: torch.Tensor, valid_BN: torch.Tensor, delta_BND: torch.Tensor) -> torch.Tensor:
    """``x_BSD`` plus ``delta_BND`` at the valid rows ``idx_BN`` (out of place; the gradient to
    ``x_BSD`` passes through unchanged, so the skipped tokens cost no extra backward work)."""
    batch, seq, d_model = x_BSD.shape
    rows_N = (idx_BN + torch.arange(batch, device=idx_BN.device).unsqueeze(1) * seq)[valid_BN]
    return x_BSD.reshape(batch * seq, d_model).index_add(0, rows_N, delta_BND[valid_BN].to(x_BSD.dtype)).view_as(x_BSD)


def subset_rope(cos_Sd: torch.Tensor, sin_Sd: torch.Tensor, positions_BN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary tables at the tokens' original positions, shaped ``[batch, 1, N, head_dim]``."""
    return cos_Sd[positions_BN].unsqueeze(1), sin_Sd[positions_BN].unsqueeze(1)


def subset_mask(valid_BN: torch.Tensor | None) -> torch.Tensor | None:
    """Causal mask over ordered tokens where only valid ones are keys; None when all are valid."""
    if valid_BN is None or bool(valid_BN.all()):
        return None
    n = valid_BN.shape[1]
    causal_NN = torch.ones(n, n, dtype=torch.bool, device=valid_BN.device).tril()
    eye_NN = torch.eye(n, dtype=torch.bool, device=valid_BN.device)
    return (causal_NN & valid_BN.unsqueeze(1)) | eye_NN


def subset_context(context: RoutingContext, idx_BN: torch.Tensor | None, valid_BN: torch.Tensor | None) -> RoutingContext:
    """The routing context of a token subset (token ids gathered, padding = invalid slots)."""
    if idx_BN is None:
        return context
    token_ids = context.token_ids.gather(1, idx_BN) if context.token_ids is not None else None
    padding = valid_BN if valid_BN is not None and not bool(valid_BN.all()) else None
    return RoutingContext(token_ids=token_ids, padding_mask=padding, timestep=context.timestep, carry=context.carry)


def ffn_width(ffn: nn.Module) -> int:
    """Hidden width of a dense FFN."""
    return int(ffn.w_out.in_features)


def count_ffn(counter: FlopCounter, block: nn.Module, tokens: int, routing: Routing | None, activation: str) -> None:
    """FLOPs of the block's FFN (dense, or MoE: router + assignments + shared experts)."""
    ffn = block.ffn
    d_model = block.ffn_norm.normalized_shape[0]
    if routing is None:
        counter.ffn(d_model, ffn_width(ffn), tokens, activation)
        return
    assignments = int((routing.topk_idx >= 0).sum())
    counter.linear(d_model, ffn.num_experts, routing.num_tokens, part="moe_router")
    counter.ffn(d_model, ffn.d_hidden, assignments, activation, part="ffn")
    if ffn.shared_experts is not None:
        counter.ffn(d_model, ffn_width(ffn.shared_experts), routing.num_tokens, activation, part="ffn")


def real_count(valid_BN: torch.Tensor | None, batch: int, n: int) -> int:
    return batch * n if valid_BN is None else int(valid_BN.sum())


def attention_delta(
    block: nn.Module,
    x_BND: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    valid_BN: torch.Tensor | None,
    counter: FlopCounter,
    attn_mask_BNN: torch.Tensor | None = None,
    context: RoutingContext | None = None,
) -> torch.Tensor:
    """``attn(attn_norm(x))`` of the block over the given tokens (causal in their order).

    While decoding (a ``KVCache`` in ``context.carry``) the tokens are new ones that attend
    to the cached keys and values of the earlier tokens that executed this block."""
    batch, n, d_model = x_BND.shape
    cache = context.carry.get(KV_CACHE_KEY) if context is not None else None
    if cache is not None:
        return cache.attend(block, block.attn_norm(x_BND), cos, sin, valid_BN, counter)
    mask = attn_mask_BNN if attn_mask_BNN is not None else subset_mask(valid_BN)
    delta, _ = block.attn(block.attn_norm(x_BND), cos, sin, mask, False)
    counter.attention(d_model, real_count(valid_BN, batch, n), causal_pairs(valid_BN, batch, n))
    return delta


def ffn_delta(
    block: nn.Module,
    h_BND: torch.Tensor,
    valid_BN: torch.Tensor | None,
    context: RoutingContext,
    counter: FlopCounter,
    activation: str,
) -> tuple[torch.Tensor, Routing | None]:
    """The block's FFN on normalised ``h_BND`` (dense or MoE) and its routing."""
    batch, n, _ = h_BND.shape
    if not getattr(block, "is_moe", False):
        count_ffn(counter, block, real_count(valid_BN, batch, n), None, activation)
        return block.ffn(h_BND), None
    out = block.ffn(h_BND, context=context)
    count_ffn(counter, block, 0, out.routing, activation)
    return out.y, out.routing


def run_block(
    block: nn.Module,
    x_BND: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    valid_BN: torch.Tensor | None,
    context: RoutingContext,
    counter: FlopCounter,
    activation: str,
    attn_mask_BNN: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Routing | None]:
    """The whole pre-norm block on the given tokens: ``x + attn``, then ``+ ffn``."""
    x_BND = x_BND + attention_delta(block, x_BND, cos, sin, valid_BN, counter, attn_mask_BNN, context)
    y, routing = ffn_delta(block, block.ffn_norm(x_BND), valid_BN, context, counter, activation)
    return x_BND + y, routing


def run_recorded_block(
    block: nn.Module,
    x_BND: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    valid_BN: torch.Tensor | None,
    context: RoutingContext,
    result: DepthResult,
    activation: str,
    attn_mask_BNN: torch.Tensor | None = None,
) -> torch.Tensor:
    """``run_block``, counting FLOPs into ``result`` and keeping the block's MoE routing there."""
    x_BND, routing = run_block(block, x_BND, cos, sin, valid_BN, context, result.flops, activation, attn_mask_BNN)
    if routing is not None:
        result.moe_routings.append(routing)
    return x_BND


def count_standard_forward(blocks: nn.ModuleList, routings: list[Routing], padding_mask_BS: torch.Tensor | None,
                           batch: int, seq: int, activation: str) -> FlopCounter:
    """FLOPs of a plain forward through every block (MoE FFNs counted from their routing)."""
    counter = FlopCounter()
    moe_routings = iter(routings)
    real = batch * seq if padding_mask_BS is None else int(padding_mask_BS.sum())
    for block in blocks:
        d_model = block.ffn_norm.normalized_shape[0]
        counter.attention(d_model, real, causal_pairs(padding_mask_BS, batch, seq))
        count_ffn(counter, block, real, next(moe_routings) if getattr(block, "is_moe", False) else None, activation)
    return counter
