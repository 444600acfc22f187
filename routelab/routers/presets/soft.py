"""Soft MoE (Puigcerver et al. 2023): slots as soft combinations of tokens."""

from __future__ import annotations

from routelab.core.errors import ConfigError
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset
from routelab.routers.soft_routing import SoftRouter


@register_preset(
    "soft-moe",
    description="no discrete routing: each expert's slots are softmax-over-tokens mixtures of the sequence, each "
    "token a softmax-over-slots mix of slot outputs; routelab.MoE(router='soft-moe') builds a SoftMoE layer",
    paper="Puigcerver, Riquelme, Mustafa & Houlsby 2023, From Sparse to Soft Mixtures of Experts (arXiv 2308.00951)",
    default_top_k=1,
    exemptions={
        "capacity_factor": "no discrete assignment to drop: every expert processes exactly slots_per_expert slots "
        "per sequence, fixed by construction",
    },
)
def build_soft_moe(spec: RouterSpec, common: CommonOptions, *, slots_per_expert: int = 1, normalize: bool = True) -> SoftRouter:
    """Soft MoE router: slot parameters ``Phi`` (``[D, E * slots_per_expert]``); per
    sequence, dispatch = softmax over tokens of ``x Phi``, combine = softmax over slots.
    ``normalize`` l2-normalises ``x`` and ``Phi`` and learns a logit scale (the paper's
    recipe for large widths). The ``Routing`` it returns connects every token to every
    expert with weight = its combine mass on that expert (summing to 1); ``top_k`` is
    ignored (every expert is used). No balance loss (balanced by construction);
    ``capacity_factor`` and balance/z losses are refused. Run it with
    ``routelab.MoE(..., router="soft-moe")``, which returns a ``routelab.moe.SoftMoE``.
    """
    refused = {
        "capacity_factor": common.capacity_factor,
        "aux_loss_coef": common.aux_loss_coef,
        "seq_aux_loss_coef": common.seq_aux_loss_coef,
        "z_loss_coef": common.z_loss_coef,
    }
    given = [name for name, value in refused.items() if value]
    if given:
        raise ConfigError(
            f"soft-moe does not support {', '.join(given)}: every expert gets exactly slots_per_expert slots per "
            "sequence, so there is nothing to drop or balance."
        )
    return SoftRouter(
        spec.d_model,
        spec.num_experts,
        top_k=spec.top_k,
        slots_per_expert=slots_per_expert,
        normalize=normalize,
        jitter_eps=common.jitter_eps,
    )
