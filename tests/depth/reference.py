"""Slow, obviously-correct references for routelab.depth (one token at a time)."""

from __future__ import annotations

import math

import torch


def rotate(x_d: torch.Tensor, position: int, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding of one head vector at ``position`` ("rotate half" layout)."""
    half = x_d.shape[-1] // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, x_d.shape[-1], 2, dtype=torch.float64) / x_d.shape[-1]))
    angle = (position * inv_freq).float()
    cos, sin = torch.cat([angle.cos(), angle.cos()]), torch.cat([angle.sin(), angle.sin()])
    rotated = torch.cat([-x_d[half:], x_d[:half]])
    return x_d * cos + rotated * sin


def block_on_tokens(block, xs: list[torch.Tensor], positions: list[int]) -> list[torch.Tensor]:
    """A pre-norm block applied to an ordered list of tokens that attend only to each other
    (causally), each at its own original ``position``; one query at a time."""
    attn = block.attn
    heads, head_dim = attn.n_heads, attn.head_dim
    qkv = [attn.qkv(block.attn_norm(x)).view(3, heads, head_dim) for x in xs]
    outs = []
    for i, x in enumerate(xs):
        head_outs = []
        for h in range(heads):
            q = rotate(qkv[i][0, h], positions[i])
            keys = [rotate(qkv[j][1, h], positions[j]) for j in range(i + 1)]
            scores = torch.stack([q @ k for k in keys]) / math.sqrt(head_dim)
            probs = torch.softmax(scores, dim=0)
            head_outs.append(sum(p * qkv[j][2, h] for j, p in enumerate(probs)))
        x = x + attn.out(torch.cat(head_outs))
        outs.append(x + block.ffn(block.ffn_norm(x)))
    return outs


def mod_layer_reference(block, x_SD: torch.Tensor, selected_S: torch.Tensor, weight_S: torch.Tensor | None) -> torch.Tensor:
    """Mixture-of-Depths on one sequence: selected tokens get ``x + w (block(x) - x)``."""
    positions = selected_S.nonzero(as_tuple=True)[0].tolist()
    outs = block_on_tokens(block, [x_SD[p] for p in positions], positions)
    rows = list(x_SD.unbind(0))
    for p, y in zip(positions, outs):
        w = 1.0 if weight_S is None else weight_S[p]
        rows[p] = x_SD[p] + w * (y - x_SD[p])
    return torch.stack(rows)
