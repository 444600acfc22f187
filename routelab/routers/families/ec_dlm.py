"""Expert choice for diffusion LMs with timestep-dependent capacity (EC-DLM).

``zhangshuibai/EC-DLM`` (Megatron ``moe_layer.py`` dynamic top-k, ``router.py``
``ExpertChoiceRouter``, ``moe_utils.py::compute_ec_scaling_factors``). A diffusion LM knows,
for every sequence ``b``, the mask ratio ``r_b`` in [0, 1] of its forward process; the MoE
layer receives it as ``timestep=[batch]`` (``RoutingContext.timestep``). Each sequence gets

    k_b = clamp(round(k_min + (k_max - k_min) * s(r_b)), k_min, k_max)
    C_b = min(L_b, max(1, floor(L_b * k_b * cf / E)))

slots per expert, where ``s`` is one of the schedules below. The default (EC-DLM's best
run) is ``linear_reverse`` with ``k_min = 8``, ``k_max = 32`` for ``E = 512``: ``E[k] = 20``
for ``r ~ U[0, 1]``, the FLOPs of a static ``k = 20``.

Optional shared-expert norm matching multiplies the gates of a token picked by ``n``
experts by ``f[n] = mean(sqrt(n_shared) / ||p_n||_2)``, where ``p_n`` are ``n`` softmax
probabilities of i.i.d. N(0, 1) logits renormalised to sum to 1 (Monte Carlo, seed 42,
10k samples, as ``compute_ec_scaling_factors``). EC-DLM takes the first ``n`` entries, i.e.
a random subset; ``norm_match_subset='top'`` takes the ``n`` largest instead.
"""

from __future__ import annotations

import math

import torch

from routelab.core.errors import ConfigError, InputError
from routelab.core.validation import check_choice, check_positive_int
from routelab.routers.families.expert_choice import ExpertChoice
from routelab.routers.parts.assembly import assemble_router
from routelab.routers.parts.router import Router, RoutingDraft
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

SCHEDULES = (
    "linear",
    "linear_reverse",
    "cosine",
    "cosine_reverse",
    "bell",
    "bell_gaussian",
    "bell_gaussian_reverse",
)
MISSING_TIMESTEP = ("static", "error")
NORM_MATCH_SUBSETS = ("random", "top")


def schedule_factor(schedule: str, r: torch.Tensor, bell_sigma: float = 0.22) -> torch.Tensor:
    """``s(r)`` in [0, 1] for a mask ratio ``r``."""
    r = r.to(torch.float64)
    if schedule == "linear":
        return r
    if schedule == "linear_reverse":
        return 1.0 - r
    if schedule == "cosine":
        return (1.0 - torch.cos(math.pi * r)) / 2.0
    if schedule == "cosine_reverse":
        return (1.0 + torch.cos(math.pi * r)) / 2.0
    if schedule == "bell":
        return torch.clamp(1.0 - 4.0 * (r - 0.5) ** 2, 0.0, 1.0)
    if schedule in ("bell_gaussian", "bell_gaussian_reverse"):
        edge = math.exp(-1.0 / (8.0 * bell_sigma**2))
        bell = (torch.exp(-((r - 0.5) ** 2) / (2.0 * bell_sigma**2)) - edge) / (1.0 - edge)
        bell = torch.clamp(bell, 0.0, 1.0)
        return 1.0 - bell if schedule == "bell_gaussian_reverse" else bell
    raise ConfigError(f"ec_schedule={schedule!r} must be one of {SCHEDULES}.")


def timestep_top_k(
    r_B: torch.Tensor, schedule: str, k_min: int, k_max: int, bell_sigma: float = 0.22
) -> torch.Tensor:
    """Per-sequence ``k_b = clamp(round(k_min + (k_max - k_min) s(r_b)), k_min, k_max)`` (int64)."""
    raw = k_min + (k_max - k_min) * schedule_factor(schedule, r_B, bell_sigma)
    return torch.clamp(torch.round(raw).long(), k_min, k_max)


def norm_matching_factors(
    num_experts: int, num_shared: int, *, subset: str = "random", num_samples: int = 10_000, seed: int = 42
) -> torch.Tensor:
    """``f[n]`` for ``n = 0..E`` (``f[0] = 1``): shared-expert norm over routed-gate norm.

    For each Monte Carlo sample of ``E`` i.i.d. N(0, 1) logits, ``p = softmax``; ``p_n`` is
    its first ``n`` entries (``subset='random'``) or its ``n`` largest (``'top'``),
    renormalised; ``f[n] = mean(sqrt(num_shared) / ||p_n||_2)``.
    """
    generator = torch.Generator().manual_seed(seed)
    logits_TE = torch.randn(num_samples, num_experts, generator=generator, dtype=torch.float64)
    probs_TE = torch.softmax(logits_TE, dim=1)
    if subset == "top":
        probs_TE = torch.sort(probs_TE, dim=1, descending=True).values
    sum_TE = torch.cumsum(probs_TE, dim=1)
    sq_sum_TE = torch.cumsum(probs_TE**2, dim=1)
    # ||p_n / sum(p_n)||_2 = sqrt(sum p^2) / sum p
    factors_E = (math.sqrt(num_shared) * sum_TE / torch.sqrt(sq_sum_TE)).mean(dim=0)
    return torch.cat([torch.ones(1, dtype=torch.float64), factors_E]).to(torch.float32)


