"""Slow, obviously-correct routing rules of the six transformers MoE routers, from their logits.

Written from the model papers / model cards, one token at a time with Python lists, to
check what routelab records and reproduces independently of the transformers code.
"""

from __future__ import annotations

import math


def _softmax(row: list[float]) -> list[float]:
    m = max(row)
    exps = [math.exp(v - m) for v in row]
    s = sum(exps)
    return [e / s for e in exps]


def _top(values: list[float], k: int) -> list[int]:
    return sorted(range(len(values)), key=lambda e: (-values[e], e))[:k]


def reference_route(arch: str, logits_row: list[float], k: int, *, norm_topk_prob: bool = True, bias=None,
                    num_groups: int = 1, topk_group: int = 1, scaling: float = 1.0) -> tuple[list[int], list[float]]:
    """(experts, gates) of one token, experts in decreasing selection score."""
    if arch == "gpt_oss":  # top-k of the logits, softmax over the selected logits
        experts = _top(logits_row, k)
        return experts, _softmax([logits_row[e] for e in experts])
    if arch == "deepseek_v3":  # sigmoid; bias for selection only; group-limited; renorm x scaling
        scores = [1.0 / (1.0 + math.exp(-v)) for v in logits_row]
        choice = [s + b for s, b in zip(scores, bias)]
        size = len(choice) // num_groups
        group_score = [sum(sorted(choice[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(num_groups)]
        kept = set(_top(group_score, topk_group))
        masked = [c if e // size in kept else -math.inf for e, c in enumerate(choice)]
        experts = _top(masked, k)
        gates = [scores[e] for e in experts]
        if norm_topk_prob:
            gates = [g / sum(gates) for g in gates]
        return experts, [g * scaling for g in gates]
    probs = _softmax(logits_row)  # Mixtral, OLMoE, Qwen2-MoE, Qwen3-MoE
    experts = _top(probs, k)
    gates = [probs[e] for e in experts]
    if norm_topk_prob:
        gates = [g / sum(gates) for g in gates]
    return experts, gates
