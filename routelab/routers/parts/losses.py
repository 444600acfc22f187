"""Auxiliary router losses. Each returns an *unweighted* scalar; the router applies ``coef``.

* ``SwitchBalanceLoss`` — ``E * sum_e f_e * P_e`` (Fedus et al. 2021, Switch Transformer;
  GShard): ``f_e`` the fraction of assignments to expert e (counted before capacity drops),
  ``P_e`` the mean router probability of e over tokens (full distribution, before top-k).
  Equals 1 when ``f`` is uniform and ``E`` when every token goes to one expert with
  probability 1. Gradient flows only through ``P``. Which assignments ``f`` counts is the
  loss's ``counts`` (see ``LOSS_COUNTS``).
* ``SequenceBalanceLoss`` — the same per sequence, averaged over sequences (DeepSeek-V2/V3's
  complementary sequence-wise balance loss).
* ``ZLoss`` — ``mean_t logsumexp(z_t)^2`` on raw logits (Zoph et al. 2022, ST-MoE).
* ``ImportanceLoss`` / ``LoadLoss`` — ``CV^2`` of per-expert importance and of the smooth
  load estimate of noisy top-k gating (Shazeer et al. 2017).
"""

from __future__ import annotations

import torch

from routelab.core.validation import check_choice
from routelab.routers.parts.router import RouterLoss, RoutingDraft


# What ``f_e`` of a balance loss counts:
# * ``selection``: every slot the selector filled (Switch; any router);
# * ``first_choice``: only each token's first choice (GShard Algorithm 1, fairseq ``top2gating``);
# * ``unbiased_topk``: the plain top-k of the unbiased scores, ignoring any selection bias or
#   group limit (DeepSeek-V3 paper eq. 17-20; Megatron-Core ``compute_routing_scores_for_aux_loss``).
LOSS_COUNTS = ("selection", "first_choice", "unbiased_topk")


def counted_assignments(draft: RoutingDraft, counts: str) -> torch.Tensor:
    """The ``[T, k']`` expert ids (``-1`` = empty) that ``f_e`` counts under ``counts``."""
    assert draft.topk_idx_TK is not None
    if counts == "first_choice":
        return draft.topk_idx_TK[:, :1]
    if counts == "unbiased_topk":
        assert draft.scores_TE is not None
        k = min(draft.top_k, draft.num_experts)
        return torch.topk(draft.scores_TE.detach(), k, dim=-1).indices
    return draft.topk_idx_TK


