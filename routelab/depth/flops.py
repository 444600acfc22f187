"""Analytic FLOPs of what a forward actually executed (multiply-add = 2 FLOPs).

Counted per block: the attention projections (``8 d^2`` per executed query token), the
attention scores and weighted values (``4 d`` per (query, key) pair actually attended),
each FFN that ran (SwiGLU ``6 d h``, GELU/ReLU ``4 d h`` per token), every router
(``2 d_in d_out`` per token it scored), plus the tied output projection. Norms, softmax
and element-wise work are not counted. Training compute is taken as 3x the forward
(forward + backward), the usual convention (Kaplan et al. 2020, arXiv 2001.08361).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TRAIN_FLOPS_FACTOR = 3.0


def causal_pairs(valid_BN: torch.Tensor | None, batch: int, n: int) -> int:
    """(query, key) pairs of causal attention over ``n`` ordered tokens per row (real ones only)."""
    if valid_BN is None:
        return batch * n * (n + 1) // 2
    counts = valid_BN.long().sum(dim=1)
    return int((counts * (counts + 1) // 2).sum())


@dataclass
class FlopCounter:
    """Running FLOP count of one forward, by component."""

    by_part: dict[str, float] = field(default_factory=dict)
    tokens: int = 0

    def add(self, part: str, flops: float) -> None:
        self.by_part[part] = self.by_part.get(part, 0.0) + float(flops)

    def attention(self, d_model: int, query_tokens: int, pairs: int) -> None:
        self.add("attention_proj", 8 * d_model * d_model * query_tokens)
        self.add("attention_scores", 4 * d_model * pairs)

    def ffn(self, d_model: int, d_hidden: int, tokens: int, activation: str = "swiglu", part: str = "ffn") -> None:
        per_token = (6 if activation == "swiglu" else 4) * d_model * d_hidden
        self.add(part, per_token * tokens)

    def linear(self, d_in: int, d_out: int, tokens: int, part: str = "router") -> None:
        self.add(part, 2 * d_in * d_out * tokens)

    @property
    def total(self) -> float:
        return sum(self.by_part.values())

    def per_token(self) -> float:
        return self.total / max(self.tokens, 1)
