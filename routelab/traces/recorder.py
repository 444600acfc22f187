"""Recording routing traces from a model: the ``RoutingSource`` protocol and ``TraceRecorder``.

A ``RoutingSource`` runs one forward and yields, per MoE layer, the layer index and the
``topk_idx``/``topk_weight`` of the real (non-padding) tokens in (batch, position) order.
``ModuleRoutingSource`` implements it for any ``torch.nn.Module`` built from
``routelab.MoE`` layers by forward hooks on those layers (their ``MoEOutput.routing`` holds
exactly the real tokens); adapters for other model families implement the same protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from routelab.core.context import TokenBatch
from routelab.core.errors import ConfigError, InputError
from routelab.moe.layer import MoE, MoEOutput
from routelab.traces.writer import TraceWriter, to_numpy


class LayerRoutes(NamedTuple):
    """The routing of one MoE layer in one forward (real tokens, (batch, position) order)."""

    layer: int
    topk_idx_TK: Any
    topk_weight_TK: Any


@runtime_checkable
class RoutingSource(Protocol):
    """Anything that can run a forward and report each MoE layer's routing.

    ``route(input_ids_BS, padding_mask_BS)`` runs the model on ``[B, S]`` token ids
    (``padding_mask`` True = real token, None = no padding) and yields one ``LayerRoutes``
    per MoE layer, layer indices ``0 .. num_layers-1``, each with one row per real token in
    (batch, position) order.
    """

    @property
    def num_layers(self) -> int: ...

    @property
    def num_experts(self) -> int: ...

    def route(self, input_ids_BS: torch.Tensor, padding_mask_BS: torch.Tensor | None) -> Iterable[LayerRoutes]: ...


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """The ``routelab.MoE`` modules of ``model`` in registration order (their trace layer order)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoE)]


