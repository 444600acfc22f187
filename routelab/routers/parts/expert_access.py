"""Giving router parts read access to the experts they route to.

A few routing methods score or regularise with the experts' own weights: the
expert-router coupling loss (ERC, arXiv 2512.23447) feeds router rows through every
expert's gate projection, and MoE-X's sparsity-aware router (arXiv 2503.07639) estimates
each expert's activation sparsity from its encoder weights. Routers cannot import the
MoE layer (imports point down: core -> routers -> moe), so access goes through a small
protocol instead:

* a part that needs the experts subclasses ``UsesExperts``;
* whoever owns the experts (``routelab.MoE`` does it in its constructor; a custom layer
  calls it itself) calls ``attach_experts(router, experts)``;
* ``experts`` is any object with ``num_experts`` and ``gate_projection()`` returning the
  ``[E, D, H]`` first projection of every expert (the gate half of a SwiGLU, the whole
  input projection of a GELU/ReLU MLP). ``routelab.moe.BatchedExperts`` and
  ``routelab.moe.ExpertPool`` implement it.

The reference is a plain attribute, not a registered submodule: the layer owns the
expert weights, so they appear once in ``state_dict`` and ``parameters()``, and moving
the layer (``.to``) moves what the part sees.
"""

from __future__ import annotations

import torch
from torch import nn

from routelab.core.errors import ConfigError

_REF = "_attached_experts"


class UsesExperts:
    """Mixin for router parts (``nn.Module``) that read the experts' weights."""

    uses_experts = True

    def attach_experts(self, experts: object) -> None:
        if not callable(getattr(experts, "gate_projection", None)) or not hasattr(experts, "num_experts"):
            raise ConfigError(
                f"{type(self).__name__} needs experts with num_experts and gate_projection() -> [E, D, H]; "
                f"got {type(experts).__name__}. Use routelab.moe.BatchedExperts or implement that method."
            )
        object.__setattr__(self, _REF, experts)  # a reference, not a submodule (the layer owns the weights)

    @property
    def attached_experts(self) -> object:
        experts = self.__dict__.get(_REF)
        if experts is None:
            raise ConfigError(
                f"{type(self).__name__} reads the experts' weights but none are attached. Use the router inside "
                "routelab.MoE (which attaches its experts), or call "
                "routelab.routers.parts.expert_access.attach_experts(router, experts) first."
            )
        return experts

    def expert_gate_projection(self, num_experts: int) -> torch.Tensor:
        """The attached experts' ``[E, D, H]`` first projections, in fp32."""
        experts = self.attached_experts
        weight = experts.gate_projection()  # type: ignore[attr-defined]
        if weight.dim() != 3 or weight.shape[0] != num_experts:
            raise ConfigError(
                f"the attached experts' gate_projection() has shape {tuple(weight.shape)}; expected "
                f"[{num_experts}, d_model, hidden] for a router over {num_experts} experts."
            )
        return weight.float()


def attach_experts(router: nn.Module, experts: object) -> int:
    """Give every part of ``router`` that uses experts a reference to ``experts``.

    Returns the number of parts that received it (0 for routers that do not need them).
    """
    count = 0
    for module in router.modules():
        if isinstance(module, UsesExperts):
            module.attach_experts(experts)
            count += 1
    return count
