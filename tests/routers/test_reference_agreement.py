"""Presets agree with the reference implementations they are named after.

Each case is computed by hand from the reference's own formula: GShard Algorithm 1 and
fairseq ``top2gating`` (Lepikhin et al. 2020, arXiv 2006.16668), Megatron-Core
``topk_softmax_with_capacity`` / ``TopKRouter`` and the DeepSeek-V3 report (arXiv 2412.19437).
"""

from __future__ import annotations

import math

import pytest
import torch

import routelab
from routelab.core.context import TokenBatch


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def identity_router(name: str, num_experts: int = 4, top_k: int = 2, **options) -> routelab.routers.Router:
    router = routelab.create_router(name, d_model=num_experts, num_experts=num_experts, top_k=top_k, **options)
    with torch.no_grad():
        router.scorer.weight.copy_(torch.eye(num_experts))
    return router


# The batch of the GShard case: one slot per expert (C = ceil(2 * 2 / 4) = 1).
GSHARD_ROWS = [[3.0, 2.0, 0.0, 0.0], [0.0, 3.0, 2.0, 0.0]]


def gshard_algorithm_1(rows: list[list[float]], capacity: int) -> tuple[list[list[int]], list[list[float]]]:
    """GShard Algorithm 1 without the random second-expert dispatch: one pass over the
    tokens for their first choices, then one for the second; every choice takes a place
    in its expert's counter whether or not it fits, gates renormalised over the two."""
    num_experts = len(rows[0])
    picks = []
    for row in rows:
        probs = softmax(row)
        e1, e2 = sorted(range(num_experts), key=lambda e: -probs[e])[:2]
        picks.append(((e1, probs[e1] / (probs[e1] + probs[e2])), (e2, probs[e2] / (probs[e1] + probs[e2]))))
    used = [0] * num_experts
    idx = [[-1, -1] for _ in rows]
    gate = [[0.0, 0.0] for _ in rows]
    for slot in (0, 1):
        for t, pick in enumerate(picks):
            expert, g = pick[slot]
            if used[expert] < capacity:
                idx[t][slot], gate[t][slot] = expert, g
            used[expert] += 1
    return idx, gate


