"""Oracles of the depth methods: hand-computed cases from their papers and code."""

from __future__ import annotations

import pytest
import torch

from routelab.core.errors import ConfigError
from routelab.depth import (
    NEUTRAL_PENALTY,
    attention_rank,
    beam_search,
    continuous_router_decision,
    enumerate_paths,
    exhaustive_search,
    gamma_top_k,
    mcts_paths,
    oracle_search,
    select_layers_by_arank,
    token_difficulty,
)
from routelab.depth.drllm import path_actions, window_means


def table_loss_fn(table: dict[tuple[int, ...], list[float]]):
    """``paths -> losses [P, T]`` read from a toy table of per-token losses."""
    def loss_fn(paths_PL: torch.Tensor) -> torch.Tensor:
        return torch.tensor([table[tuple(p.tolist())] for p in paths_PL])
    return loss_fn


# --- Duo-LLM oracle ---------------------------------------------------------------------

TOY_TABLE = {  # 2 layers, 3 tokens; options 0 skip, 1 small, 2 big
    (a, b): [1.0 + float((a * 3 + b) % 5) + 0.1 * t for t in range(3)] for a in range(3) for b in range(3)
}
TOY_TABLE[(2, 1)] = [0.05, 9.0, 9.0]
TOY_TABLE[(0, 2)] = [9.0, 0.02, 9.0]
TOY_TABLE[(1, 1)] = [9.0, 9.0, 0.03]


def test_duo_budget_zero_is_all_small() -> None:
    result = exhaustive_search(table_loss_fn(TOY_TABLE), 2, budget=0, allow_skip=False)
    assert result.path_TL.tolist() == [[1, 1]] * 3
    assert result.evaluated == 1


def test_duo_exhaustive_search_is_the_argmin_of_the_table() -> None:
    result = exhaustive_search(table_loss_fn(TOY_TABLE), 2, allow_skip=True)
    assert result.path_TL.tolist() == [[2, 1], [0, 2], [1, 1]]
    assert result.loss_T.tolist() == pytest.approx([0.05, 0.02, 0.03])
    assert result.evaluated == 9
    brute = torch.tensor(list(TOY_TABLE.values())).min(dim=0).values
    assert torch.allclose(result.loss_T, brute)


def test_duo_budget_limits_big_layers_and_ties_go_to_the_cheaper_path() -> None:
    paths = enumerate_paths(3, budget=1, allow_skip=True)
    assert int((paths == 2).sum(dim=1).max()) == 1
    assert len(paths) == 2 ** 3 + 3 * 2 ** 2  # no big layer, or exactly one
    flat = {k: [1.0] for k in TOY_TABLE}  # every path ties: the cheapest (all skip) wins
    assert exhaustive_search(table_loss_fn(flat), 2, allow_skip=True).path_TL.tolist() == [[0, 0]]


def test_beam_search_matches_exhaustive_with_a_wide_beam_and_difficulty() -> None:
    torch.manual_seed(1)
    table = {tuple(p.tolist()): torch.rand(5).tolist() for p in enumerate_paths(4, allow_skip=True)}
    fn = table_loss_fn(table)
    exact = exhaustive_search(fn, 4, allow_skip=True)
    wide = beam_search(fn, 4, beam=81, allow_skip=True)
    assert torch.allclose(wide.loss_T, exact.loss_T)
    narrow = oracle_search(fn, 4, allow_skip=True, exhaustive_max_layers=2, beam=1)
    assert bool((narrow.loss_T >= exact.loss_T - 1e-12).all())
    small = torch.tensor(table[(1, 1, 1, 1)])
    assert bool((token_difficulty(small, exact.loss_T) >= 0).all())


# --- gamma-MoD ---------------------------------------------------------------------------

def test_arank_of_identity_and_triangular_maps() -> None:
    assert attention_rank(torch.eye(4)) == 0.0
    assert attention_rank(torch.ones(4, 4).tril()) == 3.0
    maps = torch.stack([torch.eye(4), torch.ones(4, 4).tril()]).unsqueeze(0)  # two heads: mean 1.5
    assert attention_rank(maps) == 1.5


def test_gamma_top_k_count_example() -> None:
    assert gamma_top_k(1159, 1059) == 630
    assert gamma_top_k(100, 0) == 100
    assert gamma_top_k(100, 100) == 50
    assert select_layers_by_arank([3.0, 1.0, 2.0, 1.0], 2) == [1, 3]


# --- Dr.LLM ------------------------------------------------------------------------------

@pytest.mark.parametrize(("penalty", "expected"), [(-1.0, 0), (-0.5, 0), (0.0, 1), (0.5, 1), (1.0, 2)])
def test_drllm_decision_mixing_table(penalty: float, expected: int) -> None:
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    assert int(continuous_router_decision(probs, penalty)) == expected


def test_drllm_neutral_penalty_is_the_router_argmax() -> None:
    probs = torch.softmax(torch.randn(50, 3), dim=-1)
    assert NEUTRAL_PENALTY == -0.5
    assert torch.equal(continuous_router_decision(probs, NEUTRAL_PENALTY), probs.argmax(dim=-1))
    assert bool((continuous_router_decision(probs, 0.5) == 1).all())  # the code default always executes
    with pytest.raises(ConfigError, match="penalty"):
        continuous_router_decision(probs, 1.5)


def test_drllm_window_pooling_drops_the_remainder() -> None:
    h = torch.arange(10, dtype=torch.float32).view(1, 10, 1)
    means, valid = window_means(h, torch.tensor([10]), 3)  # windows of 3: [0,1,2] [3,4,5] [6,7,8]; 9 dropped
    assert means[0, :, 0].tolist() == [1.0, 4.0, 7.0]
    means, valid = window_means(h, torch.tensor([2]), 8)  # min(8, len) windows
    assert valid[0].tolist() == [True, True] + [False] * 6


def test_drllm_mcts_actions_and_search() -> None:
    assert set(path_actions((1, 1, 1))) == {(0, 1, 1), (2, 1, 1), (0, 0, 1), (1, 0, 1), (1, 2, 1), (1, 0, 0),
                                            (1, 1, 0), (1, 1, 2)}
    # the loss falls when layer 1 is repeated: MCTS finds a path that beats the default and stops
    best, loss, evaluations = mcts_paths(lambda c: 1.0 - 0.1 * (c[1] == 2) + 0.01 * abs(c[0] - 1), 3, simulations=200)
    assert best[1] == 2 and loss < 1.0
    assert evaluations < 200