def check_timestep(timestep: object, batch_size: int) -> torch.Tensor:
    if not isinstance(timestep, torch.Tensor):
        raise InputError(f"timestep must be a torch.Tensor of shape [{batch_size}], got {type(timestep).__name__}.")
    if timestep.dim() != 1 or timestep.shape[0] != batch_size:
        raise InputError(
            f"timestep must have shape [batch] = [{batch_size}] (one mask ratio per sequence), "
            f"got {tuple(timestep.shape)}."
        )
    if not timestep.is_floating_point():
        raise InputError(f"timestep must be a floating tensor of mask ratios in [0, 1], got {timestep.dtype}.")
    if timestep.numel() and not bool(((timestep >= 0) & (timestep <= 1)).all()):
        raise InputError("timestep holds values outside [0, 1] (or NaN); pass the mask ratio of each sequence.")
    return timestep


class TimestepExpertChoice(ExpertChoice):
    """Expert choice whose per-sequence capacity follows the diffusion timestep.

    Args:
        num_experts, top_k, capacity_factor, gate, grouping: as ``ExpertChoice``; ``top_k``
            is also the static k used when no timestep is given.
        schedule: one of ``SCHEDULES``.
        k_min, k_max: range of the per-sequence k (``1 <= k_min <= k_max <= E``).
        bell_sigma: sigma of the Gaussian bell schedules (0.22 in the EC-DLM scripts).
        missing_timestep: ``static`` (use ``top_k``) or ``error`` when no timestep is given.
        norm_match_shared: number of shared experts to match the gate norm to (0 = off).
        norm_match_subset: ``random`` (EC-DLM) or ``top``.
    """

    def __init__(
        self,
        num_experts: int,
        top_k: int,
        *,
        capacity_factor: float = 1.0,
        gate: str = "post-softmax",
        grouping: str,
        schedule: str,
        k_min: int,
        k_max: int,
        bell_sigma: float,
        missing_timestep: str,
        norm_match_shared: int,
        norm_match_subset: str,
    ) -> None:
        super().__init__(num_experts, top_k, capacity_factor=capacity_factor, gate=gate, grouping=grouping)
        self.schedule = check_choice("ec_schedule", schedule, SCHEDULES)
        self.k_min = check_positive_int("k_min", k_min)
        self.k_max = check_positive_int("k_max", k_max)
        if not self.k_min <= self.k_max <= num_experts:
            raise ConfigError(
                f"need 1 <= k_min <= k_max <= num_experts, got k_min={k_min}, k_max={k_max}, num_experts={num_experts}."
            )
        bell_sigma = float(bell_sigma)
        if not bell_sigma > 0 or math.isinf(bell_sigma):
            raise ConfigError(f"bell_sigma must be a finite number > 0, got {bell_sigma}.")
        self.bell_sigma = bell_sigma
        self.missing_timestep = check_choice("missing_timestep", missing_timestep, MISSING_TIMESTEP)
        self.norm_match_shared = check_positive_int("norm_match_shared", norm_match_shared, minimum=0)
        check_choice("norm_match_subset", norm_match_subset, NORM_MATCH_SUBSETS)
        factors = (
            norm_matching_factors(num_experts, self.norm_match_shared, subset=norm_match_subset)
            if self.norm_match_shared
            else torch.ones(num_experts + 1)
        )
        self.register_buffer("norm_factors", factors, persistent=False)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule!r}, k_min={self.k_min}, k_max={self.k_max}, gate={self.gate!r}"

    def sequence_top_k(self, draft: RoutingDraft) -> torch.Tensor | None:
        """``k_b`` of every sequence, or None when no timestep was given (static ``top_k``)."""
        timestep = draft.batch.context.timestep
        if timestep is None:
            if self.missing_timestep == "error":
                raise InputError(
                    "this router sets expert capacity from the diffusion timestep: pass timestep=[batch] "
                    "mask ratios in [0, 1] to the MoE layer (or missing_timestep='static')."
                )
            return None
        r_B = check_timestep(timestep, draft.batch.batch_size).to(draft.x_TD.device)
        return timestep_top_k(r_B, self.schedule, self.k_min, self.k_max, self.bell_sigma)

    def group_capacities(self, lengths_G: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        k_B = self.sequence_top_k(draft)
        if k_B is None:
            return super().group_capacities(lengths_G, draft)
        draft.extra_stats["ec_mean_k"] = k_B.to(torch.float32).mean()
        lengths_B = draft.batch.seq_lengths_B.to(k_B.device)
        raw_B = torch.floor(lengths_B.to(torch.float64) * k_B * self.capacity_factor / self.num_experts).long()
        cap_B = torch.minimum(torch.clamp(raw_B, min=1), lengths_B.long())
        cap_B = torch.where(lengths_B > 0, cap_B, torch.zeros_like(cap_B))
        if self.grouping == "sequence":
            return cap_B
        return torch.minimum(cap_B.sum().clamp_min(1), lengths_G.long()).reshape(1)

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        topk_idx_TK, gate_TK = super().forward(draft)
        valid_TK = topk_idx_TK >= 0
        picks_T = valid_TK.sum(dim=1)
        if draft.num_tokens:
            draft.extra_stats["ec_token_drop_ratio"] = (picks_T == 0).to(torch.float32).mean()
        if self.norm_match_shared:
            gate_TK = gate_TK * self.norm_factors.index_select(0, picks_T).unsqueeze(1)
        return topk_idx_TK, gate_TK


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