def test_gshard_fills_capacity_with_every_first_choice_before_any_second_choice():
    out = identity_router("gshard")(torch.tensor(GSHARD_ROWS))
    assert out.capacity == 1
    # token 1 keeps its top expert 1, which token 0 wanted only as its second choice
    assert out.topk_idx.tolist() == [[0, -1], [1, 2]]
    p0, p1 = softmax(GSHARD_ROWS[0]), softmax(GSHARD_ROWS[1])
    expected = [[p0[0] / (p0[0] + p0[1]), 0.0], [p1[1] / (p1[1] + p1[2]), p1[2] / (p1[1] + p1[2])]]
    torch.testing.assert_close(out.topk_weight, torch.tensor(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("seed", range(6))
def test_gshard_drops_equal_algorithm_1_on_random_batches(seed):
    g = torch.Generator().manual_seed(seed)
    rows = (torch.randn(24, 6, generator=g) * 2).tolist()
    router = identity_router("gshard", num_experts=6)
    out = router(torch.tensor(rows))
    idx, gate = gshard_algorithm_1(rows, out.capacity)
    assert out.topk_idx.tolist() == idx
    torch.testing.assert_close(out.topk_weight, torch.tensor(gate), atol=1e-6, rtol=0)


def test_megatron_position_policy_stays_available_and_ranks_by_token_only():
    out = identity_router("gshard", drop_policy="position")(torch.tensor(GSHARD_ROWS))
    assert out.topk_idx.tolist() == [[0, 1], [-1, 2]]


def test_gshard_balance_loss_counts_first_choices_only():
    out = identity_router("gshard")(torch.tensor(GSHARD_ROWS))
    probs = [softmax(row) for row in GSHARD_ROWS]
    me = [sum(p[e] for p in probs) / 2 for e in range(4)]  # fairseq: mean gate per expert
    ce = [0.5, 0.5, 0.0, 0.0]  # fraction of tokens whose first choice is e (experts 0 and 1)
    expected = sum(m * c for m, c in zip(me, ce)) / 4 * 4 * 4  # mean(me * ce) * E * E
    assert out.losses["aux"].item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.6475, abs=1e-4)  # counting both slots would give 1.432


@pytest.mark.parametrize("preset, options", [("topk", {"normalization": "sigmoid_norm"}), ("deepseek-v3", {})])
def test_sigmoid_gates_at_top1_stay_sigmoid_times_scale_and_get_gradient(preset, options):
    router = identity_router(preset, top_k=1, scaling_factor=2.5, **options)
    x = torch.tensor([[0.3, -1.0, 0.1, 0.2], [-0.5, 0.0, 1.5, 0.4]])
    out = router(x)
    assert out.topk_idx.tolist() == [[0], [2]]
    torch.testing.assert_close(out.topk_weight, torch.tensor([[2.5 * sigmoid(0.3)], [2.5 * sigmoid(1.5)]]))
    out.topk_weight.sum().backward()
    assert router.scorer.weight.grad.abs().sum() > 0


def deepseek_seq_loss(z_rows: list[list[float]], seq_ids: list[int], top_k: int) -> float:
    """DeepSeek-V3 eq. 17-20: per sequence, f_i = E/(K T) * #{t: s_i,t in TopK(s_t, K)} on the
    unbiased sigmoid scores, P_i = mean_t s_i,t / sum_j s_j,t, loss = sum_i f_i P_i; averaged
    over sequences (Megatron-Core sequence_load_balancing_loss_func)."""
    num_experts = len(z_rows[0])
    losses = []
    for seq in sorted(set(seq_ids)):
        rows = [[sigmoid(v) for v in z] for z, s in zip(z_rows, seq_ids) if s == seq]
        count = [0] * num_experts
        for s in rows:
            for e in sorted(range(num_experts), key=lambda e: -s[e])[:top_k]:
                count[e] += 1
        f = [num_experts / (top_k * len(rows)) * c for c in count]
        p = [sum(s[e] / sum(s) for s in rows) / len(rows) for e in range(num_experts)]
        losses.append(sum(fi * pi for fi, pi in zip(f, p)))
    return sum(losses) / len(losses)


def test_deepseek_v3_sequence_loss_counts_the_plain_topk_of_unbiased_scores():
    router = identity_router("deepseek-v3", top_k=2, seq_aux_loss_coef=1.0, bias_update_rate=0.0)
    with torch.no_grad():
        router.balancer.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # the selection always takes expert 3
    z = [[2.0, 1.0, -1.0, -2.0], [0.5, 1.5, 1.0, -3.0], [-1.0, 0.2, 2.0, -2.5]]
    batch = TokenBatch.from_mask(2, 2, torch.tensor([[True, True], [True, False]]))
    out = router(torch.tensor(z), batch)
    assert (out.topk_idx == 3).any(dim=1).all()  # biased selection
    assert out.losses["seq_aux"].item() == pytest.approx(deepseek_seq_loss(z, [0, 0, 1], 2), rel=1e-6)


def test_deepseek_v3_sequence_loss_ignores_the_group_limit():
    router = identity_router("deepseek-v3", num_experts=8, top_k=2, num_groups=4, group_topk=1,
                             seq_aux_loss_coef=1.0, bias_update_rate=0.0)
    # experts 0 and 2 are the top-2 but sit in different groups: the group-limited selection cannot take both
    z = [[3.0, -3.0, 2.9, -3.0, -1.0, -1.0, -1.0, -1.0]]
    out = router(torch.tensor(z))
    assert sorted(out.topk_idx[0].tolist()) == [0, 1]
    assert out.losses["seq_aux"].item() == pytest.approx(deepseek_seq_loss(z, [0], 2), rel=1e-6)


def test_loss_free_aux_loss_counts_unbiased_topk_like_megatron():
    router = identity_router("loss-free", aux_loss_coef=1.0, bias_update_rate=0.0)
    with torch.no_grad():
        router.balancer.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    out = router(torch.tensor(GSHARD_ROWS))
    probs = [softmax(row) for row in GSHARD_ROWS]
    f = [0.25, 0.5, 0.25, 0.0]  # plain top-2 of the probabilities: {0, 1} and {1, 2}
    p = [sum(row[e] for row in probs) / 2 for e in range(4)]
    assert out.losses["aux"].item() == pytest.approx(4 * sum(a * b for a, b in zip(f, p)), rel=1e-6)


@pytest.mark.parametrize("bias_counts, expected_load", [("after_drops", [1, 1, 1, 0]), ("before_drops", [1, 2, 1, 0])])
def test_loss_free_bias_counts_loads_after_drops_like_megatron_or_before_as_an_option(bias_counts, expected_load):
    router = identity_router(
        "loss-free", capacity_factor=1.0, drop_policy="position", bias_update_rate=0.1, bias_counts=bias_counts
    ).train()
    out = router(torch.tensor(GSHARD_ROWS))
    assert out.topk_idx.tolist() == [[0, 1], [-1, 2]]  # expert 1 is asked for twice, keeps one
    assert router.balancer.pending_counts.tolist() == expected_load
    routelab.end_of_step(router)
    mean = sum(expected_load) / 4
    expected_bias = [0.1 * math.copysign(1.0, mean - c) if c != mean else 0.0 for c in expected_load]
    assert router.balancer.bias.tolist() == pytest.approx(expected_bias)
