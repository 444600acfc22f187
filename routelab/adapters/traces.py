"""Record adapter routing in the routing-trace format of ``routelab.traces``.

Each routed linear is one trace layer (in model order); token-level methods store their
top-k experts, task-level ones (Polytropon/MHR) every (head, skill) pair with its weight,
so ``routelab analyze`` and the cache simulator read adapter traces as they read MoE ones.
The trace's domain column holds each token's task name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from routelab.adapters.attach import AdapterSet
from routelab.core import InputError
from routelab.traces.writer import TraceWriter


def record_adapter_trace(
    adapters: AdapterSet,
    path: str | Path,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
    *,
    task_names: Sequence[str] | None = None,
    forward: Callable[[torch.Tensor], Any] | None = None,
    metadata: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Run ``forward(input_ids)`` (default: the model) on each ``(input_ids [B, S], task_ids [B] | None)``
    batch and write every routed layer's routing to the trace at ``path``; return ``path``."""
    run = forward or adapters.model
    names = list(adapters.layers)
    writer: TraceWriter | None = None
    offset = 0
    try:
        with torch.no_grad():
            for input_ids, task_ids in batches:
                with adapters.context(task_ids=task_ids) as records:
                    run(input_ids)
                first: dict[str, Any] = {}
                for name, routing, batch in records:
                    first.setdefault(name, (routing, batch))
                if set(first) != set(names):
                    raise InputError(f"the forward did not reach every routed layer (missing {sorted(set(names) - set(first))}).")
                if writer is None:
                    header = {"model": type(adapters.model).__name__, "router": adapters.method,
                              "level": "adapter", "layer_names": names, **(metadata or {})}
                    if task_names is not None:
                        header["domain_names"] = list(task_names)
                    writer = TraceWriter(path, header, num_layers=len(names),
                                         num_experts=first[names[0]][0].num_experts, overwrite=overwrite)
                for layer, name in enumerate(names):
                    routing, batch = first[name]
                    token_ids = input_ids.reshape(-1).index_select(0, batch.flat_index_T.cpu())
                    domains = None
                    if task_ids is not None and task_names is not None:
                        domains = torch.as_tensor(task_ids)[batch.seq_id_T.cpu()].clamp_min(0).numpy()
                    writer.add(layer, routing.topk_idx, routing.topk_weight, token_ids, batch.seq_id_T + offset,
                               batch.position_T, domains)
                offset += int(input_ids.shape[0])
        if writer is None:
            raise InputError("no batches to trace.")
        writer.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    return Path(path)
