"""ReLU-routing presets: ReMoE and BlockFFN.

* ReMoE (Wang et al. 2025, "ReMoE: Fully Differentiable Mixture-of-Experts with ReLU
  Routing", arXiv 2412.14711; ``thu-ml/ReMoE``): gates ``G = ReLU(z)``, no top-k, no
  normalisation; an expert is active where ``G > 0``. Sparsity is driven by a load-weighted
  L1 term ``lambda_t * E * sum_e f_e P_e`` (``f_e = count_e / (T k)``, ``P_e = mean_t G_te``)
  whose coefficient adapts once per step toward the target sparsity ``1 - k/E``: x1.2 when
  the measured sparsity is below target, /1.2 otherwise, from ``lambda_0 = 1e-8``.
* BlockFFN (Song et al. 2025, arXiv 2507.08771; ``thunlp/BlockFFN``): gates
  ``RMSNorm_E(ReLU(r)) * gamma`` (RMS over the expert axis, learnable ``gamma``), an
  activation-locality loss ``BCEWithLogits(s r_{t-1}, sigmoid(s r_t))`` (steepness
  ``s = 100``) between consecutive tokens of a sequence, and a chunk-sparsification loss
  ``1 - mean_{chunk,e} prod_{t in chunk} (1 - p_te)`` with ``p = ReLU(r) / sum ReLU(r)``
  whose coefficient is adapted every 100 steps after the first 1000 (ratio of the recent
  to the previous window-mean loss, floored at 1.025 when above 1, capped at 4x the initial
  coefficient, reached linearly over the next window, as BlockFFN's
  ``AdaptiveLinearScheduler``).

Both routers give every token a variable number of experts: the selector returns the
active experts with ``k_max`` = the largest count in the batch and ``-1`` in the unused
slots, and reports TLS/CLS sparsity (``routelab.core.routing_sparsity``) in ``Routing.stats``.
The coefficients that adapt are buffers (saved in checkpoints) updated in ``end_of_step``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from routelab.core.errors import ConfigError
from routelab.core.routing_sparsity import sparsity_stats
from routelab.core.validation import check_non_negative, check_positive_int
from routelab.routers.parts.assembly import assemble_router
from routelab.routers.parts.router import Router, RouterLoss, RoutingDraft, ScoreFunction, Selector, StatefulPart
from routelab.routers.parts.score_functions import ReLU
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

class ActiveExpertsSelector(Selector):
    """Every expert with a positive score, as a ``[T, k_max]`` map with ``-1`` padding.

    Args:
        num_experts: ``E``.
        cls_window: window ``W`` of the chunk-level sparsity reported in stats.
    """

    def __init__(self, num_experts: int, *, cls_window: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.cls_window = check_positive_int("cls_window", cls_window)

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.scores_TE is not None
        scores_TE = draft.scores_TE
        mask_TE = scores_TE > 0
        draft.extra_stats.update(
            sparsity_stats(mask_TE, draft.batch.seq_id_T, draft.batch.position_T, self.cls_window)
        )
        num_tokens = scores_TE.shape[0]
        k_max = max(int(mask_TE.sum(dim=1).max()) if num_tokens else 0, 1)
        key_TE = torch.where(mask_TE, scores_TE.detach(), torch.full_like(scores_TE, -1.0))
        topk_idx_TK = torch.topk(key_TE, k_max, dim=-1).indices
        active_TK = mask_TE.gather(1, topk_idx_TK)
        topk_idx_TK = torch.where(active_TK, topk_idx_TK, torch.full_like(topk_idx_TK, -1))
        gate_TK = torch.where(active_TK, scores_TE.gather(1, topk_idx_TK.clamp_min(0)), torch.zeros((), device=scores_TE.device))
        return topk_idx_TK, gate_TK


class ReLURMSNorm(ScoreFunction):
    """``RMSNorm_E(ReLU(z)) * gamma``: RMS over the expert axis, learnable per-expert ``gamma`` (init 1)."""

    def __init__(self, num_experts: int, *, eps: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(num_experts))
        self.eps = check_non_negative("rmsnorm_eps", eps)

    def forward(self, logits_TE: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        act_TE = torch.relu(logits_TE)
        rms_T1 = torch.sqrt(act_TE.square().mean(dim=-1, keepdim=True) + self.eps)
        return act_TE / rms_T1 * self.gamma.float()


class AdaptiveCoefficient(StatefulPart):
    """Base of losses whose coefficient is a buffer that moves in ``end_of_step``.

    ``RouterLoss.coef`` (a float the router multiplies by) is kept equal to the buffer
    ``coef_value``, also after ``load_state_dict``.
    """

    coef: float

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super()._load_from_state_dict(*args, **kwargs)
        self.coef = float(self.coef_value)


class LoadWeightedL1Loss(AdaptiveCoefficient, RouterLoss):
    """ReMoE regulariser ``E * sum_e f_e P_e`` with an adaptive coefficient ``lambda``.

    Args:
        num_experts, top_k: ``E`` and the nominal ``k`` (target sparsity ``1 - k/E``).
        lambda_init: ``lambda_0`` (1e-8).
        factor: multiplicative step of ``lambda`` (1.2).
        target_sparsity: override of ``1 - k/E``.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        *,
        lambda_init: float,
        factor: float,
        target_sparsity: float | None,
        name: str = "l1",
    ) -> None:
        lambda_init = float(lambda_init)
        if not lambda_init > 0:
            raise ConfigError(f"l1_lambda_init must be > 0 (it is adapted multiplicatively), got {lambda_init}.")
        super().__init__(name, lambda_init)
        if not float(factor) > 1:
            raise ConfigError(f"l1_lambda_factor must be > 1, got {factor}.")
        self.factor = float(factor)
        self.top_k = top_k
        target = 1.0 - top_k / num_experts if target_sparsity is None else float(target_sparsity)
        if not 0 <= target < 1:
            raise ConfigError(f"target_sparsity must lie in [0, 1), got {target}.")
        self.target_sparsity = target
        self.register_buffer("coef_value", torch.tensor(lambda_init, dtype=torch.float64))
        self.register_buffer("pending_sparsity", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("pending_count", torch.zeros((), dtype=torch.float64), persistent=False)

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        assert draft.scores_TE is not None and draft.topk_idx_TK is not None
        gates_TE = draft.scores_TE
        if draft.training:
            with torch.no_grad():
                self.pending_sparsity += 1.0 - (gates_TE > 0).to(torch.float64).mean()
                self.pending_count += 1
        counts_E = torch.bincount(draft.topk_idx_TK[draft.topk_idx_TK >= 0], minlength=draft.num_experts).float()
        f_E = counts_E / (draft.num_tokens * self.top_k)
        return draft.num_experts * (f_E * gates_TE.mean(dim=0)).sum()

    @torch.no_grad()
    def end_of_step(self) -> None:
        if float(self.pending_count) > 0:
            sparsity = float(self.pending_sparsity / self.pending_count)
            if sparsity < self.target_sparsity:
                self.coef_value *= self.factor
            else:
                self.coef_value /= self.factor
            self.coef = float(self.coef_value)
        self.pending_sparsity.zero_()
        self.pending_count.zero_()


class ActivationLocalityLoss(RouterLoss):
    """BlockFFN AL loss: ``BCEWithLogits(s r_{t-1,e}, sigmoid(s r_{t,e}))`` over consecutive tokens.

    Only pairs where token ``t-1`` directly precedes ``t`` in the same sequence count
    (BlockFFN additionally cuts at document boundaries inside packed sequences).
    """

    def __init__(self, coef: float, *, steepness: float, name: str = "locality") -> None:
        super().__init__(name, coef)
        self.steepness = check_non_negative("locality_steepness", steepness)

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        assert draft.logits_TE is not None
        batch = draft.batch
        pair_T = (
            (batch.seq_id_T[1:] == batch.seq_id_T[:-1]) & (batch.position_T[1:] == batch.position_T[:-1] + 1)
        ).nonzero(as_tuple=True)[0]
        if pair_T.numel() == 0:
            return draft.logits_TE.sum() * 0.0
        previous_TE = draft.logits_TE.index_select(0, pair_T) * self.steepness
        current_TE = draft.logits_TE.index_select(0, pair_T + 1) * self.steepness
        return F.binary_cross_entropy_with_logits(previous_TE, torch.sigmoid(current_TE))


def chunk_sparsity_loss(p_TE: torch.Tensor, chunk_T: torch.Tensor, num_chunks: int) -> torch.Tensor:
    """``1 - mean_{chunk,e} prod_{t in chunk}(1 - p_te)`` over the non-empty chunks."""
    log_keep_TE = torch.log1p(-p_TE.clamp(max=1.0 - 1e-6))
    log_keep_WE = p_TE.new_zeros(num_chunks, p_TE.shape[1]).index_add(0, chunk_T, log_keep_TE)
    present_W = torch.bincount(chunk_T, minlength=num_chunks) > 0
    return 1.0 - torch.exp(log_keep_WE[present_W]).mean()


class ChunkSparsityLoss(AdaptiveCoefficient, RouterLoss):
    """BlockFFN CS loss on ``p = ReLU(r) / sum_e ReLU(r)`` with the adaptive coefficient schedule.

    Args:
        coef: initial coefficient (5e-2).
        chunk_size: tokens per chunk (64); chunks never cross sequences.
        warmup_steps: the coefficient ramps linearly from 0 over these steps (0 = none).
        stable_steps: no adaptation before this step (1000).
        window: adaptation period and averaging window in steps (100).
        min_factor: an increasing ratio is raised to at least this (1.025).
        max_factor: the coefficient never exceeds ``max_factor * coef`` (4).
        adaptive: False keeps the coefficient fixed.
    """

    def __init__(
        self,
        coef: float,
        *,
        chunk_size: int,
        warmup_steps: int,
        stable_steps: int,
        window: int,
        min_factor: float = 1.025,
        max_factor: float = 4.0,
        adaptive: bool,
        name: str = "chunk_sparsity",
    ) -> None:
        super().__init__(name, check_non_negative("chunk_loss_coef", coef))
        self.initial_coef = self.coef
        self.chunk_size = check_positive_int("chunk_size", chunk_size)
        self.warmup_steps = check_positive_int("chunk_warmup_steps", warmup_steps, minimum=0)
        self.stable_steps = check_positive_int("chunk_stable_steps", stable_steps, minimum=0)
        self.window = check_positive_int("chunk_window", window)
        self.min_factor = float(min_factor)
        self.max_factor = float(max_factor)
        if self.min_factor < 1 or self.max_factor < 1:
            raise ConfigError(f"chunk min_factor and max_factor must be >= 1, got {min_factor} and {max_factor}.")
        self.adaptive = bool(adaptive)
        start = 0.0 if self.warmup_steps else self.initial_coef
        self.coef = start
        self.register_buffer("coef_value", torch.tensor(start, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("ramp", torch.tensor([start, start, 0.0], dtype=torch.float64))  # from, to, progress
        self.register_buffer("window_sum", torch.zeros((), dtype=torch.float64))
        self.register_buffer("window_count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("previous_mean", torch.full((), -1.0, dtype=torch.float64))
        self.register_buffer("pending_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("pending_count", torch.zeros((), dtype=torch.float64), persistent=False)

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        assert draft.logits_TE is not None
        act_TE = torch.relu(draft.logits_TE)
        p_TE = act_TE / act_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        batch = draft.batch
        chunk_in_seq_T = torch.div(batch.position_T, self.chunk_size, rounding_mode="floor")
        chunks_per_seq = int(chunk_in_seq_T.max()) + 1
        chunk_T = batch.seq_id_T * chunks_per_seq + chunk_in_seq_T
        loss = chunk_sparsity_loss(p_TE, chunk_T, int(batch.seq_id_T.max() + 1) * chunks_per_seq)
        if draft.training:
            with torch.no_grad():
                self.pending_sum += loss.detach().double()
                self.pending_count += 1
        return loss

    @torch.no_grad()
    def end_of_step(self) -> None:
        self.step += 1
        step = int(self.step)
        if float(self.pending_count) > 0:
            self.window_sum += self.pending_sum / self.pending_count
            self.window_count += 1
        self.pending_sum.zero_()
        self.pending_count.zero_()
        if step < self.warmup_steps:
            self._set(self.initial_coef * step / self.warmup_steps)
            return
        start, end, progress = (float(v) for v in self.ramp)
        if step == self.warmup_steps:
            start = end = self.initial_coef
        progress = min(progress + 1.0, float(self.window))
        current = start + (end - start) * progress / self.window
        if step % self.window == 0:
            recent = float(self.window_sum / self.window_count) if float(self.window_count) > 0 else -1.0
            previous = float(self.previous_mean)
            if self.adaptive and step >= self.stable_steps and recent > 0 and previous > 0:
                ratio = recent / previous
                if ratio > 1:
                    ratio = max(self.min_factor, ratio)
                ratio = min(self.initial_coef * self.max_factor / max(current, 1e-30), ratio)
                start, end, progress = current, current * ratio, 0.0
            self.previous_mean.fill_(recent)
            self.window_sum.zero_()
            self.window_count.zero_()
        self.ramp.copy_(torch.tensor([start, end, progress], dtype=torch.float64))
        self._set(current)

    def _set(self, value: float) -> None:
        self.coef_value.fill_(value)
        self.coef = float(value)


class GateL1Loss(RouterLoss):
    """``||G||_1`` summed over tokens and experts (BlockFFN's optional L1 term)."""

    def __init__(self, coef: float, name: str = "gate_l1") -> None:
        super().__init__(name, coef)

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        assert draft.scores_TE is not None
        return draft.scores_TE.abs().sum()


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
