"""The adapter-routing methods by name: how to build one layer's router and the expert scaling.

``attach_adapters(model, targets, method=NAME, ...)`` looks the method up here;
``list_methods()`` names them with their papers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from routelab.adapters.glider import GliderRouter
from routelab.adapters.lora_mixer import LoRAMixerRouter
from routelab.adapters.poly import PolyRouter
from routelab.adapters.remix import ReMixRouter
from routelab.adapters.routing import AdapterRouter
from routelab.adapters.token_routing import PresetRouter, TaskExpertRouter, UniformRouter
from routelab.core import ConfigError
from routelab.core.registry import Registry


@dataclass(frozen=True)
class LayerShape:
    """What a router builder knows about its layer and the adapter set."""

    d_in: int
    d_out: int
    num_experts: int
    rank: int
    num_tasks: int | None


@dataclass(frozen=True)
class AdapterMethod:
    """A named method: ``build(shape, **options) -> AdapterRouter``; ``alpha(rank)`` its default
    ``lora_alpha`` (the scaling is ``lora_alpha / rank``)."""

    name: str
    paper: str
    description: str
    build: Callable[..., AdapterRouter]
    alpha: Callable[[int], float]
    needs_tasks: bool = False


METHODS: Registry[AdapterMethod] = Registry("adapter method", "method")


def need_tasks(shape: LayerShape, method: str) -> int:
    if not shape.num_tasks:
        raise ConfigError(f"method={method!r} routes by task: pass num_tasks=N to attach_adapters.")
    return shape.num_tasks


def _topk(shape: LayerShape, *, router: str = "mixtral", top_k: int | None = None, **options: Any) -> AdapterRouter:
    from routelab import create_router, preset_info

    info = preset_info(router)
    if info.needs_token_ids or info.needs_attention:
        raise ConfigError(f"router={router!r} reads token ids or attention weights, which a routed linear layer does not "
                          "see; choose a router that scores hidden states (e.g. mixtral, dynmole, expert-choice).")
    return PresetRouter(create_router(router, d_model=shape.d_in, num_experts=shape.num_experts, top_k=top_k, **options))


def _dynmole(shape: LayerShape, *, top_k: int = 2, **options: Any) -> AdapterRouter:
    return _topk(shape, router="dynmole", top_k=top_k, **options)


def _poly(shape: LayerShape, *, num_heads: int = 1, **options: Any) -> AdapterRouter:
    tasks = need_tasks(shape, "poly" if num_heads == 1 else "mhr")
    if shape.d_in % num_heads or shape.d_out % num_heads:
        raise ConfigError(f"num_heads={num_heads} must divide d_in={shape.d_in} and d_out={shape.d_out} of every target.")
    return PolyRouter(tasks, shape.num_experts, num_heads, **options)


def _mhr(shape: LayerShape, *, num_heads: int = 8, **options: Any) -> AdapterRouter:
    return _poly(shape, num_heads=num_heads, **options)


def _glider(shape: LayerShape, **options: Any) -> AdapterRouter:
    return GliderRouter(shape.num_experts, shape.d_in, need_tasks(shape, "glider"), **options)


def _phatgoose(shape: LayerShape, *, top_k: int = 2) -> AdapterRouter:
    return GliderRouter(shape.num_experts, shape.d_in, shape.num_tasks or 1, top_k=top_k, global_scale=0.0)


def _task(shape: LayerShape, *, expert_of_task: list[int] | None = None) -> AdapterRouter:
    tasks = need_tasks(shape, "task")
    return TaskExpertRouter(shape.num_experts, expert_of_task if expert_of_task is not None else list(range(tasks)))


def register(name: str, paper: str, description: str, build: Callable[..., AdapterRouter],
             alpha: Callable[[int], float], needs_tasks: bool = False) -> None:
    METHODS.add(name, AdapterMethod(name, paper, description, build, alpha, needs_tasks))


ONE = lambda rank: 1.0  # noqa: E731  (scaling 1/r: Polytropon, MHR, PHATGOOSE, GLIDER)
RANK = lambda rank: float(rank)  # noqa: E731  (scaling 1)

register("topk", "any token router of routelab.create_router (router=NAME, default mixtral)",
         "token-level top-k over the LoRA experts with a zoo router", _topk, RANK)
register("dynmole", "Li et al. 2025, DynMoLE (arXiv 2504.00661)",
         "hybrid Tsallis-entropy routing (the dynmole router preset); lora_alpha = 2r as its template", _dynmole,
         lambda rank: 2.0 * rank)
register("poly", "Ponti et al. 2022, Polytropon (arXiv 2202.13914)",
         "per-task skill weights (relaxed Bernoulli), mixed in weight space, scaling 1/r", _poly, ONE, True)
register("mhr", "Caccia et al. 2023, Multi-Head Adapter Routing (arXiv 2211.03831)",
         "Polytropon with num_heads (default 8) blocks of the input/output dims routed separately", _mhr, ONE, True)
register("glider", "Li et al. 2024, GLIDER (arXiv 2410.07172)",
         "PHATGOOSE local gates + s * task-embedding similarity, top-2", _glider, ONE, True)
register("phatgoose", "Muqeeth et al. 2024, PHATGOOSE (arXiv 2402.05859)",
         "per-expert sigmoid-trained gate vectors as a top-2 token router (GLIDER with s = 0)", _phatgoose, ONE)
register("remix", "ReMix (arXiv 2603.10160)",
         "Gumbel-top-k sampled subsets with constant 1/k weights; RLOO router gradient", 
         lambda shape, **o: ReMixRouter(shape.num_experts, shape.d_in, **o), RANK)
register("lora-mixer", "LoRA-Mixer (arXiv 2507.00029)",
         "hard top-k forward, soft straight-through gradients to all experts; RSL loss",
         lambda shape, **o: LoRAMixerRouter(shape.num_experts, shape.d_in, **o), RANK)
register("uniform", "uniform merge of the experts (average of their updates)",
         "every token to every expert with weight 1/E", lambda shape: UniformRouter(shape.num_experts), RANK)
register("task", "one LoRA per task (the oracle choice when the task is known)",
         "task t -> expert expert_of_task[t] (default t)", _task, RANK, True)


def method_info(name: str) -> AdapterMethod:
    return METHODS.get(name)


def list_methods() -> list[AdapterMethod]:
    return list(METHODS)
