"""Sinkhorn-based selectors (spec §3): Megatron's Sinkhorn router and Selective Sinkhorn Routing.

* ``MegatronSinkhornSelector`` (Megatron-Core ``moe_utils.sinkhorn`` /
  ``router.sinkhorn_load_balancing``, used by BlackMamba, Anthony et al. 2024, arXiv
  2402.01771): in training, the experts of each token are the top-k of the row of the
  Sinkhorn plan of ``exp(z)`` (rows sum to 1/T, columns to 1/E), computed without
  gradient. The gates come from the logits, not from the plan: ``sigmoid(z)`` for k=1,
  ``softmax(z)`` for k>1, at the selected experts, not renormalised. In evaluation the
  selection is the plain top-k of those activated logits.
* ``SelectiveSinkhornSelector`` (Nguyen et al. 2025, "Selective Sinkhorn Routing for
  Improved Sparse Mixture of Experts", arXiv 2511.08972): the transport problem
  ``max <Pi, C> - xi <Pi, log Pi>`` with rows summing to 1 and columns to ``T/E``, cost
  ``C`` = the logits or ``softmax(z)``. The gates come from the plan: the top-k of each
  row, renormalised. It is used only on a fraction ``p_sel`` of the training forwards;
  the others (and evaluation) use standard softmax top-k, in training optionally with
  non-learned Gaussian noise on the logits. No auxiliary loss.

Because the plan couples all tokens of the batch, training-mode routing of a token
depends on the other tokens (a property of the methods, not of this implementation).
"""

from __future__ import annotations

import math

import torch

from routelab.core.errors import ConfigError
from routelab.core.validation import check_choice, check_non_negative, check_probability, check_top_k
from routelab.routers.base import RoutingDraft, Selector, StatefulPart
from routelab.routers.randomness import RandomSource
from routelab.routers.sinkhorn import check_sinkhorn_options, sinkhorn_potentials

SSR_COSTS = ("softmax", "logits")
SINKHORN_GRADS = ("detach", "unrolled")
SSR_DRAWS = ("forward", "step")


def _sinkhorn_stats(draft: RoutingDraft, iterations: int, converged: bool) -> None:
    device = draft.x_TD.device
    draft.extra_stats["sinkhorn_iterations"] = torch.tensor(float(iterations), device=device)
    draft.extra_stats["sinkhorn_converged"] = torch.tensor(float(converged), device=device)


class MegatronSinkhornSelector(Selector):
    """Top-k of the Sinkhorn plan of ``exp(z)`` in training; gates from the activated logits."""

    def __init__(self, num_experts: int, top_k: int, *, tol: float = 1e-4, max_iter: int = 100) -> None:
        super().__init__()
        self.top_k = check_top_k(top_k, num_experts)
        check_sinkhorn_options(tol, max_iter)
        self.tol, self.max_iter = float(tol), max_iter

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.logits_TE is not None and draft.scores_TE is not None
        num_tokens, num_experts = draft.logits_TE.shape
        if draft.training and num_tokens:
            with torch.no_grad():
                pot = sinkhorn_potentials(
                    draft.logits_TE.detach(),
                    row_mass=1.0 / num_tokens,
                    col_mass=1.0 / num_experts,
                    tol=self.tol,
                    max_iter=self.max_iter,
                )
                # the row potential is constant along a row, so it does not change the row's top-k
                rank_TE = draft.logits_TE.detach() + pot.g_E.unsqueeze(0)
                topk_idx_TK = torch.topk(rank_TE, self.top_k, dim=-1).indices
            _sinkhorn_stats(draft, pot.iterations, pot.converged)
        else:
            topk_idx_TK = torch.topk(draft.selection_scores_TE, self.top_k, dim=-1).indices
        return topk_idx_TK, draft.scores_TE.gather(1, topk_idx_TK)


