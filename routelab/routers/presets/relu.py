"""ReLU-routing presets: ReMoE and BlockFFN (spec §8)."""

from __future__ import annotations

from routelab.core.validation import check_non_negative
from routelab.routers.base import Router, RouterLoss
from routelab.routers.presets.common import assemble_router
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset
from routelab.routers.relu_routing import (
    ActiveExpertsSelector,
    ActivationLocalityLoss,
    ChunkSparsityLoss,
    GateL1Loss,
    LoadWeightedL1Loss,
    ReLURMSNorm,
)
from routelab.routers.score_functions import ReLU

_VARIABLE_K = "each token uses every expert with a positive ReLU gate (0..E experts); gates are not normalised"


@register_preset(
    "remoe",
    description="G = ReLU(z), no top-k; load-weighted L1 with lambda adapted per step toward sparsity 1-k/E",
    paper="Wang et al. 2025, ReMoE: Fully Differentiable Mixture-of-Experts with ReLU Routing (arXiv 2412.14711)",
    default_top_k=2,
    exemptions={"weights_sum_to_one": _VARIABLE_K},
)
def build_remoe(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    l1_lambda_init: float = 1e-8,
    l1_lambda_factor: float = 1.2,
    target_sparsity: float | None = None,
    cls_window: int = 8,
) -> Router:
    """ReMoE: gates ``ReLU(z)``; every expert with a positive gate is active. The regulariser
    ``lambda * E * sum_e f_e P_e`` (``f_e`` = active count / (T k), ``P_e`` = mean gate) has
    ``lambda`` (init ``l1_lambda_init``) multiplied by ``l1_lambda_factor`` after a step whose
    sparsity was below ``target_sparsity`` (default ``1 - top_k/E``) and divided otherwise.
    ``top_k`` only sets the target. TLS and CLS(``cls_window``) are in ``Routing.stats``.
    Each layer adapts its own lambda (ReMoE shares one lambda across layers).
    """
    l1_loss = LoadWeightedL1Loss(
        spec.num_experts, spec.top_k, lambda_init=l1_lambda_init, factor=l1_lambda_factor,
        target_sparsity=target_sparsity,
    )
    return assemble_router(
        spec,
        common,
        score_fn=ReLU(),
        selector=ActiveExpertsSelector(spec.num_experts, cls_window=cls_window),
        gate_mode="none",
        extra_losses=[l1_loss],
    )


@register_preset(
    "blockffn",
    description="gates RMSNorm(ReLU(r)) * gamma, activation-locality loss 2e-3, adaptive chunk-sparsity "
    "loss 5e-2 (chunks of 64)",
    paper="Song et al. 2025, BlockFFN: Towards End-Side Acceleration-Friendly MoE with Chunk-Level "
    "Activation Sparsity (arXiv 2507.08771)",
    default_top_k=2,
    exemptions={"weights_sum_to_one": _VARIABLE_K + " (RMS-normalised over experts)"},
)
def build_blockffn(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    locality_loss_coef: float = 2e-3,
    locality_steepness: float = 100.0,
    chunk_loss_coef: float = 5e-2,
    chunk_size: int = 64,
    chunk_adaptive: bool = True,
    chunk_warmup_steps: int = 0,
    chunk_stable_steps: int = 1000,
    chunk_window: int = 100,
    gate_l1_coef: float = 0.0,
    rmsnorm_eps: float = 1e-5,
    cls_window: int = 8,
) -> Router:
    """BlockFFN routing: ``g = RMSNorm_E(ReLU(W_r x)) * gamma`` (learnable ``gamma``, init 1);
    active experts are those with ``g > 0``. Losses: activation locality
    (``locality_loss_coef``, sigmoid steepness ``locality_steepness``) between consecutive
    tokens of a sequence; chunk sparsification on ``p = ReLU(r)/sum ReLU(r)`` over chunks
    of ``chunk_size`` tokens, coefficient adapted every ``chunk_window`` steps after
    ``chunk_stable_steps`` (floor 1.025 on increases, cap 4x); optional ``||G||_1``
    (``gate_l1_coef``; BlockFFN writes it as ``lambda * 1e-8``). ``top_k`` is nominal (it
    sets nothing here). TLS and CLS(``cls_window``) are in ``Routing.stats``.
    """
    extra_losses: list[RouterLoss] = []
    if locality_loss_coef:
        extra_losses.append(
            ActivationLocalityLoss(check_non_negative("locality_loss_coef", locality_loss_coef), steepness=locality_steepness)
        )
    if chunk_loss_coef:
        extra_losses.append(
            ChunkSparsityLoss(
                chunk_loss_coef,
                chunk_size=chunk_size,
                warmup_steps=chunk_warmup_steps,
                stable_steps=chunk_stable_steps,
                window=chunk_window,
                adaptive=chunk_adaptive,
            )
        )
    if gate_l1_coef:
        extra_losses.append(GateL1Loss(check_non_negative("gate_l1_coef", gate_l1_coef)))
    return assemble_router(
        spec,
        common,
        score_fn=ReLURMSNorm(spec.num_experts, eps=rmsnorm_eps),
        selector=ActiveExpertsSelector(spec.num_experts, cls_window=cls_window),
        gate_mode="none",
        extra_losses=extra_losses,
    )
