"""Attach routed LoRA experts to any model: ``attach_adapters(model, target_modules, ...)``.

Every selected ``nn.Linear`` is replaced in place by a ``RoutedLoRALinear`` holding its
own bank of ``E`` experts and its own router (one router per linear, mttl's "finegrained"
granularity); every other parameter of the model is frozen. The returned ``AdapterSet``
is the handle for training and analysis: the trainable parameter groups, the per-call
context (task ids, padding) and the routings recorded during a forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from routelab.adapters.bank import LoRABank
from routelab.adapters.layer import AdapterState, RoutedLoRALinear
from routelab.adapters.methods import LayerShape, method_info
from routelab.adapters.routing import AdapterRouting
from routelab.adapters.targets import find_targets, replace_module
from routelab.core import ConfigError, InputError, TokenBatch
from routelab.core.validation import check_choice, check_positive_int

DISPATCH = ("auto", "grouped_mm", "dense")


class AdapterSet:
    """The routed LoRA layers of one model.

    Attributes:
        model: the adapted model (modified in place).
        layers: ``{module name: RoutedLoRALinear}`` in model order.
        method, num_experts, rank, num_tasks: how it was built.
        state: the ``AdapterState`` the layers read.
    """

    def __init__(self, model: nn.Module, layers: dict[str, RoutedLoRALinear], state: AdapterState, *,
                 method: str, num_experts: int, rank: int, num_tasks: int | None) -> None:
        self.model = model
        self.layers = layers
        self.state = state
        self.method = method
        self.num_experts = num_experts
        self.rank = rank
        self.num_tasks = num_tasks

    def __repr__(self) -> str:
        return (f"AdapterSet(method={self.method!r}, layers={len(self.layers)}, num_experts={self.num_experts}, "
                f"rank={self.rank}, num_tasks={self.num_tasks})")

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            yield from layer.bank.parameters()

    def router_parameters(self) -> Iterator[nn.Parameter]:
        for layer in self.layers.values():
            yield from layer.router.parameters()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def freeze_experts(self, frozen: bool = True) -> None:
        """Train only the routers (LoRA-Mixer's regime 2, MHR-z, GLIDER on fixed experts)."""
        for p in self.expert_parameters():
            p.requires_grad_(not frozen)

    def freeze_routers(self, frozen: bool = True) -> None:
        for p in self.router_parameters():
            p.requires_grad_(not frozen)

    def routers(self) -> list[nn.Module]:
        return [layer.router for layer in self.layers.values()]

    @contextmanager
    def context(self, *, task_ids: torch.Tensor | Sequence[int] | None = None,
                padding_mask: torch.Tensor | None = None, record: bool = True) -> Iterator[list[tuple[str, AdapterRouting, TokenBatch]]]:
        """Set the task id of each sequence (``[batch]``, ``-1`` = unknown) and the padding mask for
        the forwards inside the block; yields the list the layers append ``(name, routing, batch)`` to."""
        if task_ids is not None and not isinstance(task_ids, torch.Tensor):
            task_ids = torch.as_tensor(list(task_ids), dtype=torch.int64)
        if task_ids is not None and (task_ids.dim() != 1 or task_ids.is_floating_point()):
            raise InputError(f"task_ids must be a 1-D integer tensor with one id per sequence, got {tuple(task_ids.shape)} "
                             f"{task_ids.dtype}.")
        previous = (self.state.task_ids, self.state.padding_mask, self.state.records)
        records: list[tuple[str, AdapterRouting, TokenBatch]] = []
        self.state.task_ids, self.state.padding_mask = task_ids, padding_mask
        self.state.records = records if record else None
        try:
            yield records
        finally:
            self.state.task_ids, self.state.padding_mask, self.state.records = previous

    @staticmethod
    def aux_loss(records: Sequence[tuple[str, AdapterRouting, TokenBatch]]) -> torch.Tensor:
        """Sum of the routers' coefficient-weighted losses over the recorded layer calls."""
        total: torch.Tensor | None = None
        for _, routing, _ in records:
            if routing.aux_loss is not None:
                total = routing.aux_loss if total is None else total + routing.aux_loss.to(total.device)
        if total is None:
            total = torch.zeros(())
        return total


def attach_adapters(
    model: nn.Module,
    target_modules: str | Sequence[str],
    *,
    num_experts: int,
    rank: int = 16,
    method: str = "topk",
    lora_alpha: float | None = None,
    num_tasks: int | None = None,
    dispatch: str = "auto",
    init_b_std: float = 0.0,
    **method_options: Any,
) -> AdapterSet:
    """Replace the selected linear layers of ``model`` by routed LoRA layers; freeze the rest.

    Args:
        target_modules: module names or a regular expression (peft semantics).
        num_experts: ``E`` adapters (skills for ``poly``/``mhr``).
        rank: LoRA rank ``r``.
        method: a name of ``list_methods()`` (``topk`` takes ``router=PRESET``).
        lora_alpha: scaling numerator (scaling ``lora_alpha / r``); default per method
            (1 for poly/mhr/glider/phatgoose, i.e. ``1/r``; ``r`` otherwise; ``2r`` for dynmole).
        num_tasks: number of task ids (task-level methods).
        dispatch: ``auto``, ``grouped_mm`` or ``dense`` (see ``routelab.adapters.dispatch``).
        init_b_std: 0 = peft's init (``B = 0``); > 0 draws ``B ~ N(0, init_b_std)``.
        method_options: the method's own options (e.g. ``top_k``, ``num_heads``, ``global_scale``).
    """
    info = method_info(method)
    check_positive_int("num_experts", num_experts)
    check_positive_int("rank", rank)
    check_choice("dispatch", dispatch, DISPATCH)
    if num_tasks is not None:
        check_positive_int("num_tasks", num_tasks)
    if any(isinstance(m, RoutedLoRALinear) for m in model.modules()):
        raise ConfigError("the model already has routed LoRA layers; attach once per model (or rebuild the model).")
    targets = find_targets(model, target_modules)
    alpha = info.alpha(rank) if lora_alpha is None else float(lora_alpha)
    for p in model.parameters():
        p.requires_grad_(False)
    state = AdapterState(dispatch=dispatch)
    layers: dict[str, RoutedLoRALinear] = {}
    for name, linear in targets:
        shape = LayerShape(linear.in_features, linear.out_features, num_experts, rank, num_tasks)
        try:
            router = info.build(shape, **method_options)
        except TypeError as error:
            raise ConfigError(f"method={method!r} got an unknown option: {error}.") from None
        bank = LoRABank(num_experts, linear.in_features, linear.out_features, rank, scaling=alpha / rank)
        if init_b_std > 0:
            bank.reset_parameters(b_std=init_b_std)
        device = linear.weight.device
        layer = RoutedLoRALinear(linear, bank.to(device), router.to(device), state, name)
        replace_module(model, name, layer)
        layers[name] = layer
    return AdapterSet(model, layers, state, method=method, num_experts=num_experts, rank=rank, num_tasks=num_tasks)
