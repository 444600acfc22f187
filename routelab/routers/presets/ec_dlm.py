"""Expert choice for diffusion LMs with timestep-dependent capacity (EC-DLM; spec §2)."""

from __future__ import annotations

from routelab.core.validation import check_choice
from routelab.routers.base import Router
from routelab.routers.ec_dlm import TimestepExpertChoice
from routelab.routers.presets.common import assemble_router
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

# EC-DLM names its gate variants after where the softmax sits; ExpertChoice names them by mode.
EC_DLM_GATES = {"post-softmax": "post-softmax", "pre-softmax": "softmax", "sigmoid": "sigmoid"}


def default_k_range(top_k: int, num_experts: int) -> tuple[int, int]:
    """EC-DLM's 8..32 around k = 20, scaled to ``top_k``: ``(0.4 k, 1.6 k)`` rounded, within [1, E]."""
    k_min = max(1, round(0.4 * top_k))
    k_max = min(num_experts, max(k_min, round(1.6 * top_k)))
    return k_min, k_max


@register_preset(
    "ec-dlm",
    description="expert choice per sequence with capacity k_b = schedule(mask ratio) (linear_reverse, "
    "k in [0.4k, 1.6k]); pass timestep=[batch]",
    paper="EC-DLM: expert-choice routing for diffusion LMs with timestep-dependent capacity (zhangshuibai/EC-DLM)",
    default_top_k=2,
    common_defaults={"capacity_factor": 1.0, "z_loss_coef": 1e-3},
    exemptions={
        "weights_sum_to_one": "a token picked by no expert has no weight; norm matching rescales the gates",
    },
)
def build_ec_dlm(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    ec_schedule: str = "linear_reverse",
    k_min: int | None = None,
    k_max: int | None = None,
    bell_sigma: float = 0.22,
    ec_gate: str = "post-softmax",
    ec_grouping: str = "sequence",
    missing_timestep: str = "static",
    norm_match_shared: int = 0,
    norm_match_subset: str = "random",
) -> Router:
    """EC-DLM. Every expert takes, per sequence ``b``, its top ``C_b = max(1, floor(L_b k_b cf/E))``
    tokens, with ``k_b`` from the sequence's mask ratio (``timestep``) by ``ec_schedule``.
    ``k_min``/``k_max`` default to ``0.4*top_k``/``1.6*top_k`` (EC-DLM: 8/32 at k=20, E=512).
    ``ec_gate``: ``post-softmax`` (rank by logit, softmax over the picking experts; EC-DLM
    default), ``pre-softmax`` (softmax first, gate = probability) or ``sigmoid``.
    Without a timestep the static ``top_k`` is used (``missing_timestep='error'`` refuses).
    ``norm_match_shared`` > 0 scales the gates to the norm of that many shared experts.
    """
    check_choice("ec_gate", ec_gate, tuple(EC_DLM_GATES))
    default_min, default_max = default_k_range(spec.top_k, spec.num_experts)
    selector = TimestepExpertChoice(
        spec.num_experts,
        spec.top_k,
        capacity_factor=common.capacity_factor or 1.0,
        gate=EC_DLM_GATES[ec_gate],
        grouping=ec_grouping,
        schedule=ec_schedule,
        k_min=default_min if k_min is None else k_min,
        k_max=default_max if k_max is None else k_max,
        bell_sigma=bell_sigma,
        missing_timestep=missing_timestep,
        norm_match_shared=norm_match_shared,
        norm_match_subset=norm_match_subset,
    )
    return assemble_router(spec, common, selector=selector, gate_mode="none", capacity=None)
