"""MoE layer benchmark: forward+backward of ``routelab.MoE`` against, in the same run,

(a) the ideal: only the expert GEMMs and activation on rows already sorted by expert
    (the same per-expert counts as the layer's own routing);
(b) a naive loop over experts with boolean masks (the pattern of eager HF MoE blocks);
(c) a dense FFN with the same active parameters (hidden width ``k * h``).

And a router-cost table: each router's own forward+backward (scoring, selection,
balancing, losses) as a fraction of its layer's forward+backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from routelab.bench.timing import median_time
from routelab.moe.dispatch import sort_by_expert
from routelab.moe.experts import BatchedExperts, DenseFFN
from routelab.moe.layer import MoE
from routelab.moe.soft import moe_layer


@dataclass(frozen=True)
class Shape:
    name: str
    num_experts: int
    top_k: int
    d_model: int
    d_hidden: int


SHAPES = {
    "coarse": Shape("coarse", num_experts=8, top_k=2, d_model=512, d_hidden=1024),
    "fine": Shape("fine", num_experts=64, top_k=8, d_model=512, d_hidden=128),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def shape_by_name(name: str) -> Shape:
    from routelab.core.errors import unknown_name

    if name not in SHAPES:
        raise unknown_name("shape", "--shapes", name, SHAPES)
    return SHAPES[name]


def naive_loop_forward(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, experts: BatchedExperts) -> torch.Tensor:
    """Loop over experts, find their tokens with a boolean mask, accumulate (HF eager style)."""
    out_TD = torch.zeros_like(x_TD)
    for expert in range(experts.num_experts):
        token_idx, slot = torch.where(topk_idx_TK == expert)
        if token_idx.numel() == 0:
            continue
        y = experts.expert_forward(expert, x_TD[token_idx]) * topk_weight_TK[token_idx, slot, None].to(x_TD.dtype)
        out_TD = out_TD.index_add(0, token_idx, y)
    return out_TD


_UPSTREAM: dict[tuple, torch.Tensor] = {}


def _backward(y: torch.Tensor, extra: torch.Tensor | None = None) -> None:
    """Backpropagate a fixed upstream gradient of ``y``'s shape (so every variant pays only
    for its own backward, not for a loss over outputs of different sizes), plus ``extra``."""
    key = (tuple(y.shape), y.dtype)
    if key not in _UPSTREAM:
        _UPSTREAM[key] = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    tensors, grads = [y], [_UPSTREAM[key]]
    if extra is not None and extra.requires_grad:
        tensors.append(extra)
        grads.append(torch.ones_like(extra))
    torch.autograd.backward(tensors, grads)


def time_layer_variants(router: str, shape: Shape, dtype: torch.dtype, tokens: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Seconds per forward+backward for the layer and the three references."""
    torch.manual_seed(seed)
    layer = moe_layer(
        d_model=shape.d_model, d_hidden=shape.d_hidden, num_experts=shape.num_experts, top_k=shape.top_k, router=router
    ).to(dtype)
    x = torch.randn(1, tokens, shape.d_model, dtype=dtype, requires_grad=True)
    token_ids = torch.randint(0, 50_000, (1, tokens))

    def run_layer() -> None:
        out = layer(x, token_ids=token_ids)
        _backward(out.y, out.aux_loss)

    with torch.no_grad():
        routing = layer(x, token_ids=token_ids).routing
    topk_idx, topk_weight = routing.topk_idx, routing.topk_weight.to(dtype)
    assignment_N, counts_E = sort_by_expert(topk_idx, shape.num_experts)
    k_max = topk_idx.shape[1]
    x_sorted = x.detach()[0].index_select(0, torch.div(assignment_N, k_max, rounding_mode="floor")).requires_grad_()
    weight_sorted = topk_weight.reshape(-1).index_select(0, assignment_N)

    def run_ideal() -> None:
        _backward(layer.experts.forward_sorted(x_sorted, counts_E, weight_sorted))

    def run_naive() -> None:
        _backward(naive_loop_forward(x[0], topk_idx, topk_weight, layer.experts))

    dense = DenseFFN(shape.d_model, shape.top_k * shape.d_hidden).to(dtype)

    def run_dense() -> None:
        _backward(dense(x[0]))

    return {
        "layer": median_time(run_layer, repeats=repeats),
        "ideal": median_time(run_ideal, repeats=repeats),
        "naive": median_time(run_naive, repeats=max(1, repeats // 2), warmup=1),
        "dense": median_time(run_dense, repeats=repeats),
    }


def run_layer_benchmark(
    router: str, shape_names: list[str], dtype_names: list[str], *, tokens: int, repeats: int, console: Console | None = None
) -> list[dict[str, object]]:
    """Print and return the layer-vs-references table."""
    console = console or Console()
    rows = []
    table = Table(title=f"MoE layer forward+backward, router={router}, {tokens} tokens (median of {repeats})")
    for col in ("shape", "dtype", "layer ms", "ideal ms", "naive ms", "dense ms", "layer/ideal", "naive/layer", "layer/dense"):
        table.add_column(col, justify="right")
    for shape_name in shape_names:
        shape = shape_by_name(shape_name)
        for dtype_name in dtype_names:
            if dtype_name not in DTYPES:
                from routelab.core.errors import unknown_name

                raise unknown_name("dtype", "--dtypes", dtype_name, DTYPES)
            t = time_layer_variants(router, shape, DTYPES[dtype_name], tokens, repeats)
            row = {
                "shape": shape.name,
                "dtype": dtype_name,
                **{f"{k}_ms": v * 1e3 for k, v in t.items()},
                "layer_over_ideal": t["layer"] / t["ideal"],
                "naive_over_layer": t["naive"] / t["layer"],
                "layer_over_dense": t["layer"] / t["dense"],
            }
            rows.append(row)
            table.add_row(
                shape.name,
                dtype_name,
                *(f"{row[f'{k}_ms']:.1f}" for k in ("layer", "ideal", "naive", "dense")),
                f"{row['layer_over_ideal']:.2f}",
                f"{row['naive_over_layer']:.2f}",
                f"{row['layer_over_dense']:.2f}",
            )
    console.print(table)
    return rows


def causal_uniform_attention(seq_len: int, batch: int = 1) -> torch.Tensor:
    """``[B, S, S]``: each token attends uniformly to itself and the tokens before it."""
    causal = torch.ones(seq_len, seq_len).tril()
    return (causal / causal.sum(dim=1, keepdim=True)).unsqueeze(0).expand(batch, -1, -1)


def time_router_share(
    router: str, shape: Shape, tokens: int, repeats: int, seed: int = 0, seq_len: int | None = None
) -> dict[str, float]:
    """Seconds of the router alone and of the whole layer (forward+backward, fp32).

    The ``tokens`` are ``tokens // seq_len`` sequences of ``seq_len`` (one sequence when
    ``seq_len`` is None); routers that compare or mix tokens within a sequence depend on it.
    """
    from routelab.core.context import RoutingContext, TokenBatch
    from routelab.core.validation import inputs_checked_by_layer
    from routelab.routers.registry import preset_info

    torch.manual_seed(seed)
    layer = moe_layer(
        d_model=shape.d_model, d_hidden=shape.d_hidden, num_experts=shape.num_experts, top_k=shape.top_k, router=router
    )
    seq_len = min(seq_len or tokens, tokens)
    num_seqs = max(1, tokens // seq_len)
    x = torch.randn(num_seqs, seq_len, shape.d_model, requires_grad=True)
    token_ids = torch.randint(0, 50_000, (num_seqs, seq_len))
    attention = causal_uniform_attention(seq_len, num_seqs) if preset_info(router).needs_attention else None
    batch = TokenBatch.from_mask(
        num_seqs, seq_len, None, token_ids=token_ids, context=RoutingContext(attention=attention)
    )
    x_TD = x.reshape(-1, shape.d_model)

    def run_layer() -> None:
        out = layer(x, token_ids=token_ids, attention=attention)
        _backward(out.y, out.aux_loss)
        layer.zero_grad(set_to_none=True)

    def run_router() -> None:
        with inputs_checked_by_layer():  # the router's cost inside its layer, which checks the input once
            routing = layer.router(x_TD, batch)
        loss = routing.topk_weight.sum() + routing.aux_loss
        if loss.requires_grad:
            loss.backward()
        layer.zero_grad(set_to_none=True)

    return {"layer": median_time(run_layer, repeats=repeats), "router": median_time(run_router, repeats=repeats)}


def run_router_cost_benchmark(
    names: list[str] | None,
    shape_names: list[str],
    *,
    tokens: int,
    repeats: int,
    seq_len: int | None = 1024,
    console: Console | None = None,
) -> list[dict[str, object]]:
    """Print and return each router's own cost as a fraction of its layer's time."""
    from rich.progress import Progress

    from routelab.routers.registry import PRESETS

    console = console or Console()
    names = names or PRESETS.names()
    rows = []
    layout = f"{max(1, tokens // min(seq_len or tokens, tokens))} x {min(seq_len or tokens, tokens)}"
    table = Table(title=f"Router cost as a share of MoE layer time (fp32 fwd+bwd, {tokens} tokens = {layout})")
    for col in ("router", *(f"{s} share" for s in shape_names), *(f"{s} layer ms" for s in shape_names)):
        table.add_column(col, justify="right")
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("timing routers", total=len(names) * len(shape_names))
        for name in names:
            row: dict[str, object] = {"router": name}
            for shape_name in shape_names:
                progress.update(task, description=f"{name} ({shape_name})")
                shape = shape_by_name(shape_name)
                t = time_router_share(name, shape, tokens, repeats, seq_len=seq_len)
                row[f"{shape_name}_share"] = t["router"] / t["layer"]
                row[f"{shape_name}_layer_ms"] = t["layer"] * 1e3
                progress.advance(task)
            rows.append(row)
    for row in rows:
        name = row["router"]
        table.add_row(
            name,
            *(f"{row[f'{s}_share']:.1%}" for s in shape_names),
            *(f"{row[f'{s}_layer_ms']:.1f}" for s in shape_names),
        )
    console.print(table)
    return rows
