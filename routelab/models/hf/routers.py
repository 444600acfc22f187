"""Replacement routers for transformers MoE models, built from routelab parts.

A replacement is an instance of a subclass of the model's own router class (so that
``output_router_logits`` and the model's aux loss, which collect router outputs by
class, keep working) that runs a routelab ``Router`` on the real tokens and returns what
the original router returned: ``(logits [B*S, E], topk_weights [B*S, K], topk_idx [B*S, K])``
in the original dtypes. Empty slots of the routelab routing (expert choice, capacity
drops) go to expert 0 with weight 0, which every transformers experts kernel accepts.

Two ways to get the routelab router:

* ``native_router``: the model's own rule expressed in routelab parts, initialised from
  the pretrained weights; bit-identical to the original in fp32 for all six architectures.
* ``preset_router``: any registered preset (``expert-choice``, ``loss-free``, ...)
  initialised from the pretrained gate weights where its scorer is linear (and from
  DeepSeek-V3's selection bias where the preset has a loss-free bias on sigmoid scores).

``equivalent_preset`` names the registered preset that is the model's rule, and whether
it reproduces the model bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from routelab.core.errors import ConfigError, InputError
from routelab.routers.parts.balancers import LossFreeBias
from routelab.routers.parts.router import Balancer, Router, RoutingDraft, Scorer, ScoreGatesSelector, Selector
from routelab.routers.parts.gates import GateNorm
from routelab.routers.registry import create_router
from routelab.routers.parts.score_functions import Sigmoid, Softmax
from routelab.routers.parts.scorers import LinearScorer, NoisyLinearScorer
from routelab.routers.parts.selectors import TopK
from routelab.models.hf.context import ForwardTokens, single_sequence_tokens
from routelab.models.hf.registry import Architecture


# ----------------------------------------------------------------------------- parts


class PretrainedLinearScorer(Scorer):
    """``logits = x W^T (+ b)`` with ``W`` (and GPT-OSS's ``b``) copied from a pretrained router.

    Args:
        weight: ``[E, D]`` pretrained router weight (copied, so the original stays untouched).
        bias: optional ``[E]`` pretrained router bias (GPT-OSS).
        jitter_eps: multiplicative input jitter in training (Switch; 0 = off).
        trainable: False keeps the weights as buffers (frozen routing).
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None, *, jitter_eps: float = 0.0, trainable: bool = True
    ) -> None:
        super().__init__()
        weight = weight.detach().clone()
        bias = None if bias is None else bias.detach().clone()
        if trainable:
            self.weight = nn.Parameter(weight)
            self.bias = None if bias is None else nn.Parameter(bias)
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)
        self.jitter_eps = float(jitter_eps)

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        if self.jitter_eps > 0 and draft.training:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x_TD, self.weight.float(), bias)


class LogitOffset(nn.Module):
    """An additive per-expert offset, shared by all tokens (``[E]``) or one per sequence (``[B, E]``).

    Per-sequence offsets are indexed by the batch row of each token, so a ``[B, E]`` offset
    serves ``B`` requests of one batch independently.
    """

    def __init__(self, offset: torch.Tensor, *, trainable: bool = False) -> None:
        super().__init__()
        if offset.dim() not in (1, 2):
            raise ConfigError(f"a logit offset must have shape [E] or [B, E], got {tuple(offset.shape)}.")
        offset = offset.detach().clone().float()
        if trainable:
            self.offset = nn.Parameter(offset)
        else:
            self.register_buffer("offset", offset)

    def per_token(self, draft: RoutingDraft) -> torch.Tensor:
        """The ``[T, E]`` (or broadcastable ``[E]``) offset for the tokens of ``draft``."""
        if self.offset.dim() == 1:
            return self.offset
        seq_id_T = draft.batch.seq_id_T
        if draft.batch.batch_size != self.offset.shape[0]:
            raise InputError(
                f"a per-sequence logit offset was fitted for batch size {self.offset.shape[0]} but this forward has "
                f"batch size {draft.batch.batch_size}; run the same batch of requests, or use a shared [E] offset."
            )
        return self.offset.index_select(0, seq_id_T)


class OffsetScorer(Scorer):
    """A scorer plus named logit offsets: ``z' = inner(x) + sum_n offset_n`` (before the score function)."""

    def __init__(self, inner: Scorer) -> None:
        super().__init__()
        self.inner = inner
        self.offsets = nn.ModuleDict()

    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        logits_TE = self.inner(x_TD, draft)
        for offset in self.offsets.values():
            logits_TE = logits_TE + offset.per_token(draft)
        return logits_TE


