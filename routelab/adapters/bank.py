"""A bank of ``E`` LoRA experts for one frozen linear layer (Hu et al. 2021, LoRA, arXiv 2106.09685).

Expert ``e`` adds ``scaling_e * (x A_e) B_e`` to the frozen output ``x W^T``. The weights of
all experts live in two batched tensors, ``lora_A`` ``[E, d_in, r]`` and ``lora_B``
``[E, r, d_out]`` (the transposes of peft's per-adapter ``lora_A.weight`` ``[r, d_in]`` and
``lora_B.weight`` ``[d_out, r]``), so any number of experts runs as one grouped GEMM.
Initialisation follows peft's default: ``A`` Kaiming-uniform (``a = sqrt(5)``, i.e.
``U(-1/sqrt(d_in), 1/sqrt(d_in))``), ``B = 0``, so a fresh bank changes nothing.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from routelab.core.errors import ConfigError
from routelab.core.validation import check_positive_int


class LoRABank(nn.Module):
    """``E`` LoRA experts of rank ``r`` for a linear ``d_in -> d_out``.

    Args:
        num_experts, d_in, d_out, rank: shapes.
        scaling: the factor of every expert's update (peft: ``lora_alpha / r``; Polytropon
            and MHR: ``1 / r``); a per-expert ``[E]`` buffer, so loaded adapters keep their own.
    """

    def __init__(self, num_experts: int, d_in: int, d_out: int, rank: int, scaling: float = 1.0) -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.d_in = check_positive_int("d_in", d_in)
        self.d_out = check_positive_int("d_out", d_out)
        self.rank = check_positive_int("rank", rank)
        if not math.isfinite(scaling):
            raise ConfigError(f"scaling must be a finite number, got {scaling}.")
        self.lora_A = nn.Parameter(torch.empty(num_experts, d_in, rank))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, rank, d_out))
        self.register_buffer("scaling", torch.full((num_experts,), float(scaling)))
        self.reset_parameters()

    def reset_parameters(self, b_std: float = 0.0) -> None:
        """peft's init (``B = 0``); ``b_std > 0`` draws ``B ~ N(0, b_std)`` instead (tests, experts that
        must differ from the start)."""
        bound = 1.0 / math.sqrt(self.d_in)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound)
            if b_std > 0:
                self.lora_B.normal_(0.0, b_std)
            else:
                self.lora_B.zero_()

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}"

    def expert_delta(self, expert: int, x_ND: torch.Tensor) -> torch.Tensor:
        """One expert's update on rows ``x_ND`` (the slow, obvious path)."""
        dtype = x_ND.dtype
        return (x_ND @ self.lora_A[expert].to(dtype)) @ self.lora_B[expert].to(dtype) * self.scaling[expert].to(dtype)

    def delta_weight(self, expert: int) -> torch.Tensor:
        """``scaling_e * (A_e B_e)^T``: the ``[d_out, d_in]`` update of expert ``e`` to the base weight."""
        return (self.lora_A[expert] @ self.lora_B[expert]).T * self.scaling[expert]
