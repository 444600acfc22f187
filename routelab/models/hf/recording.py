"""Routing traces of transformers MoE models, in routelab's trace format.

* ``HFRoutingSource``: the ``RoutingSource`` of an attached model, for
  ``routelab.traces.TraceRecorder`` (one forward per ``route`` call).
* ``TraceObserver`` (``record(handle, writer)``): writes the routing of *every* forward of
  the attached model to a ``TraceWriter``, ``generate`` included (each decoding step adds
  its new tokens; positions count the cached past, sequence ids stay those of the prompt).

Trace layer ``l`` is the ``l``-th MoE layer of the model; ``trace_metadata`` records the
decoder-layer index of each (``model_layers``) for layers like DeepSeek-V3's dense ones.
Only real tokens are written; rows of a replacement router keep its ``-1`` empty slots.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from routelab.core.errors import ConfigError, InputError
from routelab.models.hf.attach import RoutingHandle
from routelab.models.hf.observe import RouterCall
from routelab.systems.expert_size import expert_size_metadata
from routelab.traces import LayerRoutes, TraceWriter


def trace_metadata(handle: RoutingHandle, **extra: Any) -> dict[str, Any]:
    """Metadata describing the attached model, for ``TraceWriter``."""
    config = getattr(handle.model, "config", None)
    metadata: dict[str, Any] = {
        "model": str(getattr(config, "_name_or_path", "") or type(handle.model).__name__),
        "architecture": handle.architecture.name,
        "router": handle.architecture.rule,
        "top_k": handle.top_k,
        "model_layers": handle.moe_layers,
    }
    experts = getattr(handle.layer(handle.moe_layers[0]).block, "experts", None)
    if isinstance(experts, torch.nn.Module):
        metadata.update(expert_size_metadata(experts, handle.num_experts))
    metadata.update(extra)
    return metadata


def open_writer(handle: RoutingHandle, path: str, *, overwrite: bool = False, **metadata: Any) -> TraceWriter:
    """A ``TraceWriter`` shaped for the attached model (one trace layer per MoE layer)."""
    return TraceWriter(
        path, trace_metadata(handle, **metadata), handle.num_moe_layers, handle.num_experts, overwrite=overwrite
    )


class _Collect:
    def __init__(self) -> None:
        self.calls: list[RouterCall] = []

    def on_router_call(self, call: RouterCall) -> None:
        self.calls.append(call)


class HFRoutingSource:
    """``RoutingSource`` of an attached transformers model (see ``routelab.traces.recorder``)."""

    def __init__(self, handle: RoutingHandle) -> None:
        self.handle = handle

    @property
    def num_layers(self) -> int:
        return self.handle.num_moe_layers

    @property
    def num_experts(self) -> int:
        return self.handle.num_experts

    def route(self, input_ids_BS: torch.Tensor, padding_mask_BS: torch.Tensor | None) -> list[LayerRoutes]:
        collect = _Collect()
        self.handle.add_observer(collect)
        try:
            mask = None if padding_mask_BS is None else padding_mask_BS.long()
            with torch.no_grad():
                self.handle.model(input_ids=input_ids_BS, attention_mask=mask, use_cache=False)
        finally:
            self.handle.remove_observer(collect)
        layers = [call.layer for call in collect.calls]
        if layers != list(range(self.num_layers)):
            raise InputError(f"the forward routed MoE layers {layers}; expected each of 0..{self.num_layers - 1} once.")
        return [LayerRoutes(c.layer, c.topk_idx_TK.detach(), c.topk_weight_TK.detach()) for c in collect.calls]


class TraceObserver:
    """Writes every router call of an attached model to ``writer`` (see ``record``)."""

    def __init__(self, handle: RoutingHandle, writer: TraceWriter, *, domain: str | None = None) -> None:
        if writer.num_layers != handle.num_moe_layers or writer.num_experts != handle.num_experts:
            raise ConfigError(
                f"the writer was created for {writer.num_layers} layers x {writer.num_experts} experts but the model "
                f"has {handle.num_moe_layers} MoE layers x {handle.num_experts} experts; use open_writer(handle, path)."
            )
        self.handle = handle
        self.writer = writer
        self.domain = domain
        self.seq_id_offset = _next_seq_id(writer)
        self._columns: tuple[Any, dict[str, np.ndarray]] | None = None

    def on_router_call(self, call: RouterCall) -> None:
        if self._columns is None or self._columns[0] is not call.tokens:
            per_token = call.tokens.per_token()
            columns = {name: value.cpu().numpy() for name, value in per_token.items()}
            columns["seq_ids_T"] = columns["seq_ids_T"] + self.seq_id_offset
            self._columns = (call.tokens, columns)
        columns = self._columns[1]
        self.writer.add(
            call.layer, call.topk_idx_TK.detach(), call.topk_weight_TK.detach(), columns["token_ids_T"],
            columns["seq_ids_T"], columns["positions_T"], self.domain,
        )

    def stop(self) -> None:
        """Stop recording (the writer stays open; close it to finish the trace)."""
        self.handle.remove_observer(self)
        self._columns = None

    def __enter__(self) -> TraceObserver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def record(handle: RoutingHandle, writer: TraceWriter, *, domain: str | None = None) -> TraceObserver:
    """Record the routing of every forward (and ``generate``) of ``handle``'s model into ``writer``.

    Use as a context manager, or call ``stop()``; set ``observer.domain`` to label what follows.
    """
    return handle.add_observer(TraceObserver(handle, writer, domain=domain))


def _next_seq_id(writer: TraceWriter) -> int:
    """Sequence ids continue after those already in a resumed trace (0 for a new one)."""
    state = writer.resume_state
    if isinstance(state, dict) and "next_seq_id" in state:
        return int(state["next_seq_id"])
    return 0