class ModuleRoutingSource:
    """``RoutingSource`` for a model built from ``routelab.MoE`` layers, via forward hooks.

    Args:
        model: any module containing ``routelab.MoE`` layers (layer ``l`` of the trace is
            the ``l``-th MoE module in ``model.named_modules()`` order).
        forward: how to call the model; default ``model(input_ids, padding_mask=mask)``
            (``model(input_ids)`` when there is no padding).
    """

    def __init__(
        self,
        model: nn.Module,
        forward: Callable[[nn.Module, torch.Tensor, torch.Tensor | None], Any] | None = None,
    ) -> None:
        self.model = model
        self.layers = moe_layers(model)
        if not self.layers:
            raise ConfigError(f"{type(model).__name__} has no routelab.MoE layer to record.")
        experts = {module.num_experts for _, module in self.layers}
        if len(experts) != 1:
            raise ConfigError(
                f"the MoE layers of {type(model).__name__} have different expert counts {sorted(experts)}; "
                "a trace needs one num_experts (trace the layers separately)."
            )
        self._num_experts = experts.pop()
        self._forward = forward or _default_forward

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def num_experts(self) -> int:
        return self._num_experts

    @property
    def layer_names(self) -> list[str]:
        return [name for name, _ in self.layers]

    def route(self, input_ids_BS: torch.Tensor, padding_mask_BS: torch.Tensor | None) -> list[LayerRoutes]:
        captured: dict[int, LayerRoutes] = {}

        def make_hook(layer: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                if not isinstance(output, MoEOutput):
                    raise InputError(f"MoE layer {layer} returned {type(output).__name__}, not MoEOutput.")
                if layer in captured:
                    raise InputError(
                        f"MoE layer {layer} ({self.layers[layer][0]}) ran twice in one forward; a trace records "
                        "one routing per layer and token."
                    )
                routing = output.routing
                captured[layer] = LayerRoutes(layer, routing.topk_idx.detach(), routing.topk_weight.detach())

            return hook

        handles = [module.register_forward_hook(make_hook(i)) for i, (_, module) in enumerate(self.layers)]
        try:
            with torch.no_grad():
                self._forward(self.model, input_ids_BS, padding_mask_BS)
        finally:
            for handle in handles:
                handle.remove()
        missing = [i for i in range(self.num_layers) if i not in captured]
        if missing:
            raise InputError(f"MoE layers {missing} did not run in the forward; every layer must route every token.")
        return [captured[i] for i in range(self.num_layers)]


def _default_forward(model: nn.Module, input_ids: torch.Tensor, padding_mask: torch.Tensor | None) -> Any:
    if padding_mask is None:
        return model(input_ids)
    return model(input_ids, padding_mask=padding_mask)


class TraceRecorder:
    """Run forwards through a model (or any ``RoutingSource``) and write their routing.

    Args:
        model_or_source: a module with ``routelab.MoE`` layers, or a ``RoutingSource``.
        writer: an open ``TraceWriter`` with matching ``num_layers``/``num_experts``.

    ``record(input_ids, padding_mask, seq_ids=..., domains=...)`` runs one forward and
    appends its real tokens; sequence ids default to a running counter (one id per batch
    row), positions come from the padding mask.
    """

    def __init__(self, model_or_source: nn.Module | RoutingSource, writer: TraceWriter) -> None:
        if isinstance(model_or_source, nn.Module):
            source: RoutingSource = ModuleRoutingSource(model_or_source)
        elif isinstance(model_or_source, RoutingSource):
            source = model_or_source
        else:
            raise ConfigError(
                f"model_or_source must be an nn.Module with routelab.MoE layers or a RoutingSource, "
                f"got {type(model_or_source).__name__}."
            )
        if source.num_layers != writer.num_layers or source.num_experts != writer.num_experts:
            raise ConfigError(
                f"the model has {source.num_layers} MoE layers x {source.num_experts} experts but the writer was "
                f"created for {writer.num_layers} x {writer.num_experts}."
            )
        self.source = source
        self.writer = writer
        self.next_seq_id = 0

    def record(
        self,
        input_ids_BS: torch.Tensor,
        padding_mask_BS: torch.Tensor | None = None,
        *,
        seq_ids_B: Any = None,
        domains_B: Any = None,
    ) -> int:
        """Run one forward and write its routing; returns the number of real tokens written.

        Args:
            input_ids_BS: int ``[B, S]`` token ids.
            padding_mask_BS: bool ``[B, S]``, True = real token (None = all real).
            seq_ids_B: one sequence id per batch row (default: a running counter).
            domains_B: one domain (name or code) per batch row, one name for all, or None.
        """
        if not isinstance(input_ids_BS, torch.Tensor) or input_ids_BS.dim() != 2:
            raise InputError("input_ids_BS must be a [batch, seq] integer tensor.")
        batch_size, seq_len = input_ids_BS.shape
        batch = TokenBatch.from_mask(batch_size, seq_len, padding_mask_BS, token_ids=input_ids_BS)
        if seq_ids_B is None:
            seq_ids = np.arange(self.next_seq_id, self.next_seq_id + batch_size, dtype=np.int64)
        else:
            seq_ids = to_numpy(seq_ids_B, "seq_ids_B").astype(np.int64).reshape(-1)
            if seq_ids.shape != (batch_size,):
                raise InputError(f"seq_ids_B must have one entry per batch row ({batch_size}), got {seq_ids.shape}.")
        self.next_seq_id = int(seq_ids.max()) + 1 if batch_size else self.next_seq_id
        row_T = batch.seq_id_T.cpu().numpy()
        seq_ids_T = seq_ids[row_T]
        domains_T = _per_token(domains_B, row_T, batch_size)
        token_ids_T = batch.token_ids_T.cpu().numpy()
        positions_T = batch.position_T.cpu().numpy()
        for routes in self._routes(input_ids_BS, padding_mask_BS, batch.num_tokens):
            self.writer.add(routes.layer, routes.topk_idx_TK, routes.topk_weight_TK, token_ids_T, seq_ids_T,
                            positions_T, domains_T)
        return batch.num_tokens

    def _routes(
        self, input_ids: torch.Tensor, padding_mask: torch.Tensor | None, num_tokens: int
    ) -> Iterator[LayerRoutes]:
        seen = set()
        for routes in self.source.route(input_ids, padding_mask):
            rows = int(routes.topk_idx_TK.shape[0])
            if rows != num_tokens:
                raise InputError(
                    f"layer {routes.layer} reported {rows} routed tokens but the batch has {num_tokens} real tokens; "
                    "a RoutingSource must report exactly the real tokens in (batch, position) order."
                )
            seen.add(routes.layer)
            yield routes
        if len(seen) != self.writer.num_layers:
            raise InputError(f"the source reported layers {sorted(seen)}; expected 0..{self.writer.num_layers - 1}.")


def _per_token(domains_B: Any, row_T: np.ndarray, batch_size: int) -> Any:
    if domains_B is None or isinstance(domains_B, str):
        return domains_B
    domains = np.asarray(domains_B if not isinstance(domains_B, torch.Tensor) else domains_B.cpu().numpy())
    if domains.shape != (batch_size,):
        raise InputError(f"domains_B must have one entry per batch row ({batch_size}), got shape {domains.shape}.")
    return domains[row_T]