def assignment_fractions(topk_idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``f_e``: fraction of (valid) assignments that went to each expert (no gradient)."""
    flat = topk_idx_TK.reshape(-1)
    flat = flat[flat >= 0]
    counts = torch.bincount(flat, minlength=num_experts).to(torch.float32)
    return counts / counts.sum().clamp_min(1.0)


def cv_squared(v: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Squared coefficient of variation ``Var / (Mean^2 + eps)`` (population variance)."""
    if v.numel() <= 1:
        return v.new_zeros(())
    return v.var(unbiased=False) / (v.mean() ** 2 + eps)


class SwitchBalanceLoss(RouterLoss):
    """Switch/GShard load-balancing loss ``E * sum_e f_e P_e`` (unweighted); ``counts`` says
    which assignments ``f`` counts (``LOSS_COUNTS``)."""

    def __init__(self, coef: float, name: str = "aux", counts: str = "selection") -> None:
        super().__init__(name, coef)
        self.counts = check_choice("counts", counts, LOSS_COUNTS)

    def extra_repr(self) -> str:
        return f"coef={self.coef}, counts={self.counts!r}"

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        f_E = assignment_fractions(counted_assignments(draft, self.counts), draft.num_experts)
        p_E = draft.probs_TE().mean(dim=0)
        return draft.num_experts * (f_E * p_E).sum()


class SequenceBalanceLoss(RouterLoss):
    """Switch loss computed per sequence and averaged over sequences (DeepSeek-V2/V3);
    ``counts`` says which assignments ``f`` counts (``LOSS_COUNTS``)."""

    def __init__(self, coef: float, name: str = "seq_aux", counts: str = "selection") -> None:
        super().__init__(name, coef)
        self.counts = check_choice("counts", counts, LOSS_COUNTS)

    def extra_repr(self) -> str:
        return f"coef={self.coef}, counts={self.counts!r}"

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        idx_TK = counted_assignments(draft, self.counts)
        num_experts = draft.num_experts
        seq_id_T = draft.batch.seq_id_T
        num_seqs = draft.batch.batch_size
        valid_TK = idx_TK >= 0
        rows_TK = seq_id_T.unsqueeze(1).expand_as(idx_TK)
        flat_key = (rows_TK * num_experts + idx_TK.clamp_min(0))[valid_TK]
        counts_BE = torch.bincount(flat_key, minlength=num_seqs * num_experts).view(num_seqs, num_experts).float()
        f_BE = counts_BE / counts_BE.sum(dim=1, keepdim=True).clamp_min(1.0)
        probs_TE = draft.probs_TE()
        p_sum_BE = probs_TE.new_zeros(num_seqs, num_experts).index_add(0, seq_id_T, probs_TE)
        lengths_B = torch.bincount(seq_id_T, minlength=num_seqs).to(probs_TE.dtype)
        p_BE = p_sum_BE / lengths_B.clamp_min(1.0).unsqueeze(1)
        per_seq_B = num_experts * (f_BE * p_BE).sum(dim=1)
        present_B = lengths_B > 0
        return per_seq_B[present_B].mean()


class ZLoss(RouterLoss):
    """Router z-loss ``mean_t logsumexp(z_t)^2`` (ST-MoE)."""

    def __init__(self, coef: float, name: str = "z") -> None:
        super().__init__(name, coef)

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        assert draft.logits_TE is not None
        return torch.logsumexp(draft.logits_TE, dim=-1).square().mean()


class ImportanceLoss(RouterLoss):
    """``CV^2`` of expert importance ``sum_t G_t`` (Shazeer et al. 2017)."""

    def __init__(self, coef: float, name: str = "importance") -> None:
        super().__init__(name, coef)

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        assert draft.topk_idx_TK is not None and draft.gate_TK is not None
        importance_E = draft.gate_TK.new_zeros(draft.num_experts).index_add(
            0, draft.topk_idx_TK.clamp_min(0).reshape(-1), draft.gate_TK.reshape(-1)
        )
        return cv_squared(importance_E)


class LoadLoss(RouterLoss):
    """``CV^2`` of the smooth load estimate of noisy top-k gating (Shazeer et al. 2017).

    ``P_te = Phi((z_te - theta_te) / sigma_te)`` where ``theta_te`` is the k-th largest
    noisy logit of token t if e is outside its top-k, else the (k+1)-th. Needs the clean
    logits and noise std that ``NoisyLinearScorer`` leaves in the draft; without noise
    (eval), the hard counts are used.
    """

    def __init__(self, coef: float, name: str = "load") -> None:
        super().__init__(name, coef)

    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        assert draft.logits_TE is not None and draft.topk_idx_TK is not None
        k = draft.top_k
        std_TE = draft.extras.get("noise_std_TE")
        if std_TE is None or k >= draft.num_experts:
            counts_E = torch.bincount(
                draft.topk_idx_TK[draft.topk_idx_TK >= 0], minlength=draft.num_experts
            ).to(torch.float32)
            return cv_squared(counts_E)
        clean_TE = draft.extras["clean_logits_TE"]
        noisy_TE = draft.logits_TE
        top_vals_TK1 = torch.topk(noisy_TE, k + 1, dim=-1).values
        threshold_in_T1 = top_vals_TK1[:, k : k + 1]
        threshold_out_T1 = top_vals_TK1[:, k - 1 : k]
        in_topk_TE = noisy_TE >= threshold_out_T1
        threshold_TE = torch.where(in_topk_TE, threshold_in_T1, threshold_out_T1)
        normal = torch.distributions.Normal(0.0, 1.0)
        prob_TE = normal.cdf((clean_TE - threshold_TE) / std_TE)
        return cv_squared(prob_TE.sum(dim=0))
