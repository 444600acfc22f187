"""ReXMoE cross-layer expert reuse with PSR, and condenser experts with bias-driven
sparsification (spec §13). DeepSeekMoE shared experts are a layer option
(``routelab.MoE(num_shared_experts=...)``); see docs/routers-dynamic-recurrent-graph-entropy-soft.md for the recipes."""

from __future__ import annotations

from routelab.routers.base import Router
from routelab.routers.presets.common import assemble_router, softmax_gate_mode
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset
from routelab.routers.reuse import ProgressiveScalingScorer, SparsifyingBias


@register_preset(
    "rexmoe",
    description="router over a pool of R*E experts shared with adjacent layers; progressive scaling routing (PSR) "
    "unmasks the pool from the layer's own block over psr_steps; build layers with routelab.moe.build_rexmoe_layers",
    paper="Tan et al. 2025, ReXMoE: Reusing Experts with Minimal Overhead in Mixture-of-Experts (Oct 2025)",
    default_top_k=2,
    common_defaults={"aux_loss_coef": 1e-2},
)
def build_rexmoe(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    reuse_factor: int = 3,
    local_block: int = 0,
    psr_steps: int = 1000,
    normalization: str = "auto",
) -> Router:
    """ReXMoE router [recon]: ``num_experts`` is the pool ``R * E`` (``R = reuse_factor``
    contiguous blocks, block ``local_block`` being the layer's own experts). PSR masks
    not-yet-enabled candidates (logit -1e9, never selected); the enabled count grows
    linearly from the local block (at least ``top_k``) to the whole pool over
    ``psr_steps`` optimizer steps (``end_of_step``), nearest blocks first. Softmax top-k,
    renormalised for k > 1, Switch loss 1e-2. ``routelab.moe.build_rexmoe_layers`` builds
    a model's layers with the pools and ``local_block`` set.
    """
    scorer = ProgressiveScalingScorer(
        spec.d_model,
        spec.num_experts,
        spec.top_k,
        reuse_factor=reuse_factor,
        local_block=local_block,
        psr_steps=psr_steps,
        init_std=common.router_init_std,
        jitter_eps=common.jitter_eps,
    )
    return assemble_router(spec, common, scorer=scorer, gate_mode=softmax_gate_mode(normalization, spec.top_k))


@register_preset(
    "condenser",
    description="softmax top-k with a sparsifying selection bias (opposite of loss-free: frequent experts up, "
    "long tail down), no aux loss; pair with num_shared_experts>=1, shared_expert_gate=True",
    paper="He et al. 2026, Preserving Long-Tailed Expert Information in MoE Tuning (condenser experts, arXiv 2604.23036)",
    default_top_k=2,
)
def build_condenser(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    bias_update_rate: float = 1e-3,
    sparsify_rule: str = "sign",
    tail_fraction: float = 0.5,
    bias_recenter: bool = False,
    bias_clamp: float = 0.0,
    normalization: str = "auto",
) -> Router:
    """Bias-driven sparsification [recon]: selection uses ``softmax(z) + b``; once per
    optimizer step ``b_e += u * sign(c_e - mean(c))`` (``sparsify_rule='sign'``: rich get
    richer) or ``b_e -= u`` for experts under ``tail_fraction`` of the mean load
    (``'tail'``). Gates use the unbiased probabilities. No auxiliary loss. The condenser
    experts are always-active gated shared experts of the layer:
    ``routelab.MoE(router="condenser", num_shared_experts=1, shared_expert_gate=True)``.
    """
    return assemble_router(
        spec,
        common,
        gate_mode=softmax_gate_mode(normalization, spec.top_k),
        balancer=SparsifyingBias(
            spec.num_experts,
            update_rate=bias_update_rate,
            rule=sparsify_rule,
            tail_fraction=tail_fraction,
            recenter=bias_recenter,
            clamp=bias_clamp,
        ),
    )
