"""gamma-MoD (``Yaxin9Luo/Gamma-MOD``, "gamma-MoD: Exploring Mixture-of-Depth Adaptation for
Multimodal Large Language Models", arXiv 2410.13859).

Which layers become MoD layers is decided by their attention rank (ARank,
``compute_attention_rank`` in the code): per head, take the causal attention map, zero its
diagonal and compute its matrix rank; average over heads and samples. Low-ARank layers are
redundant and are routed (``select_layers_by_arank``).

The router of a routed layer is ``Linear(d, 2)`` on the block's input norm, ``p =
softmax(.)[1]`` the execute probability (``create_router("switch", num_experts=2,
top_k=1)``: the same parts and ``Routing`` as an MoE router). Masked routing learning:
protected tokens (question/answer in the paper; ``set_protected``) get ``+1`` so they are
always selected, and ``top_k = ceil(S (1 - skip_ratio * prefix / S))`` tokens run the
block, ``prefix`` being the unprotected tokens: half of them are skipped at
``skip_ratio = 0.5``. The selected tokens run attention and the FFN together, the FFN
output scaled by ``p``; an auxiliary cross-entropy (coefficient 0.01) teaches the router
the top-k membership. At inference a token runs the layer iff ``p >= 0.5`` (the decode
rule; the code's prefill keeps ``p > 0.005``, ``prefill_threshold``). The code renumbers
the selected tokens' positions ``0..k-1``; routelab keeps the original positions by
default (``renumber_positions=True`` reproduces the code).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from routelab.core.errors import ConfigError
from routelab.depth.blocks import (
    add_to_tokens, attention_delta, ffn_delta, gather_tokens, run_recorded_block, selection_index, subset_context, subset_rope,
)
from routelab.depth.mod import MoDStack, flat_tokens, to_grid
from routelab.depth.result import DepthResult, LayerDecision
from routelab.routers import create_router


def gamma_top_k(seq_len: int, prefix_len: int, skip_ratio: float = 0.5) -> int:
    """Tokens kept by masked routing learning: ``ceil(S (1 - skip_ratio * prefix / S))``."""
    if not 0 <= prefix_len <= seq_len:
        raise ConfigError(f"prefix_len must be in 0..seq_len={seq_len}, got {prefix_len}.")
    return int(math.ceil(seq_len * (1 - skip_ratio * prefix_len / seq_len) - 1e-9))


def attention_rank(maps_BHSS: torch.Tensor, tol: float | None = None) -> float:
    """ARank: mean over samples and heads of ``rank(tril(A) with a zero diagonal)``."""
    if maps_BHSS.dim() == 2:
        maps_BHSS = maps_BHSS[None, None]
    elif maps_BHSS.dim() == 3:
        maps_BHSS = maps_BHSS[None]
    seq = maps_BHSS.shape[-1]
    keep = torch.ones(seq, seq, dtype=torch.bool, device=maps_BHSS.device).tril(diagonal=-1)
    masked = maps_BHSS.double() * keep
    ranks = torch.linalg.matrix_rank(masked) if tol is None else torch.linalg.matrix_rank(masked, atol=tol, rtol=0.0)
    return float(ranks.double().mean())


def head_attention_maps(block: Any, x_BSD: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    """Per-head causal attention probabilities ``[B, H, S, S]`` of a TinyLM block's attention."""
    from routelab.models.tinylm import apply_rotary  # noqa: PLC0415 - the block's own rotary layout

    attn = block.attn
    batch, seq, d_model = x_BSD.shape
    q, k, _ = attn.qkv(block.attn_norm(x_BSD)).view(batch, seq, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = apply_rotary(q, cos_Sd, sin_Sd), apply_rotary(k, cos_Sd, sin_Sd)
    scores = (q @ k.transpose(-2, -1)).float() / math.sqrt(attn.head_dim)
    causal = torch.ones(seq, seq, dtype=torch.bool, device=x_BSD.device).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


@torch.no_grad()
def arank_per_layer(model: Any, input_ids_BS: torch.Tensor) -> list[float]:
    """ARank of every block of a dense TinyLM on calibration sequences."""
    seq = input_ids_BS.shape[1]
    cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
    x = model.embed(input_ids_BS)
    ranks = []
    for block in model.blocks:
        ranks.append(attention_rank(head_attention_maps(block, x, cos, sin)))
        attn_out, _ = block.attn(block.attn_norm(x), cos, sin, None, False)
        x = x + attn_out
        h = block.ffn_norm(x)
        x = x + (block.ffn(h) if not block.is_moe else block.ffn(h).y)
    return ranks


def select_layers_by_arank(aranks: list[float], num_layers: int) -> list[int]:
    """The ``num_layers`` layers of lowest ARank (ties: the later layer), in layer order."""
    order = sorted(range(len(aranks)), key=lambda i: (aranks[i], -i))
    return sorted(order[:num_layers])


class GammaMoDStack(MoDStack):
    """gamma-MoD routed layers (see the module docstring); ``layers`` from ARank.

    Args:
        skip_ratio: share of unprotected tokens skipped in training (0.5).
        aux_coef: router cross-entropy coefficient (0.01).
        eval_mode: ``threshold`` (p >= 0.5, default) or ``topk``.
    """

    name = "gamma-mod"
    modes = ("topk", "threshold")
    causal_modes = ("threshold",)

    def __init__(self, d_model: int, n_layers: int, *, layers: list[int] | None = None, every: int = 2,
                 skip_ratio: float = 0.5, aux_coef: float = 0.01, threshold: float = 0.5,
                 prefill_threshold: float = 0.005, renumber_positions: bool = False,
                 train_mode: str = "topk", eval_mode: str = "threshold", activation: str = "swiglu") -> None:
        super().__init__(d_model, n_layers, capacity=1.0, every=every, layers=layers, weight="none",
                         aux_coef=aux_coef, predictor_coef=0.0, train_mode=train_mode, eval_mode=eval_mode,
                         activation=activation)
        if not 0 <= skip_ratio <= 1:
            raise ConfigError(f"skip_ratio must be in [0, 1], got {skip_ratio}.")
        self.skip_ratio, self.threshold, self.prefill_threshold = float(skip_ratio), float(threshold), float(prefill_threshold)
        self.renumber_positions = bool(renumber_positions)
        del self.routers, self.predictors
        self.routers = torch.nn.ModuleDict({
            str(l): create_router("switch", d_model=d_model, num_experts=2, top_k=1, aux_loss_coef=0.0) for l in self.layers
        })
        self._protected: torch.Tensor | None = None

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "skip_ratio": self.skip_ratio, "threshold": self.threshold}

    def set_protected(self, protected_BS: torch.Tensor | None) -> None:
        """Tokens always executed in training (the paper's question and answer tokens)."""
        self._protected = protected_BS

    def gamma_decide(self, layer: int, block, x_BSD, padding_mask_BS, context, result: DepthResult):
        h_TD, tokens = flat_tokens(block.attn_norm(x_BSD), padding_mask_BS, context)
        routing = self.routers[str(layer)](h_TD, tokens)
        result.flops.linear(self.d_model, 2, tokens.num_tokens, part="depth_router")
        p_BS = to_grid(routing.scores[:, 1], tokens, 0.0)
        real_BS = padding_mask_BS if padding_mask_BS is not None else torch.ones_like(p_BS, dtype=torch.bool)
        protected_BS = self._protected if self._protected is not None else torch.zeros_like(real_BS)
        protected_BS = protected_BS & real_BS
        ranked = (p_BS.detach() + protected_BS.float()).masked_fill(~real_BS, float("-inf"))
        lengths = real_BS.sum(dim=1)
        keep_B = torch.tensor([gamma_top_k(int(n), int(n - m), self.skip_ratio)
                               for n, m in zip(lengths.tolist(), (protected_BS.sum(dim=1)).tolist())],
                              device=x_BSD.device)
        order = ranked.argsort(dim=1, descending=True, stable=True)
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device).expand_as(order))
        topk_BS = (ranks < keep_B.unsqueeze(1)) & real_BS
        if self.training and tokens.num_tokens:
            target_T = topk_BS.reshape(-1).index_select(0, tokens.flat_index_T).long()
            result.add_loss(f"gamma_ce_{layer}", F.cross_entropy(routing.logits, target_T), self.aux_coef)
        selected_BS = topk_BS if self.mode == "topk" else (p_BS >= self.threshold) & real_BS
        with torch.no_grad():
            result.extras[f"mismatch_threshold_{layer}"] = float(((p_BS >= self.threshold) != topk_BS)[real_BS].float().mean())
        result.routings.append(routing)
        result.decisions.append(LayerDecision(layer, ("skip", "execute"), torch.where(real_BS, selected_BS.long(), -1), p_BS))
        return selected_BS, p_BS

    def forward(self, blocks, x_BSD, cos_Sd, sin_Sd, attn_mask_BSS, padding_mask_BS, context):
        result = DepthResult()
        for index, block in enumerate(blocks):
            if index not in self.layers:
                x_BSD = run_recorded_block(block, x_BSD, cos_Sd, sin_Sd, padding_mask_BS, context, result,
                                           self.activation, attn_mask_BSS)
                continue
            selected_BS, p_BS = self.gamma_decide(index, block, x_BSD, padding_mask_BS, context, result)
            idx_BN, valid_BN = selection_index(selected_BS)
            if idx_BN.shape[1] == 0:
                continue
            x_sel = gather_tokens(x_BSD, idx_BN)
            positions = torch.arange(idx_BN.shape[1], device=idx_BN.device).expand_as(idx_BN) if self.renumber_positions else idx_BN
            cos, sin = subset_rope(cos_Sd, sin_Sd, positions)
            x_sel = x_sel + attention_delta(block, x_sel, cos, sin, valid_BN, result.flops, None,
                                            subset_context(context, idx_BN, valid_BN))
            y, routing = ffn_delta(block, block.ffn_norm(x_sel), valid_BN, subset_context(context, idx_BN, valid_BN),
                                   result.flops, self.activation)
            if routing is not None:
                result.moe_routings.append(routing)
            new_sel = x_sel + p_BS.gather(1, idx_BN).unsqueeze(-1).to(y.dtype) * y
            x_BSD = add_to_tokens(x_BSD, idx_BN, valid_BN, new_sel - gather_tokens(x_BSD, idx_BN))
        return x_BSD, result
