"""Softmax top-k presets: Switch, GShard, Mixtral, generic top-k, noisy top-k."""

from __future__ import annotations

from routelab.core.validation import check_choice, check_non_negative
from routelab.routers.parts.router import Router
from routelab.routers.parts.losses import ImportanceLoss, LoadLoss
from routelab.routers.parts.assembly import NORMALIZATIONS, assemble_router, sigmoid_gate_mode, softmax_gate_mode
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset
from routelab.routers.parts.score_functions import Sigmoid
from routelab.routers.parts.scorers import NoisyLinearScorer

_POSITION_DROP = "with capacity and a position drop policy, which tokens survive depends on their order"


@register_preset(
    "switch",
    description="top-1 softmax routing, gate = router probability, Switch balance loss",
    paper="Fedus, Zoph & Shazeer 2021, Switch Transformers (arXiv 2101.03961)",
    default_top_k=1,
    common_defaults={"aux_loss_coef": 1e-2},
)
def build_switch(spec: RouterSpec, common: CommonOptions) -> Router:
    """Switch Transformer: softmax scores, top-1 (or top-k), no renormalisation."""
    return assemble_router(spec, common, gate_mode="none")


@register_preset(
    "gshard",
    description="softmax top-2, renormalised, first-choice balance loss, capacity 1.0, first choices kept first",
    paper="Lepikhin et al. 2020, GShard (arXiv 2006.16668)",
    default_top_k=2,
    min_top_k=2,
    common_defaults={"aux_loss_coef": 1e-2, "capacity_factor": 1.0, "drop_policy": "choice_then_position"},
    exemptions={"token_permutation": _POSITION_DROP},
)
def build_gshard(spec: RouterSpec, common: CommonOptions) -> Router:
    """GShard (Algorithm 1; fairseq ``top2gating``): softmax top-2 with renormalised gates
    and expert capacity ``2T/E`` (cf=1 at k=2).

    Capacity is filled with every token's first choice before any second choice
    (``drop_policy="choice_then_position"``), and the balance loss counts first choices
    only in ``f_e``. Gates are renormalised before drops, as in the paper's algorithm
    (fairseq renormalises the surviving gates after drops by default). GShard's random
    second-expert dispatch is not reproduced; the second expert is always taken.
    """
    return assemble_router(spec, common, gate_mode="renorm", loss_counts="first_choice")


@register_preset(
    "mixtral",
    description="softmax top-k, renormalised over the selected experts, balance loss, dropless",
    paper="Jiang et al. 2024, Mixtral of Experts (arXiv 2401.04088)",
    default_top_k=2,
    common_defaults={"aux_loss_coef": 1e-2},
)
def build_mixtral(spec: RouterSpec, common: CommonOptions, *, normalization: str = "auto") -> Router:
    """Mixtral: ``softmax(topk(z))`` (= renormalised softmax). ``normalization='auto'``
    renormalises for ``top_k > 1`` and keeps the raw probability for top-1."""
    return assemble_router(spec, common, gate_mode=softmax_gate_mode(normalization, spec.top_k))


@register_preset(
    "topk",
    description="generic top-k with the three gate normalisations of Megatron-Core (no aux loss by default)",
    paper="Shazeer et al. 2017 (arXiv 1701.06538); Megatron-Core topk_softmax_with_capacity",
    default_top_k=2,
)
def build_topk(
    spec: RouterSpec, common: CommonOptions, *, normalization: str = "renorm", scaling_factor: float = 1.0
) -> Router:
    """Top-k routing. ``normalization``:

    * ``pre_softmax_norenorm``: gate = softmax(z) at the selected experts;
    * ``renorm``: softmax(z) renormalised over the selected experts (= softmax(topk(z)));
    * ``sigmoid_norm``: sigmoid(z) renormalised over the selected experts; at ``top_k=1``
      the gate stays ``sigmoid(z)`` (renormalising one gate would make it a constant with no
      gradient; Megatron-Core ``topk_softmax_with_capacity`` does the same).
    ``scaling_factor`` multiplies the gates (DeepSeek-V3 uses 2.5 with ``sigmoid_norm``).
    """
    check_choice("normalization", normalization, NORMALIZATIONS)
    check_non_negative("scaling_factor", scaling_factor)
    if normalization == "sigmoid_norm":
        return assemble_router(
            spec, common, score_fn=Sigmoid(), gate_mode=sigmoid_gate_mode(spec.top_k), scaling_factor=scaling_factor
        )
    return assemble_router(
        spec, common, gate_mode=softmax_gate_mode(normalization, spec.top_k), scaling_factor=scaling_factor
    )


@register_preset(
    "noisy-topk",
    description="noisy top-k gating: tunable Gaussian noise, softmax over the kept logits, importance + load losses",
    paper="Shazeer et al. 2017, Outrageously Large Neural Networks (arXiv 1701.06538)",
    default_top_k=2,
    min_top_k=2,
)
def build_noisy_topk(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    importance_loss_coef: float = 0.1,
    load_loss_coef: float = 0.1,
    noise_floor: float = 1e-2,
) -> Router:
    """Shazeer et al. 2017: ``H = z + N(0,1)*softplus(x W_noise)``; ``G = softmax(KeepTopK(H, k))``.

    The paper's loss weights are 0.1 (common reimplementations use 1e-2). The selected
    gates are renormalised, which equals the softmax over the kept noisy logits.
    """
    extra_losses = [
        ImportanceLoss(check_non_negative("importance_loss_coef", importance_loss_coef)),
        LoadLoss(check_non_negative("load_loss_coef", load_loss_coef)),
    ]
    scorer = NoisyLinearScorer(
        spec.d_model, spec.num_experts, noise_floor=check_non_negative("noise_floor", noise_floor),
        jitter_eps=common.jitter_eps,
    )
    return assemble_router(spec, common, scorer=scorer, gate_mode="renorm", extra_losses=extra_losses)