class SelectiveSinkhornSelector(Selector, StatefulPart):
    """Selective Sinkhorn Routing: transport-map gates on a random fraction of training forwards.

    Args:
        num_experts, top_k: shape.
        p_sel: probability that a training forward is routed by Sinkhorn.
        xi: entropic regularisation of the transport problem.
        cost: ``softmax`` (the paper's "S" variant) or ``logits``.
        noise_std: std of the Gaussian noise added to the logits of the non-Sinkhorn
            training forwards (0 = none).
        sinkhorn_grad: ``unrolled`` (differentiate through the iterations) or ``detach``
            (the plan is a constant: the router gets no gradient on Sinkhorn forwards).
        draw: ``forward`` (a fresh draw at every training forward, per layer) or ``step``
            (one draw per optimizer step, made in ``end_of_step``; layers built with the
            same ``seed`` then agree).
        renorm_topk: renormalise the softmax gates of non-Sinkhorn forwards (False keeps
            the raw probabilities; top-1 is never renormalised, it would freeze the gate).
        tol, max_iter: Sinkhorn tolerance and iteration cap.
        seed: private generator seed (None = torch's global generator).
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        *,
        p_sel: float = 0.01,
        xi: float = 0.05,
        cost: str = "softmax",
        noise_std: float = 0.0,
        sinkhorn_grad: str = "unrolled",
        draw: str = "forward",
        renorm_topk: bool = True,
        tol: float = 1e-4,
        max_iter: int = 100,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = check_top_k(top_k, num_experts)
        self.p_sel = check_probability("p_sel", p_sel)
        xi = float(xi)
        if not xi > 0 or math.isinf(xi):
            raise ConfigError(f"xi must be a finite number > 0 (the entropic regularisation), got {xi}.")
        self.xi = xi
        self.cost = check_choice("ssr_cost", cost, SSR_COSTS)
        self.noise_std = check_non_negative("noise_std", noise_std)
        self.sinkhorn_grad = check_choice("sinkhorn_grad", sinkhorn_grad, SINKHORN_GRADS)
        self.draw = check_choice("ssr_draw", draw, SSR_DRAWS)
        self.renorm_topk = bool(renorm_topk) and top_k > 1
        check_sinkhorn_options(tol, max_iter)
        self.tol, self.max_iter = float(tol), max_iter
        self.random = RandomSource(seed)
        initial = self.random.uniform() < self.p_sel if draw == "step" else False
        self.register_buffer("sinkhorn_this_step", torch.tensor(initial))

    def extra_repr(self) -> str:
        return f"p_sel={self.p_sel}, xi={self.xi}, cost={self.cost!r}, sinkhorn_grad={self.sinkhorn_grad!r}"

    def use_sinkhorn(self, draft: RoutingDraft) -> bool:
        if not draft.training or draft.num_tokens == 0 or self.p_sel == 0.0:
            return False
        if self.draw == "step":
            return bool(self.sinkhorn_this_step)
        return self.random.uniform() < self.p_sel

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        use = self.use_sinkhorn(draft)
        draft.extra_stats["ssr_sinkhorn"] = torch.tensor(float(use), device=draft.x_TD.device)
        if use:
            return self._sinkhorn_route(draft)
        return self._softmax_route(draft)

    def _softmax_route(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.logits_TE is not None and draft.scores_TE is not None
        if draft.training and self.noise_std > 0:
            noisy_TE = draft.logits_TE + self.noise_std * self.random.normal_like(draft.logits_TE)
            probs_TE = torch.softmax(noisy_TE, dim=-1)
            rank_TE = probs_TE
        else:
            probs_TE = draft.scores_TE
            rank_TE = draft.selection_scores_TE
        topk_idx_TK = torch.topk(rank_TE, self.top_k, dim=-1).indices
        gate_TK = probs_TE.gather(1, topk_idx_TK)
        if self.renorm_topk:
            gate_TK = gate_TK / gate_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        return topk_idx_TK, gate_TK

    def _sinkhorn_route(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.logits_TE is not None and draft.scores_TE is not None
        num_tokens, num_experts = draft.logits_TE.shape
        cost_TE = draft.scores_TE if self.cost == "softmax" else draft.logits_TE
        if self.sinkhorn_grad == "detach":
            cost_TE = cost_TE.detach()
        log_kernel_TE = cost_TE / self.xi
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.sinkhorn_grad == "unrolled"):
            pot = sinkhorn_potentials(
                log_kernel_TE,
                row_mass=1.0,
                col_mass=num_tokens / num_experts,
                tol=self.tol,
                max_iter=self.max_iter,
            )
            # row t of the plan is exp(f_t) * exp(L_t + g): renormalised over the top-k the
            # factor exp(f_t) cancels, so the gates are a softmax of L + g over the selection
            row_TE = log_kernel_TE + pot.g_E.unsqueeze(0)
            top_val_TK, topk_idx_TK = torch.topk(row_TE, self.top_k, dim=-1)
            gate_TK = torch.softmax(top_val_TK, dim=-1)
        _sinkhorn_stats(draft, pot.iterations, pot.converged)
        return topk_idx_TK, gate_TK

    @torch.no_grad()
    def end_of_step(self) -> None:
        if self.draw == "step":
            self.sinkhorn_this_step.fill_(self.random.uniform() < self.p_sel)
