"""The router: a composition of parts (scorer -> score function -> selector, + balancer, + losses).

Each part is a small ``nn.Module`` with one job. They communicate through a
``RoutingDraft``, the in-progress routing of one forward call, so a part can read what the
parts before it produced (e.g. the noisy top-k load loss reads the noise scale the scorer
drew) without any module-global state. ``Router.forward`` turns the draft into the
immutable-by-convention ``Routing`` that dispatch and metrics consume.
"""

from __future__ import annotations

import functools
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from routelab.core.context import TokenBatch
from routelab.core.errors import ConfigError
from routelab.core.routing import Routing
from routelab.core.routing_stats import expert_load, routing_stats
from routelab.core.validation import check_router_input


@dataclass
class RoutingDraft:
    """Everything computed so far in one router forward (fp32 throughout).

    ``selection_scores_TE`` are the scores the selector ranks (scores plus any balancing
    bias); gates are always taken from the unbiased ``scores_TE`` unless a selector says
    otherwise.
    """

    x_TD: torch.Tensor
    batch: TokenBatch
    num_experts: int
    top_k: int
    training: bool
    logits_TE: torch.Tensor | None = None
    scores_TE: torch.Tensor | None = None
    selection_scores_TE: torch.Tensor | None = None
    topk_idx_TK: torch.Tensor | None = None
    gate_TK: torch.Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    extra_stats: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.x_TD.shape[0])

    def probs_TE(self) -> torch.Tensor:
        """Scores normalised to sum to 1 per token (softmax scores are returned as they are).

        Balance losses use these as the router's probability of each expert, so that they
        are meaningful for sigmoid and ReLU score functions too.
        """
        assert self.scores_TE is not None
        if self.extras.get("scores_are_probs", False):
            return self.scores_TE
        return self.scores_TE / self.scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)


class StatefulPart(nn.Module, ABC):
    """A part with state that must be updated exactly once per optimizer step."""

    @abstractmethod
    def end_of_step(self) -> None:
        ...


@dataclass
class TrainingData:
    """What a part may fit itself to before training: the training token ids (1-D int64)."""

    token_ids: torch.Tensor
    vocab_size: int

    @functools.cached_property
    def token_counts_V(self) -> torch.Tensor:
        """How often each vocabulary id occurs in the training tokens (computed once)."""
        return torch.bincount(self.token_ids, minlength=self.vocab_size)


class FitsData(ABC):
    """A part that is fitted to the training data once, before training (``fit_to_data``)."""

    @abstractmethod
    def fit_data(self, data: TrainingData) -> None:
        ...


