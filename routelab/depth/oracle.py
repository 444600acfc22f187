"""Oracle path search of Duo-LLM (arXiv 2410.10846) and token difficulty.

A path gives each of the ``L`` layers one option (0 skip, 1 small, 2 big). For a token
and a budget ``b`` of big layers, the oracle is the path of least loss among the paths
with at most ``b`` big layers (and, unless ``allow_skip``, no skipped layer, so that
budget 0 is exactly the all-small path). ``loss_fn(paths_PL) -> losses_PT`` evaluates
candidate paths for all tokens at once; in the lab a path is applied to every token of
the batch and each token's loss is read off (a reconstruction: the paper searches per
token; the per-token interaction through attention is ignored here).

Search is exhaustive over the ``<= 3^L`` paths for small ``L`` and a per-token beam
search otherwise: layer by layer each token keeps its ``beam`` best prefixes (the
remaining layers filled with ``filler``), and the union of kept prefixes is extended.
Ties go to the cheaper path (paths are enumerated cheapest first).
Token difficulty = loss(all-small) - loss(best path): the benefit compute can buy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from routelab.core.errors import ConfigError

LossFn = Callable[[torch.Tensor], torch.Tensor]
SKIP, SMALL, BIG = 0, 1, 2
OPTION_COST = (0.0, 0.25, 1.0)


@dataclass
class OracleResult:
    """Best path per token: ``path_TL`` (options), ``loss_T``, and how many paths were evaluated."""

    path_TL: torch.Tensor
    loss_T: torch.Tensor
    evaluated: int


def path_cost(path: tuple[int, ...]) -> float:
    return sum(OPTION_COST[o] for o in path)


def enumerate_paths(num_layers: int, budget: int | None = None, allow_skip: bool = False) -> torch.Tensor:
    """All paths ``[P, L]`` with at most ``budget`` big layers, cheapest first."""
    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}.")
    budget = num_layers if budget is None else int(budget)
    if budget < 0:
        raise ConfigError(f"budget must be >= 0 big layers, got {budget}.")
    options = (SKIP, SMALL, BIG) if allow_skip else (SMALL, BIG)
    paths = [p for p in itertools.product(options, repeat=num_layers) if sum(o == BIG for o in p) <= budget]
    paths.sort(key=lambda p: (path_cost(p), p))
    return torch.tensor(paths, dtype=torch.long)


def evaluate_paths(loss_fn: LossFn, paths_PL: torch.Tensor, chunk: int) -> torch.Tensor:
    return torch.cat([loss_fn(paths_PL[i:i + chunk]) for i in range(0, paths_PL.shape[0], chunk)])


def exhaustive_search(loss_fn: LossFn, num_layers: int, budget: int | None = None, *, allow_skip: bool = False,
                      chunk: int = 16) -> OracleResult:
    """Per-token argmin over every allowed path."""
    paths_PL = enumerate_paths(num_layers, budget, allow_skip)
    losses_PT = evaluate_paths(loss_fn, paths_PL, chunk)
    best_T = losses_PT.argmin(dim=0)  # first minimum = cheapest path among ties
    return OracleResult(paths_PL[best_T], losses_PT.gather(0, best_T.unsqueeze(0)).squeeze(0), paths_PL.shape[0])


def beam_search(loss_fn: LossFn, num_layers: int, budget: int | None = None, *, beam: int = 4, filler: int = SMALL,
                allow_skip: bool = False, chunk: int = 16) -> OracleResult:
    """Per-token beam search over layer choices (see the module docstring)."""
    budget = num_layers if budget is None else int(budget)
    if beam < 1:
        raise ConfigError(f"beam must be >= 1, got {beam}.")
    options = (SKIP, SMALL, BIG) if allow_skip else (SMALL, BIG)
    prefixes: list[tuple[int, ...]] = [()]
    evaluated = 0
    for layer in range(num_layers):
        candidates = sorted({p + (o,) for p in prefixes for o in options if sum(x == BIG for x in p + (o,)) <= budget},
                            key=lambda p: (path_cost(p), p))
        full_PL = torch.tensor([c + (filler,) * (num_layers - layer - 1) for c in candidates], dtype=torch.long)
        losses_PT = evaluate_paths(loss_fn, full_PL, chunk)
        evaluated += len(candidates)
        if layer == num_layers - 1:
            best_T = losses_PT.argmin(dim=0)
            return OracleResult(full_PL[best_T], losses_PT.gather(0, best_T.unsqueeze(0)).squeeze(0), evaluated)
        keep = losses_PT.topk(min(beam, len(candidates)), dim=0, largest=False).indices.unique().tolist()
        prefixes = [candidates[i] for i in keep]
    raise AssertionError("unreachable")  # pragma: no cover


def oracle_search(loss_fn: LossFn, num_layers: int, budget: int | None = None, *, allow_skip: bool = False,
                  exhaustive_max_layers: int = 6, beam: int = 4, chunk: int = 16) -> OracleResult:
    """Exhaustive for ``num_layers <= exhaustive_max_layers``, beam search beyond."""
    if num_layers <= exhaustive_max_layers:
        return exhaustive_search(loss_fn, num_layers, budget, allow_skip=allow_skip, chunk=chunk)
    return beam_search(loss_fn, num_layers, budget, beam=beam, allow_skip=allow_skip, chunk=chunk)


def token_difficulty(all_small_loss_T: torch.Tensor, best_loss_T: torch.Tensor) -> torch.Tensor:
    """loss(all-small) - loss(best path) per token (>= 0 when the all-small path is searched)."""
    return all_small_loss_T - best_loss_T
