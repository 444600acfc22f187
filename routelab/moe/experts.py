"""Batched expert FFNs: all experts' weights in single ``[E, ...]`` tensors.

Experts run on tokens already sorted by expert (``forward_sorted``), either with one
``F.grouped_mm`` per projection (sort -> grouped GEMM, as in MegaBlocks/torchtitan) or
with a per-expert loop of plain matmuls (the fallback for dtypes or builds without
grouped GEMM). The gate weight of each row is folded into the hidden activation before
the down projection, so the combine is a plain scatter-add.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from routelab.core.validation import check_choice, check_positive_int

ACTIVATIONS = ("swiglu", "gelu", "relu")
IMPLEMENTATIONS = ("auto", "grouped_mm", "loop")
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_available(dtype: torch.dtype, device_type: str = "cpu") -> bool:
    """True when ``F.grouped_mm`` exists in this torch build and supports ``dtype`` on the device.

    On CPU it runs in fp32/bf16/fp16; CUDA kernels exist for bf16 only (Hopper and newer).
    """
    if not hasattr(F, "grouped_mm"):
        return False
    if device_type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] >= 9
    return device_type == "cpu" and dtype in _GROUPED_MM_DTYPES


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on, else ``x.dtype``."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class BatchedExperts(nn.Module):
    """``E`` independent FFN experts (SwiGLU, GELU or ReLU), stored as batched weights.

    Args:
        num_experts: ``E``.
        d_model: input/output width ``D``.
        d_hidden: hidden width ``H`` of each expert.
        activation: ``swiglu`` (``W_down(silu(x W_gate) * x W_up)``), ``gelu`` or ``relu``
            (the ReLU experts of MoE-X).
        implementation: ``auto`` (grouped GEMM when available), ``grouped_mm`` or ``loop``.
    """

    def __init__(
        self, num_experts: int, d_model: int, d_hidden: int, activation: str = "swiglu", implementation: str = "auto"
    ) -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.d_model = check_positive_int("d_model", d_model)
        self.d_hidden = check_positive_int("d_hidden", d_hidden)
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        self.implementation = check_choice("dispatch", implementation, IMPLEMENTATIONS)
        in_width = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.w_in_EDH = nn.Parameter(torch.empty(num_experts, d_model, in_width))
        self.w_out_EHD = nn.Parameter(torch.empty(num_experts, d_hidden, d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in_EDH, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.w_out_EHD, std=1.0 / math.sqrt(self.d_hidden))

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_hidden={self.d_hidden}, "
            f"activation={self.activation!r}, implementation={self.implementation!r}"
        )

    def activate(self, h_NH: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":
            gate_NH, up_NH = h_NH.chunk(2, dim=-1)
            return F.silu(gate_NH) * up_NH
        return F.relu(h_NH) if self.activation == "relu" else F.gelu(h_NH)

    def gate_projection(self) -> torch.Tensor:
        """``[E, D, H]``: the projection whose activation gates each hidden unit (the SwiGLU
        gate half, or the whole input projection of a GELU/ReLU expert). Router parts that
        read expert weights (ERC loss, MoE-X) use it; see ``routelab.routers.parts.expert_access``."""
        return self.w_in_EDH[..., : self.d_hidden]

    def grouped_mm_supported(self, dtype: torch.dtype) -> bool:
        """Grouped GEMM needs a supported dtype/device and 16-byte-aligned row strides."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        aligned = (self.d_model * itemsize) % 16 == 0 and (self.d_hidden * itemsize) % 16 == 0
        return grouped_mm_available(dtype, self.w_in_EDH.device.type) and aligned

    def use_grouped_mm(self, dtype: torch.dtype) -> bool:
        if self.implementation == "loop":
            return False
        supported = self.grouped_mm_supported(dtype)
        if self.implementation == "grouped_mm" and not supported:
            from routelab.core.errors import ConfigError

            raise ConfigError(
                f"dispatch='grouped_mm' cannot run {dtype} with d_model={self.d_model}, d_hidden={self.d_hidden} "
                "in this torch build (it needs float32/bfloat16/float16 and widths whose rows are multiples of "
                "16 bytes); use dispatch='auto' to fall back to the per-expert loop."
            )
        return supported

    def expert_forward(self, expert: int, x_ND: torch.Tensor) -> torch.Tensor:
        """One expert on a block of rows (the slow path, and the reference's building block)."""
        h_NH = x_ND @ self.w_in_EDH[expert].to(x_ND.dtype)
        return self.activate(h_NH) @ self.w_out_EHD[expert].to(x_ND.dtype)

    def forward_sorted(
        self,
        x_ND: torch.Tensor,
        counts_E: torch.Tensor,
        weight_N: torch.Tensor | None = None,
        *,
        w_in_EDH: torch.Tensor | None = None,
        w_out_EHD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the experts on rows sorted by expert (``counts_E[e]`` rows for expert e).

        ``weight_N`` (optional) scales each row's output (gate weights), applied to the
        hidden activation before the down projection. ``w_in_EDH``/``w_out_EHD`` run other
        weights of the same shape per expert (expert parallelism: the local experts plus
        experts lent by other ranks for one step).
        """
        dtype = compute_dtype(x_ND)
        x_ND = x_ND.to(dtype)
        w_in = (self.w_in_EDH if w_in_EDH is None else w_in_EDH).to(dtype)
        w_out = (self.w_out_EHD if w_out_EHD is None else w_out_EHD).to(dtype)
        if self.use_grouped_mm(dtype):
            offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
            act_NH = self.activate(F.grouped_mm(x_ND, w_in, offs=offsets_E))
            if weight_N is not None:
                act_NH = act_NH * weight_N.to(dtype).unsqueeze(-1)
            return F.grouped_mm(act_NH, w_out, offs=offsets_E)
        outputs = []
        start = 0
        for expert, count in enumerate(counts_E.tolist()):
            if count == 0:
                continue
            rows = slice(start, start + count)
            act_NH = self.activate(x_ND[rows] @ w_in[expert])
            if weight_N is not None:
                act_NH = act_NH * weight_N[rows].to(dtype).unsqueeze(-1)
            outputs.append(act_NH @ w_out[expert])
            start += count
        if not outputs:
            return x_ND.new_zeros(0, self.d_model)
        return torch.cat(outputs, dim=0)


class DenseFFN(nn.Module):
    """A dense FFN (SwiGLU, GELU or ReLU) used for shared experts and dense baselines."""

    def __init__(self, d_model: int, d_hidden: int, activation: str = "swiglu") -> None:
        super().__init__()
        self.activation = check_choice("activation", activation, ACTIVATIONS)
        in_width = 2 * d_hidden if activation == "swiglu" else d_hidden
        self.w_in = nn.Linear(d_model, in_width, bias=False)
        self.w_out = nn.Linear(d_hidden, d_model, bias=False)
        nn.init.normal_(self.w_in.weight, std=1.0 / math.sqrt(d_model))
        nn.init.normal_(self.w_out.weight, std=1.0 / math.sqrt(d_hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.w_in(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.relu(h) if self.activation == "relu" else F.gelu(h)
        return self.w_out(h)
