"""Batched LoRA-expert updates: no Python loop over adapters.

Two ways to combine experts, because methods differ in *where* they mix:

- **Output space** (token-level top-k, GLIDER/PHATGOOSE, ReMix, DynMoLE, LoRA-Mixer, uniform
  merge): ``delta_t = sum_k w_tk * s_e B_e^T A_e^T x_t`` over the slots of a ``Routing``.
  The valid (token, slot) pairs are sorted by expert and run as two grouped GEMMs
  (``x A`` then ``h B``; the gate is folded into ``h``), then scatter-added per token, the
  dispatch of ``routelab.moe``. Where ``F.grouped_mm`` cannot run (dtype/device/alignment)
  a dense path computes ``x A`` for all experts in one GEMM and contracts the gated
  ``[T, E*r]`` activations with all ``B`` in a second one (exact, E/k times the FLOPs).
- **Weight space** (Polytropon, MHR): every sequence gets its own adapter
  ``A_b = sum_s w_bs A_s`` (per head), applied with one batched matmul per factor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from routelab.adapters.bank import LoRABank
from routelab.moe import sort_by_expert

DISPATCH_MODES = ("auto", "grouped_mm", "dense")


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: the autocast dtype when autocast is on, else ``x.dtype``."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class GroupedMatmul(torch.autograd.Function):
    """``F.grouped_mm(x_NI, w_EFO, offs)`` with a backward that feeds contiguous operands.

    torch's own backward multiplies by ``w.transpose(-2, -1)`` views; on CPU the per-group
    matmuls on those strided ``[r, d]`` blocks ran several times slower than on contiguous
    copies (which cost ``E*r*d`` elements). The transposed input is made contiguous only when
    it is narrow (the ``[N, r]`` rank activations, where the copy is cheap) and ``N`` keeps the
    rows 16-byte aligned.
    """

    @staticmethod
    def forward(ctx, x_NI: torch.Tensor, w_EFO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        ctx.save_for_backward(x_NI, w_EFO, offsets_E)
        return F.grouped_mm(x_NI, w_EFO, offs=offsets_E)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_NO: torch.Tensor):  # noqa: ANN001, ANN205
        x_NI, w_EFO, offsets_E = ctx.saved_tensors
        grad_x = grad_w = None
        grad_NO = grad_NO.contiguous()
        if ctx.needs_input_grad[0]:
            grad_x = F.grouped_mm(grad_NO, w_EFO.transpose(-2, -1).contiguous(), offs=offsets_E)
        if ctx.needs_input_grad[1]:
            narrow = x_NI.shape[1] < grad_NO.shape[1]
            aligned = (x_NI.shape[0] * x_NI.element_size()) % 16 == 0
            x_IN = x_NI.T.contiguous() if narrow and aligned else x_NI.T
            grad_w = F.grouped_mm(x_IN, grad_NO, offs=offsets_E)
        return grad_x, grad_w, None


def grouped_mm_ok(bank: LoRABank, dtype: torch.dtype, device: torch.device) -> bool:
    """``F.grouped_mm`` exists for this dtype/device and every row stride is a multiple of 16 bytes."""
    if not hasattr(F, "grouped_mm"):
        return False
    if device.type == "cuda":
        if dtype != torch.bfloat16 or torch.cuda.get_device_capability(device)[0] < 9:
            return False
    elif device.type != "cpu" or dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    size = torch.empty((), dtype=dtype).element_size()
    return all((width * size) % 16 == 0 for width in (bank.d_in, bank.rank, bank.d_out))


def routed_delta(
    x_TD: torch.Tensor,
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    bank: LoRABank,
    mode: str = "auto",
) -> torch.Tensor:
    """``[T, d_out]`` update ``sum_k w_tk * scaling_e * (x_t A_e) B_e`` with ``e = topk_idx_TK[t, k]``.

    Empty slots (``-1``) are skipped. ``mode``: ``auto`` (grouped GEMM when possible, else
    dense), ``grouped_mm`` or ``dense``.
    """
    dtype = matmul_dtype(x_TD)
    x_TD = x_TD.to(dtype)
    num_tokens, k_max = topk_idx_TK.shape
    use_grouped = mode == "grouped_mm" or (mode == "auto" and grouped_mm_ok(bank, dtype, x_TD.device))
    if not use_grouped:
        return dense_delta(x_TD, topk_idx_TK, topk_weight_TK, bank)
    assignment_N, counts_E = sort_by_expert(topk_idx_TK, bank.num_experts)
    token_N = torch.div(assignment_N, k_max, rounding_mode="floor")
    expert_N = topk_idx_TK.reshape(-1).index_select(0, assignment_N)
    weight_N = topk_weight_TK.reshape(-1).index_select(0, assignment_N) * bank.scaling.index_select(0, expert_N)
    offsets_E = torch.cumsum(counts_E, 0).to(torch.int32)
    h_NR = GroupedMatmul.apply(x_TD.index_select(0, token_N), bank.lora_A.to(dtype), offsets_E)
    h_NR = h_NR * weight_N.to(dtype).unsqueeze(-1)
    y_NO = GroupedMatmul.apply(h_NR, bank.lora_B.to(dtype), offsets_E)
    return y_NO.new_zeros(num_tokens, bank.d_out).index_add(0, token_N, y_NO)


def dense_gates(topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[T, E]`` gate matrix of a top-k map (0 off-route), differentiable in the weights."""
    valid_TK = topk_idx_TK >= 0
    weight_TK = torch.where(valid_TK, topk_weight_TK, torch.zeros_like(topk_weight_TK))
    gates_TE = weight_TK.new_zeros(topk_idx_TK.shape[0], num_experts)
    return gates_TE.scatter_add(1, topk_idx_TK.clamp_min(0), weight_TK)


