"""Adapter routing (level 2): LoRA experts on any ``nn.Linear``, routed per token or per task.

``attach_adapters(model, target_modules, num_experts=E, method=NAME)`` replaces the chosen
linear layers by routed LoRA layers (the rest of the model is frozen) and returns an
``AdapterSet``; every router returns a ``routelab.Routing`` (``AdapterRouting``), so the
routing statistics and traces of level 1 apply unchanged. Methods: ``list_methods()``.
"""

from routelab.adapters.attach import AdapterSet, attach_adapters
from routelab.adapters.bank import LoRABank
from routelab.adapters.dispatch import dense_delta, mixed_delta, routed_delta
from routelab.adapters.finetune import prepare_finetune
from routelab.adapters.glider import GliderRouter
from routelab.adapters.layer import AdapterState, RoutedLoRALinear
from routelab.adapters.lora_mixer import LoRAMixerRouter
from routelab.adapters.methods import list_methods, method_info
from routelab.adapters.poly import PolyRouter
from routelab.adapters.remix import ReMixRouter, rloo_advantages, rloo_surrogate, subset_log_prob
from routelab.adapters.routing import AdapterRouter, AdapterRouting, effective_support_size
from routelab.adapters.targets import find_targets
from routelab.adapters.token_routing import PresetRouter, TaskExpertRouter, UniformRouter

__all__ = [
    "AdapterRouter",
    "AdapterRouting",
    "AdapterSet",
    "AdapterState",
    "GliderRouter",
    "LoRABank",
    "LoRAMixerRouter",
    "PolyRouter",
    "PresetRouter",
    "ReMixRouter",
    "RoutedLoRALinear",
    "TaskExpertRouter",
    "UniformRouter",
    "attach_adapters",
    "dense_delta",
    "effective_support_size",
    "find_targets",
    "list_methods",
    "method_info",
    "mixed_delta",
    "prepare_finetune",
    "rloo_advantages",
    "rloo_surrogate",
    "routed_delta",
    "subset_log_prob",
]
