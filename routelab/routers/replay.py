"""Router replay: record which experts every router selected, then force the same selection
in later forwards (Megatron-Core's router replay, used to make RL training routes match the
rollout's, and for debugging).

``record_routing(model)`` records, per router and in call order, the selection each router
made (before capacity drops, which are recomputed from the same gates). ``replay_routing(model,
record)`` makes each router take its recorded selections in the same order instead of its own;
gates are recomputed from the router's current scores at the forced experts (the selector's
``replay_gates``), so they carry gradient and a balancing bias or logit offset cannot move
the choice. A replayed forward of the same inputs is bit-identical to the recorded one.

Works on anything that holds ``routelab.routers.Router`` modules: ``routelab.MoE`` layers,
lab models, and transformers models whose routers were replaced (``handle.ensure_routelab()``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from routelab.core.errors import ConfigError, InputError
from routelab.routers.parts.router import Router, RoutingDraft


@dataclass
class RoutingRecord:
    """The selections recorded per router (by its module name), in call order."""

    selections: dict[str, list[torch.Tensor]] = field(default_factory=dict)

    def num_calls(self, router_name: str) -> int:
        return len(self.selections.get(router_name, []))


class _RouterReplay:
    """Attached to one router while recording or replaying (``Router.replay``)."""

    def __init__(self, name: str, record: RoutingRecord, replaying: bool) -> None:
        self.name = name
        self.record = record
        self.replaying = replaying
        self.cursor = 0

    def apply(
        self, router: Router, draft: RoutingDraft, topk_idx_TK: torch.Tensor, gate_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.replaying:
            self.record.selections.setdefault(self.name, []).append(topk_idx_TK.detach().clone())
            return topk_idx_TK, gate_TK
        recorded = self.record.selections.get(self.name, [])
        if self.cursor >= len(recorded):
            raise InputError(
                f"router {self.name!r} was called {self.cursor + 1} times while replaying, but the record holds "
                f"{len(recorded)} calls of it; replay the same sequence of forwards that was recorded."
            )
        forced_TK = recorded[self.cursor].to(topk_idx_TK.device)
        self.cursor += 1
        if forced_TK.shape[0] != topk_idx_TK.shape[0]:
            raise InputError(
                f"router {self.name!r}: call {self.cursor} routes {topk_idx_TK.shape[0]} tokens but the recorded call "
                f"routed {forced_TK.shape[0]}; replay needs the same batches as the recording."
            )
        gates_TK = router.selector.replay_gates(draft, forced_TK)
        return forced_TK, gates_TK


def _routers(model: nn.Module) -> list[tuple[str, Router]]:
    routers = [(name or "router", module) for name, module in model.named_modules() if isinstance(module, Router)]
    if not routers:
        raise ConfigError(
            f"{type(model).__name__} holds no routelab Router; for a transformers model call handle.ensure_routelab() "
            "first (it swaps in the model's own rule as routelab routers)."
        )
    return routers


@contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingRecord]:
    """Record every routelab router's selections in ``model`` while the block runs."""
    record = RoutingRecord()
    routers = _routers(model)
    for name, router in routers:
        router.replay = _RouterReplay(name, record, replaying=False)
    try:
        yield record
    finally:
        for _, router in routers:
            router.replay = None


@contextmanager
def replay_routing(model: nn.Module, record: RoutingRecord) -> Iterator[RoutingRecord]:
    """Force every routelab router in ``model`` to take its recorded selections, in order."""
    routers = _routers(model)
    missing = [name for name, _ in routers if record.num_calls(name) == 0]
    if missing:
        raise ConfigError(f"the record holds no selection for router(s) {', '.join(missing)}; record the same model.")
    unsupported = [name for name, router in routers if not router.selector.supports_replay]
    if unsupported:
        raise ConfigError(
            f"router(s) {', '.join(unsupported)} select with a rule whose gates cannot be recomputed for forced "
            "experts (replay needs a top-k style selector); replay is not available for them."
        )
    for name, router in routers:
        router.replay = _RouterReplay(name, record, replaying=True)
    try:
        yield record
    finally:
        for _, router in routers:
            router.replay = None
