"""Replaying a recorded routing on real expert-parallel processes (``routelab.parallel.replay_timing``):
the logits reproduce the recording exactly, and LLEP moves work exactly in the layers whose
rank loads exceed its gate. Times are returned, never asserted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routelab.core.errors import InputError
from routelab.parallel.replay_timing import ReplayShape, llep_step_speedup, recorded_logits


def test_recorded_logits_reproduce_the_recorded_top_k_in_slot_order():
    rng = np.random.default_rng(0)
    topk_idx_TK = np.stack([rng.permutation(8)[:3] for _ in range(50)])
    topk_idx_TK[4, 2] = -1  # an empty slot stays empty
    logits_TE = recorded_logits(topk_idx_TK, 8)
    top = torch.topk(logits_TE, 2, dim=-1).indices.numpy()
    np.testing.assert_array_equal(top, topk_idx_TK[:, :2])
    assert logits_TE[4].gt(0).sum() == 2


def test_llep_moves_work_only_where_ranks_are_imbalanced():
    tokens, experts = 256, 4
    skewed_TK = np.tile([0, 1], (tokens, 1))  # every token on rank 0's experts: max/mean rank load 2
    balanced_TK = np.stack([np.arange(tokens) % experts, (np.arange(tokens) + 1) % experts], axis=1)
    result = llep_step_speedup(np.stack([skewed_TK, balanced_TK]), ReplayShape(16, 32, experts, 2), tokens=tokens,
                               rounds=1)
    assert result["llep_applied"] == [1.0, 0.0]
    assert result["tokens"] == tokens and result["world"] == 2
    assert all(t > 0 for t in result["standard_s"] + result["llep_s"]) and result["speedup"] > 0


def test_a_routing_that_is_not_layers_by_tokens_by_k_is_refused():
    with pytest.raises(InputError, match="topk_idx_LTK must be"):
        llep_step_speedup(np.zeros((4, 2), dtype=int), ReplayShape(16, 32, 4, 2))
