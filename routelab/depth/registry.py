"""The depth methods by name: ``build_depth_stack(name, ...)`` and ``list_depth_methods()``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from routelab.core.errors import ConfigError, suggest
from routelab.depth.drllm import DrLLMStack
from routelab.depth.duo import DuoStack
from routelab.depth.gamma import GammaMoDStack
from routelab.depth.halting import HaltingStack
from routelab.depth.lff import LFFStack
from routelab.depth.mod import MoDStack
from routelab.depth.stack import DepthStack


@dataclass(frozen=True)
class DepthMethod:
    """A registered depth method.

    Attributes:
        name, paper, description: shown by ``routelab depth list``.
        stack: the ``DepthStack`` class.
        ffn: the FFN kind it needs (``dense``, ``moe`` or ``any``).
        generation: how it decodes with a KV cache, or why it cannot.
    """

    name: str
    paper: str
    description: str
    stack: type[DepthStack]
    ffn: str
    generation: str

    def options(self) -> list[str]:
        skip = {"self", "d_model", "n_layers", "d_ff", "activation"}
        return [p for p in inspect.signature(self.stack.__init__).parameters if p not in skip]


DEPTH_METHODS: dict[str, DepthMethod] = {
    m.name: m for m in (
        DepthMethod("mod", "Raposo et al. 2024, Mixture-of-Depths (arXiv 2404.02258)",
                    "top-C tokens per sequence run a routed block, the rest ride the residual", MoDStack, "any",
                    "KV cache with causal-aux / causal-mlp (a skipped token writes no K/V in that block); "
                    "top-C routing is training-time only"),
        DepthMethod("gamma-mod", "Luo et al. 2024, gamma-MoD (arXiv 2410.13859, Yaxin9Luo/Gamma-MOD)",
                    "ARank-selected MoD layers, 2-way router, masked routing learning", GammaMoDStack, "any",
                    "KV cache with the threshold rule (prefill p > 0.005, decode p >= 0.5); top-k is training-time only"),
        DepthMethod("duo", "Alizadeh et al. 2024, Duo-LLM (arXiv 2410.10846)",
                    "small / big / skip FFN per token and layer; random-routing training, oracle paths",
                    DuoStack, "dense", "KV cache in every mode except 'given' (attention always runs)"),
        DepthMethod("drllm", "Heakl et al. 2025, Dr.LLM: Dynamic Layer Routing in LLMs (parameterlab/dr-llm)",
                    "skip / execute / repeat each layer per sequence, windowed-pooling routers, MCTS targets",
                    DrLLMStack, "any", "KV cache: decisions taken once at prefill and reused (a repeated layer keeps "
                    "a second cache)"),
        DepthMethod("lff", "Informed Routing with lightweight feature forecasters (arXiv 2510.13831)",
                    "execute the FFN or take a low-rank forecast of its output", LFFStack, "dense",
                    "KV cache with the threshold rule (attention always runs); top-k is training-time only"),
        DepthMethod("halting", "Equifinality in MoE routing, relative-norm halting (arXiv 2604.14419)",
                    "re-apply every MoE FFN for several hops; halt a token when its update is small",
                    HaltingStack, "moe", "KV cache (per-token halting inside the FFN; attention untouched)"),
    )
}


def depth_method(name: str) -> DepthMethod:
    if name not in DEPTH_METHODS:
        raise ConfigError(f"unknown depth router {name!r}.{suggest(name, list(DEPTH_METHODS))} "
                          f"Known: {', '.join(DEPTH_METHODS)}.")
    return DEPTH_METHODS[name]


def list_depth_methods() -> list[DepthMethod]:
    return list(DEPTH_METHODS.values())


def build_depth_stack(name: str, *, d_model: int, n_layers: int, d_ff: int, ffn: str, activation: str,
                      options: dict[str, Any] | None = None) -> DepthStack:
    """Build the depth stack ``name`` for a model of this shape; unknown options are refused."""
    method = depth_method(name)
    options = dict(options or {})
    if method.ffn != "any" and ffn != method.ffn:
        raise ConfigError(f"depth router {name!r} needs ffn={method.ffn!r} (got ffn={ffn!r}).")
    valid = method.options()
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"depth router {name!r} has no option(s) {unknown}.{suggest(unknown[0], valid)} "
                          f"Valid: {', '.join(valid)}.")
    shape: dict[str, Any] = {"d_model": d_model, "n_layers": n_layers, "activation": activation}
    if "d_ff" in inspect.signature(method.stack.__init__).parameters:
        shape["d_ff"] = d_ff
    try:
        return method.stack(**shape, **options)
    except TypeError as error:
        raise ConfigError(f"depth router {name!r}: bad option value ({error}).") from None
