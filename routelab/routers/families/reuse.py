"""ReXMoE cross-layer expert reuse with PSR, and condenser experts with bias-driven
sparsification. DeepSeekMoE shared experts are a layer option
(``routelab.MoE(num_shared_experts=...)``); see docs/routers-dynamic-recurrent-graph-entropy-soft.md for the recipes.

Parts for cross-layer expert reuse and long-tail sparsification.

**ReXMoE** (Tan et al. 2025, "ReXMoE: Reusing Experts with Minimal Overhead in
Mixture-of-Experts", Oct 2025): the router of layer ``l`` scores a pool of
``R * E`` candidates, its own ``E`` experts plus those of adjacent layers (expert weights
are shared; only the router grows). Progressive scaling routing (PSR) masks the
not-yet-enabled candidates and enables more of them as training goes until the whole
pool is available. ``ProgressiveScalingScorer`` is a linear scorer over the pool whose
masked candidates get a logit of ``-1e9`` (probability exactly 0 after a softmax, so
they are never selected). The pool is split into ``R`` contiguous blocks
(``torch.tensor_split``); block ``local_block`` holds the layer's own experts and is
enabled from the start (with more candidates if it holds fewer than ``top_k``). The
enabled count grows linearly from there to the full pool over ``psr_steps`` optimizer
steps (``end_of_step``); candidates are enabled block by block, nearest layer first
(ties: lower block first), in index order inside a block. The pool layout and schedule
shape are a reconstruction from the paper's figure caption [recon].

**Bias-driven sparsification** (condenser experts, He et al. 2026, "Preserving
Long-Tailed Expert Information in Mixture-of-Experts Tuning", arXiv 2604.23036): a
selection bias like the loss-free balancer's, with the opposite aim: keep task-relevant
experts active and push long-tailed ones to inactivity. Rules [recon]:

* ``sign`` (default): ``b_e += u * sign(c_e - mean(c))`` (rich get richer);
* ``tail``: ``b_e -= u`` only for experts whose load is below ``tail_fraction * mean(c)``.

As with every balancer the bias changes which experts are selected, never gate values.
"""

from __future__ import annotations

import torch

from routelab.core.errors import ConfigError
from routelab.core.validation import check_choice, check_non_negative, check_positive_int
from routelab.routers.parts.assembly import assemble_router, softmax_gate_mode
from routelab.routers.parts.balancers import LossFreeBias
from routelab.routers.parts.router import Router, RoutingDraft, StatefulPart
from routelab.routers.parts.scorers import LinearScorer
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

MASKED_LOGIT = -1e9


def enable_order(num_candidates: int, reuse_factor: int, local_block: int) -> torch.Tensor:
    """Candidate ids in the order PSR enables them: the local block, then blocks by distance."""
    blocks = torch.tensor_split(torch.arange(num_candidates), reuse_factor)
    by_distance = sorted(range(reuse_factor), key=lambda b: (abs(b - local_block), b))
    return torch.cat([blocks[b] for b in by_distance])


class ProgressiveScalingScorer(LinearScorer, StatefulPart):
    """Linear scorer over a pool of candidates with the PSR mask (see module docstring).

    Args:
        d_model, num_experts: ``num_experts`` is the pool size ``R * E``.
        top_k: experts per token (at least this many candidates are always enabled).
        reuse_factor: ``R``, number of blocks (layers) in the pool.
        local_block: index of this layer's own block in the pool.
        psr_steps: optimizer steps until the whole pool is enabled (0 = from the start).
        init_std, jitter_eps: as ``LinearScorer``.
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        top_k: int,
        *,
        reuse_factor: int,
        local_block: int,
        psr_steps: int,
        init_std: float = 0.02,
        jitter_eps: float = 0.0,
    ) -> None:
        super().__init__(d_model, num_experts, init_std=init_std, jitter_eps=jitter_eps)
        self.reuse_factor = check_positive_int("reuse_factor", reuse_factor)
        if self.reuse_factor > num_experts:
            raise ConfigError(
                f"reuse_factor={reuse_factor} blocks cannot be cut from a pool of num_experts={num_experts}; "
                "num_experts is the pool size R*E (e.g. 3 blocks of 8 experts: num_experts=24)."
            )
        self.local_block = check_positive_int("local_block", local_block, minimum=0)
        if self.local_block >= self.reuse_factor:
            raise ConfigError(f"local_block={local_block} must be < reuse_factor={reuse_factor}.")
        self.psr_steps = check_positive_int("psr_steps", psr_steps, minimum=0)
        order = enable_order(num_experts, self.reuse_factor, self.local_block)
        local_size = int(torch.tensor_split(torch.arange(num_experts), self.reuse_factor)[self.local_block].numel())
        self.initial_enabled = max(local_size, top_k)
        self.register_buffer("order", order, persistent=False)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        return (
            f"pool={self.order.numel()}, reuse_factor={self.reuse_factor}, local_block={self.local_block}, "
            f"psr_steps={self.psr_steps}, enabled={self.num_enabled()}"
        )

    def num_enabled(self) -> int:
        total = self.order.numel()
        if self.psr_steps == 0:
            return total
        progress = min(1.0, int(self.step) / self.psr_steps)
        return self.initial_enabled + int((total - self.initial_enabled) * progress)

    def enabled_mask(self) -> torch.Tensor:
        """``[E]`` bool: candidates the router may select now."""
        mask = torch.zeros(self.order.numel(), dtype=torch.bool, device=self.order.device)
        mask[self.order[: self.num_enabled()]] = True
        return mask

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        logits_TE = super().forward(x_TD, draft)
        enabled_E = self.enabled_mask()
        draft.extra_stats["psr_enabled"] = enabled_E.sum().float()
        if bool(enabled_E.all()):
            return logits_TE
        return logits_TE.masked_fill(~enabled_E, MASKED_LOGIT)

    @torch.no_grad()
    def end_of_step(self) -> None:
        self.step += 1


SPARSIFY_RULES = ("sign", "tail")


class SparsifyingBias(LossFreeBias):
    """A selection bias that concentrates routing on frequently used experts (see module docstring).

    Args:
        num_experts: ``E``.
        update_rate: ``u`` (1e-3).
        rule: ``sign`` or ``tail``.
        tail_fraction: for ``tail``, experts below this fraction of the mean load are pushed down.
        recenter, clamp, all_reduce: as ``LossFreeBias``.
    """

    def __init__(
        self,
        num_experts: int,
        *,
        update_rate: float,
        rule: str,
        tail_fraction: float,
        recenter: bool,
        clamp: float,
        all_reduce: bool = True,
    ) -> None:
        super().__init__(num_experts, update_rate=update_rate, recenter=recenter, clamp=clamp, all_reduce=all_reduce)
        self.rule = check_choice("sparsify_rule", rule, SPARSIFY_RULES)
        self.tail_fraction = check_non_negative("tail_fraction", tail_fraction)

    def bias_step(self, counts_E: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """The change of ``b`` for the step's expert loads (``rule``); applied as ``LossFreeBias.end_of_step``."""
        if self.rule == "sign":
            return self.update_rate * torch.sign(counts_E - mean)
        return -self.update_rate * (counts_E < self.tail_fraction * mean).float()


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
