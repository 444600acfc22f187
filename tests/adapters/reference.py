"""Slow, obviously-correct references for the adapter layers (one token and one expert at a time)."""

from __future__ import annotations

import numpy as np
import torch

from routelab.adapters import LoRABank


def reference_lora(x_D: torch.Tensor, a_DR: torch.Tensor, b_RO: torch.Tensor, scaling: float) -> torch.Tensor:
    """``scaling * (x A) B`` for one token, written as sums over the rank."""
    out = torch.zeros(b_RO.shape[1], dtype=x_D.dtype)
    for r in range(a_DR.shape[1]):
        out = out + (x_D * a_DR[:, r]).sum() * b_RO[r] * scaling
    return out


def reference_routed(x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor, bank: LoRABank) -> torch.Tensor:
    """``sum_k w_tk * LoRA_{idx_tk}(x_t)`` token by token, slot by slot (empty slots skipped)."""
    rows = []
    for t in range(x_TD.shape[0]):
        out = torch.zeros(bank.d_out, dtype=x_TD.dtype)
        for k in range(idx_TK.shape[1]):
            e = int(idx_TK[t, k])
            if e < 0:
                continue
            out = out + weight_TK[t, k] * reference_lora(x_TD[t], bank.lora_A[e], bank.lora_B[e], float(bank.scaling[e]))
        rows.append(out)
    return torch.stack(rows)


def reference_mhr(x_D: torch.Tensor, w_GE: torch.Tensor, bank: LoRABank) -> torch.Tensor:
    """MHR for one token: head q mixes the skills' q-th input block of A and q-th output block of B."""
    heads, skills = w_GE.shape
    d_in, d_out, rank = bank.d_in, bank.d_out, bank.rank
    a_DR = torch.zeros(d_in, rank)
    b_RO = torch.zeros(rank, d_out)
    bi, bo = d_in // heads, d_out // heads
    for q in range(heads):
        for s in range(skills):
            a_DR[q * bi:(q + 1) * bi] += w_GE[q, s] * bank.lora_A[s, q * bi:(q + 1) * bi]
            b_RO[:, q * bo:(q + 1) * bo] += w_GE[q, s] * bank.lora_B[s, :, q * bo:(q + 1) * bo]
    return reference_lora(x_D, a_DR, b_RO, float(bank.scaling[0]))


class LinUCB:
    """Plain disjoint LinUCB (Li et al. 2010), argmax with ties to the lowest arm."""

    def __init__(self, num_arms: int, dim: int, alpha: float, lam: float) -> None:
        self.A = [lam * np.eye(dim) for _ in range(num_arms)]
        self.b = [np.zeros(dim) for _ in range(num_arms)]
        self.alpha = alpha

    def select(self, x: np.ndarray) -> int:
        best, best_score = 0, -np.inf
        for arm, (a, b) in enumerate(zip(self.A, self.b)):
            a_inv = np.linalg.inv(a)
            score = (a_inv @ b) @ x + self.alpha * np.sqrt(x @ a_inv @ x)
            if score > best_score + 1e-12:
                best, best_score = arm, score
        return best

    def update(self, arm: int, x: np.ndarray, reward: float) -> None:
        self.A[arm] += np.outer(x, x)
        self.b[arm] += reward * x
