"""Router steering: promote or suppress chosen experts in chosen layers at inference.

Multilingual Routing in MoE (arXiv 2510.04694) steers the "task experts" of the middle
layers, found as the experts whose activation rate on English task data exceeds the one
on general text most (the risk difference ``Delta_e = p_e(domain) - p_e(reference)`` of
SteerMoE, arXiv 2509.09660); it adds ``epsilon`` to their log-softmax scores before
top-k (soft promotion) or forces them into the top-k (hard).

Modes:

* ``logit``: ``z_e += epsilon`` for the chosen experts. For softmax routers this is the
  same selection as adding ``epsilon`` to ``log softmax(z)`` (the log-partition is shared
  by all experts), and the gates follow the steered logits as in SteerMoE.
* ``selection``: ``epsilon`` is added to the selection scores only (after the score
  function: probabilities for softmax routers); the gates keep the unsteered scores.
* ``force``: the chosen experts are always selected (``epsilon > 0``) or never
  (``epsilon < 0``); the remaining slots keep their original order (without group-limited
  routing).

``epsilon = 0`` is the identity in every mode.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from routelab.core.errors import ConfigError, InputError
from routelab.core.validation import check_choice, check_positive_int
from routelab.models.hf.attach import RoutingHandle
from routelab.models.hf.routers import add_logit_offset, add_selection_offset, remove_offset

STEERING_MODES = ("logit", "selection", "force")
OFFSET_NAME = "steering"


@dataclass
class Steering:
    """Steering applied to an attached model; ``remove()`` undoes it (and puts the model's own
    router back where routelab put in the native one for it alone)."""

    handle: RoutingHandle
    experts: dict[int, list[int]]
    epsilon: float
    mode: str

    def remove(self) -> None:
        """Remove the offsets (and the native routers put in for them)."""
        if not self.handle.attached:
            return
        for layer in self.experts:
            router = self.handle.routelab_router(layer)
            if router is not None:
                remove_offset(router, OFFSET_NAME)
        self.handle.release(list(self.experts))

    def __enter__(self) -> Steering:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def steer(
    handle: RoutingHandle,
    experts: Mapping[int, Sequence[int]] | Sequence[int],
    epsilon: float,
    *,
    layers: int | list[int] | None = None,
    mode: str = "logit",
) -> Steering:
    """Promote (``epsilon > 0``) or suppress (``epsilon < 0``) ``experts`` in ``layers``.

    Args:
        handle: an attached ``RoutingHandle``.
        experts: ``{decoder_layer: [expert, ...]}``, or one list of experts for every layer in ``layers``.
        epsilon: the offset (its sign only, in ``force`` mode).
        layers: the layers for a plain list of experts (default all MoE layers; the paper
            steers the middle layers only).
        mode: ``logit``, ``selection`` or ``force`` (see the module docstring).
    """
    check_choice("mode", mode, STEERING_MODES)
    epsilon = float(epsilon)
    if math.isnan(epsilon) or (mode != "force" and math.isinf(epsilon)):
        raise ConfigError(f"epsilon must be a finite number in mode {mode!r}, got {epsilon}; use mode='force' to force.")
    if isinstance(experts, Mapping):
        plan = {layer: list(ids) for layer, ids in experts.items()}
        plan = {handle.resolve_layers(layer)[0]: ids for layer, ids in plan.items()}
    else:
        plan = {layer: list(experts) for layer in handle.resolve_layers(layers)}
    for layer, ids in plan.items():
        bad = [e for e in ids if not 0 <= int(e) < handle.num_experts]
        if bad:
            raise ConfigError(f"experts {bad} of layer {layer} are out of range [0, {handle.num_experts}).")
    routers = handle.ensure_routelab(list(plan))
    steering = Steering(handle, plan, epsilon, mode)
    for layer, router in routers.items():
        offset = torch.zeros(handle.num_experts)
        value = math.copysign(math.inf, epsilon) if mode == "force" and epsilon != 0 else epsilon
        offset[plan[layer]] = value
        if mode == "logit":
            add_logit_offset(router, OFFSET_NAME, offset)
        else:
            add_selection_offset(router, OFFSET_NAME, offset)
    return steering


# ----------------------------------------------------------------------------- finding experts


def activation_rates(topk_idx_TK: torch.Tensor | np.ndarray, num_experts: int) -> np.ndarray:
    """``p_e``: the fraction of tokens whose selected experts include ``e`` (``-1`` slots ignored)."""
    idx = np.asarray(topk_idx_TK)
    if idx.ndim != 2:
        raise InputError(f"topk_idx_TK must be [tokens, k], got shape {idx.shape}.")
    if idx.shape[0] == 0:
        raise InputError("activation rates need at least one token; the selection is empty.")
    hit_TE = np.zeros((idx.shape[0], num_experts), dtype=bool)
    rows, slots = np.nonzero(idx >= 0)
    hit_TE[rows, idx[rows, slots]] = True
    return hit_TE.mean(axis=0)


def risk_difference(
    domain_topk_idx_TK: torch.Tensor | np.ndarray, reference_topk_idx_TK: torch.Tensor | np.ndarray, num_experts: int
) -> np.ndarray:
    """``Delta_e = p_e(domain) - p_e(reference)`` (SteerMoE's risk difference)."""
    return activation_rates(domain_topk_idx_TK, num_experts) - activation_rates(reference_topk_idx_TK, num_experts)


def top_experts(delta_E: np.ndarray, top_n: int) -> list[int]:
    """The ``top_n`` experts with the largest ``Delta_e`` (ties by expert id)."""
    check_positive_int("top_n", top_n)
    order = sorted(range(len(delta_E)), key=lambda e: (-float(delta_E[e]), e))
    return order[:top_n]


def trace_risk_difference(trace: Any, domain: str, layer: int, *, reference: str | Sequence[str] | None = None) -> np.ndarray:
    """``Delta_e`` at trace layer ``layer`` between the tokens of ``domain`` and those of
    ``reference`` (a domain or list of domains; default every other domain of the trace)."""
    if domain not in trace.domain_names:
        raise ConfigError(f"domain={domain!r} is not in the trace; its domains are {trace.domain_names}.")
    if reference is None:
        reference = [name for name in trace.domain_names if name != domain]
        if not reference:
            raise ConfigError(f"the trace has only the domain {domain!r}; pass reference= or record another domain.")
    domain_idx = trace.select(domain=domain, layers=[layer]).topk_idx(layer)
    reference_idx = trace.select(domain=reference, layers=[layer]).topk_idx(layer)
    return risk_difference(domain_idx, reference_idx, trace.num_experts)


def domain_experts(
    trace: Any,
    domain: str,
    *,
    reference: str | Sequence[str] | None = None,
    layers: Sequence[int] | None = None,
    top_n: int = 2,
) -> dict[int, list[int]]:
    """The ``top_n`` experts per layer most activated by ``domain`` relative to ``reference``.

    Layers are trace layers (MoE layer order); the result is keyed by decoder-layer index
    (the trace's ``model_layers`` metadata, written by ``routelab.models.hf.recording``),
    ready for ``steer(handle, experts, epsilon)``.
    """
    model_layers = list(trace.metadata.get("model_layers", trace.layers))
    chosen = list(trace.layers) if layers is None else list(layers)
    result: dict[int, list[int]] = {}
    for layer in chosen:
        delta_E = trace_risk_difference(trace, domain, layer, reference=reference)
        result[int(model_layers[layer])] = top_experts(delta_E, top_n)
    return result