class Scorer(nn.Module, ABC):
    """``x_TD`` (fp32) -> ``logits_TE`` (fp32)."""

    @abstractmethod
    def forward(self, x_TD: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        ...


class ScoreFunction(nn.Module, ABC):
    """``logits_TE`` -> ``scores_TE``."""

    probabilities: bool = False  # True when the scores already sum to 1 per token

    @abstractmethod
    def forward(self, logits_TE: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        ...


class Selector(nn.Module, ABC):
    """Reads the draft, returns ``(topk_idx_TK, gate_TK)`` with ``-1``/0 in empty slots.

    ``gate_TK`` are raw gate values before gate normalisation (normally the unbiased
    scores at the selected experts).
    """

    @abstractmethod
    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    # Router replay (``routelab.routers.replay``) forces recorded experts; a selector that can
    # compute its gates for given experts says so and implements ``replay_gates``.
    supports_replay: bool = False

    def replay_gates(self, draft: RoutingDraft, topk_idx_TK: torch.Tensor) -> torch.Tensor:
        """Raw gates of the forced experts ``topk_idx_TK`` (``-1`` slots get 0)."""
        raise ConfigError(f"{type(self).__name__} cannot recompute gates for forced experts (no router replay).")


class ScoreGatesSelector(Selector):
    """A selector whose raw gates are the unbiased scores of the selected experts (top-k style)."""

    supports_replay = True

    def replay_gates(self, draft: RoutingDraft, topk_idx_TK: torch.Tensor) -> torch.Tensor:
        assert draft.scores_TE is not None
        gate_TK = draft.scores_TE.gather(1, topk_idx_TK.clamp_min(0))
        return torch.where(topk_idx_TK >= 0, gate_TK, torch.zeros_like(gate_TK))


class Balancer(StatefulPart):
    """A stateful bias that changes which experts are selected but never the gate values."""

    @abstractmethod
    def selection_scores(self, scores_TE: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        ...

    @abstractmethod
    def observe(self, draft: RoutingDraft) -> None:
        ...


class RouterLoss(nn.Module, ABC):
    """A named auxiliary loss with a coefficient; ``forward`` returns the unweighted scalar."""

    def __init__(self, name: str, coef: float) -> None:
        super().__init__()
        self.name = name
        self.coef = float(coef)

    @abstractmethod
    def forward(self, draft: RoutingDraft) -> torch.Tensor:
        ...


class Router(nn.Module):
    """A token router assembled from parts; see DESIGN.md.

    Args:
        num_experts: ``E``.
        top_k: nominal experts per token (selectors may leave slots empty).
        scorer, score_fn, selector, gate_norm: the pipeline parts.
        balancer: optional stateful selection bias.
        losses: auxiliary losses; ``Routing.aux_loss`` is ``sum(coef * loss)``.
        capacity: optional token-dropping stage applied after selection.
        name: the preset name, for display.

    ``layer_kind`` names the layer that runs it: ``"token"`` routers (every one built from
    parts) run in ``routelab.MoE``; a router whose experts see mixtures of tokens says so
    (``routelab.SoftMoE``).
    """

    layer_kind = "token"
    # Training forwards without an end_of_step after which a router with stateful parts
    # warns (once) that its balancing state is not being updated.
    forgotten_step_forwards = 64

    def __init__(
        self,
        *,
        num_experts: int,
        top_k: int,
        scorer: Scorer,
        score_fn: ScoreFunction,
        selector: Selector,
        gate_norm: nn.Module,
        balancer: Balancer | None = None,
        losses: list[RouterLoss] | tuple[RouterLoss, ...] = (),
        capacity: nn.Module | None = None,
        name: str = "custom",
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.scorer = scorer
        self.score_fn = score_fn
        self.selector = selector
        self.gate_norm = gate_norm
        self.balancer = balancer
        self.losses = nn.ModuleList(losses)
        self.capacity = capacity
        self.name = name
        self.has_stateful_parts = any(isinstance(m, StatefulPart) for m in self.modules())
        self.forwards_since_step = 0
        self.warned_no_step = False
        self.d_model: int | None = None  # set by create_router; checked on standalone calls
        self.replay: Any = None  # set by routelab.routers.replay while recording or replaying
        self.register_forward_pre_hook(_check_standalone_input, with_kwargs=True)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_experts={self.num_experts}, top_k={self.top_k}"

    def forward(self, x_TD: torch.Tensor, batch: TokenBatch | None = None) -> Routing:
        """Route ``x_TD`` (``[T, D]``, real tokens only). ``batch`` describes their layout."""
        num_tokens = x_TD.shape[0]
        if self.training and self.has_stateful_parts:
            self.count_forward_without_step()
        if batch is None:
            batch = TokenBatch.single_sequence(num_tokens, device=x_TD.device)
        device_type = x_TD.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            draft = RoutingDraft(
                x_TD=x_TD.float(),
                batch=batch,
                num_experts=self.num_experts,
                top_k=self.top_k,
                training=self.training,
            )
            draft.logits_TE = self.scorer(draft.x_TD, draft).float()
            draft.scores_TE = self.score_fn(draft.logits_TE, draft)
            draft.extras.setdefault("scores_are_probs", self.score_fn.probabilities)
            if self.balancer is not None:
                draft.selection_scores_TE = self.balancer.selection_scores(draft.scores_TE, draft)
            else:
                draft.selection_scores_TE = draft.scores_TE
            topk_idx_TK, gate_TK = self.selector(draft)
            if self.replay is not None:
                topk_idx_TK, gate_TK = self.replay.apply(self, draft, topk_idx_TK, gate_TK)
            gate_TK = self.gate_norm(gate_TK, topk_idx_TK, draft)
            gate_TK = torch.where(topk_idx_TK >= 0, gate_TK, torch.zeros_like(gate_TK))
            draft.topk_idx_TK, draft.gate_TK = topk_idx_TK, gate_TK

            losses = self._losses(draft)

            load_before_drop_E = expert_load(topk_idx_TK, self.num_experts)
            selected = load_before_drop_E.sum()
            capacity = None
            if self.capacity is not None:
                topk_idx_TK, gate_TK, capacity = self.capacity(topk_idx_TK, gate_TK, draft)
            draft.extras["kept_topk_idx_TK"] = topk_idx_TK
            if self.training and self.balancer is not None:
                with torch.no_grad():
                    self.balancer.observe(draft)
            stats = routing_stats(
                topk_idx_TK,
                self.num_experts,
                selected_assignments=selected,
                load_before_drop_E=load_before_drop_E,
            )
            stats.update(draft.extra_stats)
            capacity = draft.extras.get("capacity", capacity)
        aux_loss = x_TD.new_zeros((), dtype=torch.float32)
        for loss in self.losses:
            if loss.coef != 0.0:
                aux_loss = aux_loss + loss.coef * losses[loss.name]
        return Routing(
            topk_idx=topk_idx_TK,
            topk_weight=gate_TK,
            logits=draft.logits_TE,
            scores=draft.scores_TE,
            num_experts=self.num_experts,
            losses=losses,
            aux_loss=aux_loss,
            stats=stats,
            capacity=capacity,
        )

    def _losses(self, draft: RoutingDraft) -> dict[str, torch.Tensor]:
        if draft.num_tokens == 0:
            zero = draft.x_TD.new_zeros(())
            return {loss.name: zero for loss in self.losses}
        return {loss.name: loss(draft) for loss in self.losses}

    def count_forward_without_step(self) -> None:
        self.forwards_since_step += 1
        if self.forwards_since_step > self.forgotten_step_forwards and not self.warned_no_step:
            self.warned_no_step = True
            parts = sorted({type(m).__name__ for m in self.modules() if isinstance(m, StatefulPart)})
            warnings.warn(
                f"router {self.name!r} ran {self.forwards_since_step - 1} training forwards without "
                f"routelab.end_of_step, so its stateful parts ({', '.join(parts)}) are not updated (e.g. "
                "loss-free balancing stops). Call routelab.end_of_step(model) after each optimizer.step(), "
                "or once routelab.register_end_of_step(optimizer, model).",
                RuntimeWarning,
                stacklevel=2,
            )

    def end_of_step(self) -> None:
        """Update every stateful part of this router (call once per optimizer step)."""
        end_of_step(self)


def _check_standalone_input(router: Router, args: tuple, kwargs: dict) -> None:
    """Every router call gets the MoE layer's input checks (skipped inside the layer, which ran them)."""
    check_router_input(args[0] if args else kwargs.get("x_TD"), router.d_model, name="x_TD")


def end_of_step(model: nn.Module) -> int:
    """Call the once-per-optimizer-step update of every stateful routing part in ``model``.

    Call it after ``optimizer.step()`` (after all gradient-accumulation micro-batches), or
    let ``register_end_of_step`` do it. Returns the number of parts updated.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, StatefulPart):
            module.end_of_step()
            count += 1
        if isinstance(module, Router):
            module.forwards_since_step = 0
    return count


def register_end_of_step(optimizer: torch.optim.Optimizer, model: nn.Module) -> RemovableHandle:
    """Run ``end_of_step(model)`` after every ``optimizer.step()``, so that it cannot be forgotten.

    An optimizer step hook, as torchtitan attaches its MoE load-balancing bias update to the
    optimizer (``build_optimizers_with_moe_load_balancing`` in
    ``torchtitan/components/optimizer.py``). torchtitan uses a pre-hook; this is a
    post-hook (``Optimizer.register_step_post_hook``), so the update runs where
    ``end_of_step`` always runs: after the parameter update. Call it once and do not also
    call ``end_of_step`` by hand. ``handle.remove()`` undoes it.
    """
    return optimizer.register_step_post_hook(lambda _optimizer, _args, _kwargs: end_of_step(model))


def fit_to_data(model: nn.Module, token_ids: torch.Tensor, vocab_size: int) -> int:
    """Fit every part of ``model`` that learns from the training data before training
    (``FitsData``, e.g. frequency-balanced hash routing); returns how many were fitted.

    ``token_ids``: the training token ids, any shape (flattened).
    """
    parts = [module for module in model.modules() if isinstance(module, FitsData)]
    if parts:
        data = TrainingData(torch.as_tensor(token_ids).reshape(-1).long(), int(vocab_size))
        for part in parts:
            part.fit_data(data)
    return len(parts)