def dense_delta(x_TD: torch.Tensor, topk_idx_TK: torch.Tensor, topk_weight_TK: torch.Tensor, bank: LoRABank) -> torch.Tensor:
    """The same update with every expert's ``x A`` computed (two GEMMs over ``E*r`` columns)."""
    dtype = x_TD.dtype
    num_experts, rank = bank.num_experts, bank.rank
    gates_TE = dense_gates(topk_idx_TK, topk_weight_TK.float(), num_experts) * bank.scaling
    a_DF = bank.lora_A.to(dtype).permute(1, 0, 2).reshape(bank.d_in, num_experts * rank)
    h_TER = (x_TD @ a_DF).view(-1, num_experts, rank) * gates_TE.to(dtype).unsqueeze(-1)
    return h_TER.reshape(-1, num_experts * rank) @ bank.lora_B.to(dtype).reshape(num_experts * rank, bank.d_out)


def mixed_delta(x_BSD: torch.Tensor, weight_BGE: torch.Tensor, bank: LoRABank, num_heads: int) -> torch.Tensor:
    """Weight-space mixing of Polytropon (``num_heads = 1``) and MHR (``num_heads = h``).

    The bank holds ``S`` skills; head ``q`` owns the ``q``-th block of the input dims of
    ``A`` and of the output dims of ``B``. For sequence ``b``:
    ``A_b[q] = sum_s w[b, q, s] A_s[q-th input block]`` (likewise ``B``), and the update is
    ``scaling * (x A_b) B_b`` with one scaling shared by the skills (``1/r`` in the papers).
    """
    dtype = matmul_dtype(x_BSD)
    batch = x_BSD.shape[0]
    skills, d_in, rank, d_out = bank.num_experts, bank.d_in, bank.rank, bank.d_out
    w_BGE = weight_BGE.to(dtype)
    a_GEdr = bank.lora_A.to(dtype).view(skills, num_heads, d_in // num_heads, rank).transpose(0, 1)
    b_GEro = bank.lora_B.to(dtype).view(skills, rank, num_heads, d_out // num_heads).permute(2, 0, 1, 3)
    a_BDR = torch.einsum("bhs,hsdr->bhdr", w_BGE, a_GEdr).reshape(batch, d_in, rank)
    b_BRO = torch.einsum("bhs,hsro->brho", w_BGE, b_GEro).reshape(batch, rank, d_out)
    scaling = bank.scaling[0].to(dtype)
    return torch.bmm(torch.bmm(x_BSD.to(dtype), a_BDR), b_BRO) * scaling
