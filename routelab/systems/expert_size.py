"""How many bytes one expert moves when it is loaded: recorded in a trace, read back by the
serving simulators.

Traces written by ``routelab trace`` (lab checkpoints and transformers models) carry
``expert_parameters``, ``expert_dtype`` and ``expert_bytes`` in their metadata, measured on
the experts module of the traced model. Older lab traces carry the model config instead,
from which the widths give the size. Without either, the simulators fall back to a
Mixtral-8x7B expert in bf16 (3 x 4096 x 14336 x 2 bytes = 352 MB) and say so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

MIXTRAL_EXPERT_BYTES = 3 * 4096 * 14336 * 2


@dataclass(frozen=True)
class ExpertSize:
    """The bytes of one expert and where the number came from (printed by the CLI)."""

    bytes: float
    source: str


def expert_size_metadata(experts: nn.Module, num_experts: int) -> dict[str, Any]:
    """Trace metadata for the experts module ``experts`` holding ``num_experts`` experts
    (every parameter of the module is split evenly between them)."""
    params = list(experts.parameters())
    if not params or num_experts <= 0:
        return {}
    total = sum(p.numel() for p in params)
    total_bytes = sum(p.numel() * p.element_size() for p in params)
    dtype = params[0].dtype
    return {
        "expert_parameters": total // num_experts,
        "expert_dtype": str(dtype).removeprefix("torch."),
        "expert_bytes": total_bytes // num_experts,
    }


def _from_model_config(config: dict[str, Any]) -> ExpertSize | None:
    d_model, d_hidden = config.get("d_model"), config.get("expert_d_hidden")
    if not isinstance(d_model, int) or not isinstance(d_hidden, int):
        return None
    matrices = 3 if config.get("activation", "swiglu") == "swiglu" else 2
    params = matrices * d_model * d_hidden
    return ExpertSize(
        params * torch.finfo(torch.float32).bits // 8,
        f"the trace's model config: {matrices} x {d_model} x {d_hidden} parameters in float32",
    )


def expert_size_of_trace(metadata: dict[str, Any]) -> ExpertSize | None:
    """The expert size recorded in a trace's metadata, or None when it has none."""
    recorded = metadata.get("expert_bytes")
    if isinstance(recorded, (int, float)) and recorded > 0:
        detail = ""
        if metadata.get("expert_parameters") and metadata.get("expert_dtype"):
            detail = f": {metadata['expert_parameters']} parameters in {metadata['expert_dtype']}"
        return ExpertSize(float(recorded), f"the trace metadata{detail}")
    config = metadata.get("model_config")
    return _from_model_config(config) if isinstance(config, dict) else None


def resolve_expert_size(explicit_mb: float | None, metadata: dict[str, Any]) -> ExpertSize:
    """``--expert-mb`` when given, else the trace's own expert size, else a Mixtral expert."""
    if explicit_mb is not None:
        return ExpertSize(explicit_mb * 1e6, "--expert-mb")
    recorded = expert_size_of_trace(metadata)
    if recorded is not None:
        return recorded
    return ExpertSize(
        float(MIXTRAL_EXPERT_BYTES),
        "a Mixtral-8x7B expert in bf16 (the trace records no expert size; set --expert-mb)",
    )