class SelectionOffset(Balancer):
    """Named offsets added to the selection scores only (gates keep the unbiased scores).

    Wraps the router's own balancer, if any; that balancer is still updated by
    ``end_of_step`` (it is a submodule), this wrapper itself has no state to update.
    """

    def __init__(self, inner: Balancer | None) -> None:
        super().__init__()
        self.inner = inner
        self.offsets = nn.ModuleDict()

    def selection_scores(self, scores_TE: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        selection_TE = scores_TE if self.inner is None else self.inner.selection_scores(scores_TE, draft)
        for offset in self.offsets.values():
            selection_TE = selection_TE + offset.per_token(draft)
        return selection_TE

    def observe(self, draft: RoutingDraft) -> None:
        if self.inner is not None:
            self.inner.observe(draft)

    def end_of_step(self) -> None:
        """Nothing to update here; the wrapped balancer is updated on its own."""


class LogitTopKSoftmax(Selector):
    """GPT-OSS selection: top-k of the logits, gates = softmax over the k selected logits.

    Equal in exact arithmetic to renormalised softmax top-k (Mixtral), computed the way
    GPT-OSS computes it so that the result is bit-identical. A balancer's selection bias
    (``selection_scores - scores``) is added to the logits used for ranking.
    """

    def __init__(self, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.top_k = top_k

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.logits_TE is not None and draft.scores_TE is not None and draft.selection_scores_TE is not None
        rank_TE = draft.logits_TE
        if draft.selection_scores_TE is not draft.scores_TE:
            rank_TE = rank_TE + (draft.selection_scores_TE - draft.scores_TE)
        _, topk_idx_TK = torch.topk(rank_TE, self.top_k, dim=-1)
        gate_TK = torch.softmax(draft.logits_TE.gather(1, topk_idx_TK), dim=1)
        return topk_idx_TK, gate_TK

    supports_replay = True

    def replay_gates(self, draft: RoutingDraft, topk_idx_TK: torch.Tensor) -> torch.Tensor:
        assert draft.logits_TE is not None
        return torch.softmax(draft.logits_TE.gather(1, topk_idx_TK), dim=1)


def add_logit_offset(router: Router, name: str, offset: torch.Tensor, *, trainable: bool = False) -> LogitOffset:
    """Add a named offset to the logits of ``router`` (wrapping its scorer once); returns it."""
    if not isinstance(router.scorer, OffsetScorer):
        router.scorer = OffsetScorer(router.scorer)
    return _add_offset(router, router.scorer.offsets, name, offset, trainable)


def add_selection_offset(router: Router, name: str, offset: torch.Tensor) -> LogitOffset:
    """Add a named offset to the selection scores of ``router`` (wrapping its balancer once)."""
    if not isinstance(router.balancer, SelectionOffset):
        router.balancer = SelectionOffset(router.balancer)
    return _add_offset(router, router.balancer.offsets, name, offset, False)


def remove_offset(router: Router, name: str) -> bool:
    """Remove the offset ``name`` from the logits or selection scores; True if one was removed."""
    removed = False
    for holder in (router.scorer, router.balancer):
        if isinstance(holder, (OffsetScorer, SelectionOffset)) and name in holder.offsets:
            del holder.offsets[name]
            removed = True
    return removed


def has_offsets(router: Router) -> bool:
    """True while any logit or selection offset is installed on ``router``."""
    return any(
        isinstance(holder, (OffsetScorer, SelectionOffset)) and len(holder.offsets) > 0
        for holder in (router.scorer, router.balancer)
    )


def _add_offset(router: Router, offsets: nn.ModuleDict, name: str, offset: torch.Tensor, trainable: bool) -> LogitOffset:
    if offset.shape[-1] != router.num_experts:
        raise ConfigError(
            f"offset {name!r} has {offset.shape[-1]} entries but the router has {router.num_experts} experts."
        )
    if name in offsets:
        raise ConfigError(f"the router already has an offset named {name!r}; remove it first.")
    tensors = [*router.parameters(), *router.buffers()]
    device = tensors[0].device if tensors else offset.device
    module = LogitOffset(offset.to(device), trainable=trainable)
    offsets[name] = module
    return module


# ----------------------------------------------------------------------------- rules


def _pretrained_bias(original: nn.Module) -> torch.Tensor | None:
    bias = getattr(original, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def native_router(arch: Architecture, original: nn.Module) -> Router:
    """The model's own routing rule as a routelab ``Router``, with the pretrained weights.

    Bit-identical to ``original`` in fp32 (the router math runs in fp32; transformers
    computes the logits of every architecture but DeepSeek-V3 in the model dtype, so in
    bf16 the two may differ by the rounding of the logits).
    """
    num_experts, top_k = int(original.num_experts), int(original.top_k)
    scorer = PretrainedLinearScorer(original.weight, _pretrained_bias(original))
    balancer = None
    scaling = 1.0
    if arch.name == "gpt_oss":
        score_fn, selector, norm = Softmax(), LogitTopKSoftmax(num_experts, top_k), "none"
    elif arch.name == "deepseek_v3":
        score_fn = Sigmoid()
        selector = _deepseek_selector(original)
        balancer = LossFreeBias(num_experts, update_rate=0.0)
        balancer.bias.copy_(original.e_score_correction_bias.detach().float())
        norm = "renorm" if original.norm_topk_prob else "none"
        scaling = float(original.routed_scaling_factor)
    else:
        score_fn, selector = Softmax(), TopK(num_experts, top_k)
        norm = "renorm" if getattr(original, "norm_topk_prob", True) else "none"
    router = Router(
        num_experts=num_experts, top_k=top_k, scorer=scorer, score_fn=score_fn, selector=selector,
        gate_norm=GateNorm(norm, scaling), balancer=balancer, name=f"native:{arch.name}",
    )
    return router.to(original.weight.device)


class DeepseekV3NativeTopK(ScoreGatesSelector):
    """DeepSeek-V3's group-limited top-k exactly as transformers' ``DeepseekV3TopkRouter``
    computes it, slot order included.

    Groups are scored by the sum of their top-2 biased scores; the ``topk_group`` best are
    kept; the experts are the top-k of the biased scores in the kept groups. Both top-k
    calls take ``sorted=False`` like transformers, so the k gates are summed in the same
    order when renormalised and the outputs are bit-identical (a sorted selection sums them
    in another order and differs in the last bit of the gates once ``k > 2``).
    """

    def __init__(self, num_experts: int, top_k: int, num_groups: int, kept_groups: int) -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.num_groups, self.kept_groups = num_groups, kept_groups

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}, num_groups={self.num_groups}, kept_groups={self.kept_groups}"

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        assert draft.selection_scores_TE is not None and draft.scores_TE is not None
        choice_TE = draft.selection_scores_TE
        group_size = self.num_experts // self.num_groups
        group_score_TG = choice_TE.view(-1, self.num_groups, group_size).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx_TG = torch.topk(group_score_TG, k=self.kept_groups, dim=-1, sorted=False)[1]
        keep_TG = torch.zeros_like(group_score_TG).scatter_(1, group_idx_TG, 1)
        keep_TE = keep_TG.unsqueeze(-1).expand(-1, self.num_groups, group_size).reshape(-1, self.num_experts)
        masked_TE = choice_TE.masked_fill(~keep_TE.bool(), float("-inf"))
        topk_idx_TK = torch.topk(masked_TE, k=self.top_k, dim=-1, sorted=False)[1]
        return topk_idx_TK, draft.scores_TE.gather(1, topk_idx_TK)


def _deepseek_selector(original: nn.Module) -> Selector:
    num_experts, top_k = int(original.num_experts), int(original.top_k)
    return DeepseekV3NativeTopK(num_experts, top_k, int(original.num_group), int(original.topk_group))


@dataclass(frozen=True)
class EquivalentPreset:
    """The registered preset that implements a model's routing rule.

    Attributes:
        preset, options: arguments of ``preset_router`` (None when no preset matches).
        exact: the preset reproduces the model's outputs bit for bit (fp32).
        reason: why it is or is not exact.
    """

    preset: str | None
    options: dict[str, Any] = field(default_factory=dict)
    exact: bool = False
    reason: str = ""


def equivalent_preset(arch: Architecture, original: nn.Module) -> EquivalentPreset:
    """Which registered preset is the routing rule of ``original`` (see ``EquivalentPreset``)."""
    top_k = int(original.top_k)
    if arch.name == "gpt_oss":
        return EquivalentPreset(
            "mixtral", {}, False,
            "GPT-OSS takes softmax over the k selected logits; mixtral renormalises the full softmax over them: "
            "equal in exact arithmetic, different in the last bits (the router bias is carried over).",
        )
    if arch.name == "deepseek_v3":
        num_groups, kept = int(original.num_group), int(original.topk_group)
        options = {
            "num_groups": num_groups, "group_topk": kept, "scaling_factor": float(original.routed_scaling_factor),
            "bias_update_rate": 0.0,
        }
        if not original.norm_topk_prob:
            return EquivalentPreset("deepseek-v3", options, False, "the deepseek-v3 preset always renormalises the gates; this model has norm_topk_prob=False.")
        group_size = int(original.num_experts) // num_groups
        if num_groups > 1 and min(max(1, top_k // kept), group_size) != 2:
            return EquivalentPreset(
                "deepseek-v3", options, False,
                f"the preset scores a group by its top top_k//group_topk = {top_k // kept} experts, the model by its top 2.",
            )
        if top_k == 1:
            return EquivalentPreset(
                "deepseek-v3", options, False,
                "the model renormalises a single gate to a constant; the preset keeps sigmoid(z) at top-1 (Megatron-Core).",
            )
        if top_k > 2:
            return EquivalentPreset(
                "deepseek-v3", options, False,
                "the model's rule, but the preset sums the k > 2 gates in descending order and transformers in "
                "topk(sorted=False) order: the gates can differ in the last bit (use native_router for bit-exactness).",
            )
        return EquivalentPreset("deepseek-v3", options, True, "sigmoid + pretrained bias + group-limited top-k + renorm x scaling: the model's rule.")
    renorm = bool(getattr(original, "norm_topk_prob", True))
    if renorm and top_k == 1:
        return EquivalentPreset(None, {}, False, "the model renormalises a single gate to 1; routelab presets refuse constant top-1 gates (use native_router).")
    if renorm:
        return EquivalentPreset("mixtral", {}, True, "softmax, top-k, renormalised gates: the model's rule.")
    return EquivalentPreset("topk", {"normalization": "pre_softmax_norenorm"}, True, "softmax, top-k, unnormalised gates: the model's rule.")


@dataclass(frozen=True)
class PretrainedInit:
    """What a preset router took from the pretrained router."""

    copied: tuple[str, ...]
    skipped: tuple[str, ...]


def preset_router(
    preset: str, arch: Architecture, original: nn.Module, *, init_from_pretrained: bool = True, **options: Any
) -> tuple[Router, PretrainedInit]:
    """Build preset ``preset`` for the shape of ``original``, initialised from its weights where possible.

    ``top_k`` defaults to the model's. A linear (or noisy-linear) scorer takes the
    pretrained weight (and GPT-OSS's bias); a loss-free bias on sigmoid scores takes
    DeepSeek-V3's ``e_score_correction_bias``. Anything else starts fresh and is listed
    in ``PretrainedInit.skipped``.
    """
    options = dict(options)
    top_k = options.pop("top_k", int(original.top_k))
    router = create_router(
        preset, d_model=int(original.hidden_dim), num_experts=int(original.num_experts), top_k=top_k, **options
    )
    copied: list[str] = []
    skipped: list[str] = []
    if init_from_pretrained:
        _init_from_pretrained(router, arch, original, copied, skipped)
    return router.to(original.weight.device), PretrainedInit(tuple(copied), tuple(skipped))


def _init_from_pretrained(router: Router, arch: Architecture, original: nn.Module, copied: list[str], skipped: list[str]) -> None:
    bias = _pretrained_bias(original)
    scorer = router.scorer
    if isinstance(scorer, LinearScorer) and tuple(scorer.weight.shape) == tuple(original.weight.shape):
        trainable = isinstance(scorer.weight, nn.Parameter)
        router.scorer = PretrainedLinearScorer(original.weight, bias, jitter_eps=scorer.jitter_eps, trainable=trainable)
        copied.extend(["weight"] + (["bias"] if bias is not None else []))
    elif isinstance(scorer, NoisyLinearScorer) and tuple(scorer.weight.shape) == tuple(original.weight.shape):
        with torch.no_grad():
            scorer.weight.copy_(original.weight.detach().float())
        copied.append("weight")
        if bias is not None:
            add_logit_offset(router, "pretrained_bias", bias, trainable=True)
            copied.append("bias")
    else:
        skipped.append(f"scorer {type(scorer).__name__} (not a linear router)")
    correction = getattr(original, "e_score_correction_bias", None)
    if correction is not None:
        if isinstance(router.balancer, LossFreeBias) and isinstance(router.score_fn, Sigmoid):
            router.balancer.bias.copy_(correction.detach().float())
            copied.append("e_score_correction_bias")
        else:
            skipped.append("e_score_correction_bias (the preset has no loss-free bias on sigmoid scores)")


# ----------------------------------------------------------------------------- the module


class ForwardState:
    """The token layout of the model forward in progress, shared by a handle and its routers."""

    def __init__(self) -> None:
        self.tokens: ForwardTokens | None = None

    def tokens_for(self, num_rows: int, device: torch.device) -> ForwardTokens:
        tokens = self.tokens
        if tokens is not None and tokens.num_rows == num_rows:
            return tokens
        return single_sequence_tokens(num_rows, device)


class ReplacementRouter:
    """Mixin of the replacement router classes (see ``make_replacement``).

    Attributes:
        routelab_router: the routelab ``Router`` doing the routing.
        last_routing: the routelab ``Routing`` (real tokens only, ``-1`` in empty slots) of
            the latest forward; cleared by the handle at the start of each model forward.
    """

    routelab_router: Router
    last_routing: Any

    def _setup(self, original: nn.Module, router: Router, arch: Architecture, state: ForwardState) -> None:
        nn.Module.__init__(self)  # the original __init__ needs a config; the routing lives in routelab_router
        self.top_k = int(original.top_k)
        self.num_experts = int(original.num_experts)
        self.hidden_dim = int(original.hidden_dim)
        self.routelab_router = router
        self.last_routing = None
        self._arch = arch
        self._state = state
        self.__dict__["_padding_router"] = original  # not a submodule: see _route_padding

    @property
    def weight(self) -> torch.Tensor | None:
        """The linear router weight in use, when the routelab scorer has one."""
        scorer = self.routelab_router.scorer
        scorer = scorer.inner if isinstance(scorer, OffsetScorer) else scorer
        return getattr(scorer, "weight", None)

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_UD = hidden_states.reshape(-1, self.hidden_dim)
        tokens = self._state.tokens_for(x_UD.shape[0], x_UD.device)
        batch = tokens.token_batch()
        routing = self.routelab_router(tokens.real_rows(x_UD), batch)
        self.last_routing = routing
        valid_TK = routing.topk_idx >= 0
        idx_TK = torch.where(valid_TK, routing.topk_idx, torch.zeros_like(routing.topk_idx))
        weight_TK = torch.where(valid_TK, routing.topk_weight, torch.zeros_like(routing.topk_weight))
        logits_TE = routing.logits
        logits_dtype = torch.float32 if self._arch.logits_fp32 else hidden_states.dtype
        weights_dtype = hidden_states.dtype if self._arch.weights_model_dtype else torch.float32
        logits_TE, weight_TK = logits_TE.to(logits_dtype), weight_TK.to(weights_dtype)
        if batch.has_padding:
            return self._route_padding(x_UD, batch.flat_index_T, logits_TE, weight_TK, idx_TK)
        return logits_TE, weight_TK, idx_TK

    def _route_padding(
        self, x_UD: torch.Tensor, real_T: torch.Tensor, logits_TE: torch.Tensor, weight_TK: torch.Tensor,
        idx_TK: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padding rows never reach the routelab router (its losses, statistics, capacity); the
        model's own router routes them, without grad and without hooks, so that the experts see
        the same rows as without routelab (and the native rule stays bit-identical)."""
        num_rows = x_UD.shape[0]
        pad_mask_U = torch.ones(num_rows, dtype=torch.bool, device=x_UD.device)
        pad_mask_U[real_T] = False
        pad_Z = pad_mask_U.nonzero().squeeze(1)
        original = self.__dict__["_padding_router"]
        with torch.no_grad():
            x_ZD = x_UD.index_select(0, pad_Z).to(original.weight.dtype)
            pad_logits_ZE, pad_weight_ZK, pad_idx_ZK = type(original).forward(original, x_ZD)
        width = max(idx_TK.shape[1], pad_idx_ZK.shape[1])
        idx_UK = idx_TK.new_zeros(num_rows, width)
        weight_UK = weight_TK.new_zeros(num_rows, width)
        idx_UK[real_T, : idx_TK.shape[1]] = idx_TK
        weight_UK[real_T, : weight_TK.shape[1]] = weight_TK
        idx_UK[pad_Z, : pad_idx_ZK.shape[1]] = pad_idx_ZK
        weight_UK[pad_Z, : pad_weight_ZK.shape[1]] = pad_weight_ZK.to(weight_UK.dtype)
        logits_UE = logits_TE.new_zeros(num_rows, logits_TE.shape[1])
        logits_UE[real_T] = logits_TE
        logits_UE[pad_Z] = pad_logits_ZE.to(logits_UE.dtype)
        return logits_UE, weight_UK, idx_UK


def make_replacement(original: nn.Module, router: Router, arch: Architecture, state: ForwardState) -> nn.Module:
    """A module of a fresh subclass of ``type(original)`` that routes with ``router``."""
    base = type(original)
    cls = type(f"Routelab{base.__name__}", (ReplacementRouter, base), {"__module__": __name__})
    module = cls.__new__(cls)
    module._setup(original, router, arch, state)
    module.train(original.training)
    return module
