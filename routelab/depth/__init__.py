"""Level 3 of routing: per-token (or per-sequence) depth decisions in a block stack.

Methods (``list_depth_methods()``): Mixture-of-Depths, gamma-MoD, Duo-LLM, Dr.LLM,
informed routing with LFF forecasters, and multi-hop relative-norm halting. Each is a
``DepthStack`` that runs a TinyLM's blocks (``TinyLMConfig(depth_router=..., depth_options=...)``)
and reports a ``DepthResult``: per-layer decisions, the ``Routing`` of its routers, losses
and the FLOPs actually executed.
"""

from routelab.depth.drllm import DRLLM_OPTIONS, NEUTRAL_PENALTY, continuous_router_decision, mcts_paths
from routelab.depth.duo import DUO_OPTIONS
from routelab.depth.flops import FlopCounter
from routelab.depth.gamma import arank_per_layer, attention_rank, gamma_top_k, select_layers_by_arank
from routelab.depth.oracle import OracleResult, beam_search, enumerate_paths, exhaustive_search, oracle_search, token_difficulty
from routelab.depth.registry import DEPTH_METHODS, build_depth_stack, depth_method, list_depth_methods
from routelab.depth.result import DepthResult, LayerDecision
from routelab.depth.stack import DepthStack

__all__ = [
    "DEPTH_METHODS",
    "DRLLM_OPTIONS",
    "DUO_OPTIONS",
    "NEUTRAL_PENALTY",
    "DepthResult",
    "DepthStack",
    "FlopCounter",
    "LayerDecision",
    "OracleResult",
    "arank_per_layer",
    "attention_rank",
    "beam_search",
    "build_depth_stack",
    "continuous_router_decision",
    "depth_method",
    "enumerate_paths",
    "exhaustive_search",
    "gamma_top_k",
    "list_depth_methods",
    "mcts_paths",
    "oracle_search",
    "select_layers_by_arank",
    "token_difficulty",
]
