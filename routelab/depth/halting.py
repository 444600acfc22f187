"""Multi-hop MoE with zero-shot relative-norm halting ("Equifinality in Mixture-of-Experts
Routing", arXiv 2604.14419) as a depth method of TinyLM.

Each block's MoE FFN is applied ``hops`` times with re-routing (``h <- h + MoE(h)``,
``routelab.moe.hops.apply_hops``); at inference a token stops after the hop whose
relative update ``||delta|| / ||h||`` is below ``threshold``, so later hops neither route
nor compute it. Halting is inference-only (training runs every hop). Decided per token
from its own state, so it is causal and works with a KV cache (attention is untouched).
"""

from __future__ import annotations

from typing import Any

import torch

from routelab.core.errors import ConfigError
from routelab.depth.blocks import attention_delta, count_ffn
from routelab.depth.result import DepthResult, LayerDecision
from routelab.depth.stack import DepthStack
from routelab.moe.hops import apply_hops


class HaltingStack(DepthStack):
    """``hops`` re-routed applications of every MoE FFN, halting by relative norm in eval.

    Args:
        hops: applications per block (>= 1).
        threshold: ``theta`` (None or 0 = never halt); used only in ``eval_mode="halt"``.
    """

    name = "halting"
    modes = ("all-hops", "halt")
    causal_modes = ("all-hops", "halt")

    def __init__(self, d_model: int, n_layers: int, *, hops: int = 2, threshold: float | None = 0.1,
                 train_mode: str = "all-hops", eval_mode: str = "halt", activation: str = "swiglu") -> None:
        super().__init__(train_mode=train_mode, eval_mode=eval_mode, activation=activation)
        if int(hops) < 1:
            raise ConfigError(f"hops must be >= 1, got {hops}.")
        self.hops, self.threshold, self.d_model = int(hops), threshold, d_model

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "hops": self.hops, "threshold": self.threshold}

    def forward(self, blocks, x_BSD, cos_Sd, sin_Sd, attn_mask_BSS, padding_mask_BS, context):
        result = DepthResult()
        options = tuple(f"hops{j}" for j in range(1, self.hops + 1))
        for index, block in enumerate(blocks):
            if not getattr(block, "is_moe", False):
                raise ConfigError("halting re-applies MoE FFNs; build the TinyLM with ffn='moe'.")
            x_BSD = x_BSD + attention_delta(block, x_BSD, cos_Sd, sin_Sd, padding_mask_BS, result.flops, attn_mask_BSS,
                                            context)
            h_BSD = block.ffn_norm(x_BSD)
            threshold = self.threshold if self.mode == "halt" else None
            out = apply_hops(block.ffn, h_BSD, hops=self.hops, halt_threshold=threshold, padding_mask=padding_mask_BS,
                             token_ids=context.token_ids)
            x_BSD = x_BSD + (out.h - h_BSD)
            for routing in out.routings:
                count_ffn(result.flops, block, 0, routing, self.activation)
            if out.routings:
                result.moe_routings.append(out.routings[0])
            if out.aux_loss.requires_grad or float(out.aux_loss) != 0.0:
                result.add_loss(f"hops_aux_{index}", out.aux_loss, 1.0)
            result.decisions.append(LayerDecision(index, options, out.hops_per_token - 1))
            result.extras[f"hops_mean_{index}"] = float(out.hops_per_token.float().mean())
        return x_BSD, result
