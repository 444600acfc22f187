"""Few-shot fine-tuning modes of Polytropon/MHR (``microsoft/mttl``'s ``pl_finetune``).

- ``poly``: the new task's logits and the skills are trained.
- ``z`` (MHR-z): only the routing logits are trained; the skills stay fixed.
- ``mu`` (MHR-mu): every layer's skills are averaged into one adapter
  (``A = mean_s A_s``, ``B = mean_s B_s``; for ``h`` heads the uniform weight-space mixture),
  the router becomes the fixed average, and that adapter is fine-tuned.
"""

from __future__ import annotations

import torch

from routelab.adapters.attach import AdapterSet
from routelab.adapters.bank import LoRABank
from routelab.adapters.poly import PolyRouter
from routelab.core import ConfigError
from routelab.core.validation import check_choice

MODES = ("poly", "z", "mu")


def prepare_finetune(adapters: AdapterSet, mode: str) -> list[torch.nn.Parameter]:
    """Set ``adapters`` up for fine-tuning mode ``mode``; return the parameters to train."""
    check_choice("mode", mode, MODES)
    if not all(isinstance(router, PolyRouter) for router in adapters.routers()):
        raise ConfigError(f"fine-tuning modes {MODES} apply to poly/mhr adapters, not method={adapters.method!r}.")
    if mode == "mu":
        for layer in adapters.layers.values():
            old, router = layer.bank, layer.router
            bank = LoRABank(1, old.d_in, old.d_out, old.rank, scaling=float(old.scaling[0])).to(old.lora_A.device)
            with torch.no_grad():
                bank.lora_A.copy_(old.lora_A.mean(dim=0, keepdim=True))
                bank.lora_B.copy_(old.lora_B.mean(dim=0, keepdim=True))
            layer.bank = bank
            layer.router = PolyRouter(router.num_tasks, 1, router.num_heads, uniform=True).to(old.lora_A.device)
            layer.router.logits.requires_grad_(False)
        adapters.num_experts = 1
    adapters.freeze_experts(mode == "z")
    adapters.freeze_routers(mode == "mu")
    return adapters.trainable_parameters()
