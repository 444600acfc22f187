"""Auxiliary-loss-free load balancing: a per-expert selection bias.

Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts"
(arXiv 2408.15664), used by DeepSeek-V3. The bias ``b`` is added to the scores used to
*select* experts; gates use the unbiased scores. Counts are accumulated over every
training forward (all micro-batches) and ``b`` moves once per optimizer step:

* ``sign``:         ``b_e += u * sign(mean(c) - c_e)`` (the paper's rule);
* ``proportional``: ``b_e += u * (mean(c) - c_e) / mean(c)`` (a constant dual step on the
  relative load error; Han & Zhong, arXiv 2512.03915, read it as dual ascent) [recon];
* ``decaying``:     as ``proportional`` with step ``u / n`` at update ``n`` [recon].

Optional re-centering (``b -= mean(b)``) and clamping guard against bias run-away.

With a token-dropping capacity, the loads ``c`` are counted after drops by default, as
Megatron-Core does (``local_tokens_per_expert`` sums the final ``routing_map``): an expert
is pushed down only by the tokens it actually processed. ``counts="before_drops"``
counts what the biased selection asked for instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from routelab.core.validation import check_choice, check_non_negative
from routelab.routers.parts.router import Balancer, RoutingDraft

STEP_RULES = ("sign", "proportional", "decaying")
LOAD_COUNTS = ("after_drops", "before_drops")


class LossFreeBias(Balancer):
    """Selection bias updated from the previous step's expert loads.

    Args:
        num_experts: ``E``.
        update_rate: ``u`` (1e-3 in DeepSeek-V3 and Wang et al.).
        step_rule: ``sign``, ``proportional`` or ``decaying``.
        recenter: subtract the mean bias after each update.
        clamp: if > 0, clamp the bias to ``[-clamp, clamp]``.
        counts: ``after_drops`` (Megatron-Core) or ``before_drops``: which loads move the bias
            when a capacity drops assignments (the same without capacity).
        all_reduce: sum counts over the default process group when torch.distributed is
            initialised (data parallel ranks must agree on the bias).
    """

    def __init__(
        self,
        num_experts: int,
        *,
        update_rate: float = 1e-3,
        step_rule: str = "sign",
        recenter: bool = False,
        clamp: float = 0.0,
        counts: str = "after_drops",
        all_reduce: bool = True,
    ) -> None:
        super().__init__()
        self.update_rate = check_non_negative("bias_update_rate", update_rate)
        self.step_rule = check_choice("bias_step_rule", step_rule, STEP_RULES)
        self.recenter = bool(recenter)
        self.clamp = check_non_negative("bias_clamp", clamp)
        self.counts = check_choice("bias_counts", counts, LOAD_COUNTS)
        self.all_reduce = all_reduce
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("pending_counts", torch.zeros(num_experts, dtype=torch.float32), persistent=False)

    def selection_scores(self, scores_TE: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        return scores_TE + self.bias.to(scores_TE.dtype)

    def observe(self, draft: RoutingDraft) -> None:
        """Count this forward's loads (called after the capacity stage; ``draft.topk_idx_TK``
        is the selection before drops, ``draft.extras["kept_topk_idx_TK"]`` after)."""
        assert draft.topk_idx_TK is not None
        idx_TK = draft.topk_idx_TK
        if self.counts == "after_drops":
            idx_TK = draft.extras.get("kept_topk_idx_TK", idx_TK)
        flat = idx_TK.reshape(-1)
        flat = flat[flat >= 0]
        self.pending_counts += torch.bincount(flat, minlength=self.bias.numel()).to(torch.float32)

    @torch.no_grad()
    def end_of_step(self) -> None:
        counts = self.pending_counts.clone()
        if self.all_reduce and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        self.pending_counts.zero_()
        if float(counts.sum()) <= 0:
            return
        self.num_updates += 1
        self.bias += self.bias_step(counts, counts.mean())
        if self.recenter:
            self.bias -= self.bias.mean()
        if self.clamp > 0:
            self.bias.clamp_(-self.clamp, self.clamp)

    def bias_step(self, counts_E: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """The change of ``b`` for the step's expert loads ``counts_E`` (``step_rule``;
        ``num_updates`` already counts this update)."""
        if self.step_rule == "sign":
            return self.update_rate * torch.sign(mean - counts_E)
        rate = self.update_rate
        if self.step_rule == "decaying":
            rate = rate / float(self.num_updates)
        return rate * (mean - counts_E) / mean
