"""The hand-computed oracles of each adapter-routing method."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from routelab.adapters import (
    GliderRouter,
    PolyRouter,
    attach_adapters,
    effective_support_size,
    rloo_advantages,
    rloo_surrogate,
    subset_log_prob,
)
from routelab.adapters.layer import token_batch
from routelab.adapters.mos import attach_mos
from routelab.adapters.polar import PolarRouter, lru_paging_loads, run_polar
from routelab.core import ConfigError
from tests.adapters.reference import LinUCB, reference_lora, reference_mhr, reference_routed


def batch_of(num_tokens: int):
    return token_batch((num_tokens,), None, torch.device("cpu"))


# --- Polytropon / MHR -------------------------------------------------------------------------

def test_poly_init_weights_are_uniform_and_eval_weights_match_the_oracle() -> None:
    router = PolyRouter(num_tasks=2, num_skills=4).eval()
    w = router.mixture(torch.tensor([0, 1]))
    assert torch.allclose(w, torch.full_like(w, 0.25), atol=1e-3)
    with torch.no_grad():
        router.logits[0] = torch.tensor([2.0, 0.0, -2.0, 0.0])
    w = router.mixture(torch.tensor([0]))[0, 0]
    assert torch.allclose(w, torch.tensor([0.4404, 0.25, 0.0596, 0.25]), atol=1e-4)
    assert torch.allclose(router.mixture(torch.tensor([-1]))[0, 0], torch.full((4,), 0.25))  # unknown task


def test_poly_training_weights_are_relaxed_bernoulli_samples_normalised_per_head() -> None:
    router = PolyRouter(num_tasks=1, num_skills=4, num_heads=2).train()
    w = router.mixture(torch.tensor([0, 0, 0]))
    assert torch.allclose(w.sum(-1), torch.ones(3, 2), atol=1e-5)
    assert not torch.allclose(w[0], w[1])  # sampled


def one_hot_logits(router: PolyRouter, task: int, skill_per_head: list[int]) -> None:
    with torch.no_grad():
        z = torch.full((router.num_heads, router.num_skills), -60.0)
        for q, s in enumerate(skill_per_head):
            z[q, s] = 60.0
        router.logits[task] = z.reshape(-1)


@pytest.mark.parametrize("heads", [1, 4])
def test_mhr_with_one_hot_weights_is_plain_lora_with_1_over_r_scaling(heads: int) -> None:
    model = nn.Sequential(nn.Linear(8, 12, bias=False))
    adapters = attach_adapters(model, ["0"], num_experts=3, rank=4, method="mhr", num_tasks=2, num_heads=heads,
                               init_b_std=0.5)
    layer = adapters.layers["0"]
    assert torch.allclose(layer.bank.scaling, torch.full((3,), 1 / 4))
    one_hot_logits(layer.router, 1, [2] * heads)
    model.eval()
    x = torch.randn(2, 5, 8)
    with adapters.context(task_ids=torch.tensor([1, 1])):
        y = model(x)
    base = x @ layer.base.weight.T
    lora = (x @ layer.bank.lora_A[2]) @ layer.bank.lora_B[2] / 4
    assert torch.allclose(y, base + lora, atol=1e-5)


def test_mhr_heads_mix_their_own_blocks() -> None:
    model = nn.Sequential(nn.Linear(8, 12, bias=False))
    adapters = attach_adapters(model, ["0"], num_experts=3, rank=4, method="mhr", num_tasks=1, num_heads=2,
                               init_b_std=0.5)
    layer = adapters.layers["0"]
    with torch.no_grad():
        layer.router.logits.normal_()
    model.eval()
    x = torch.randn(1, 3, 8)
    with adapters.context(task_ids=[0]):
        y = model(x)
    w_GE = layer.router.mixture(torch.tensor([0]))[0]
    expected = torch.stack([x[0, t] @ layer.base.weight.T + reference_mhr(x[0, t], w_GE, layer.bank) for t in range(3)])
    assert torch.allclose(y[0], expected, atol=1e-5)


# --- GLIDER / PHATGOOSE --------------------------------------------------------------------------

def test_glider_worked_example() -> None:
    router = GliderRouter(num_experts=3, d_in=4, num_tasks=1, top_k=2, global_scale=3.0)
    router.set_task_similarity(torch.tensor([[0.2, 0.9, 0.1]]))
    router.local_logits = lambda x: torch.tensor([[0.1, 0.0, -0.1]])  # the oracle's local logits
    routing = router(torch.zeros(1, 4), batch_of(1), torch.tensor([0]))
    assert routing.topk_idx.tolist() == [[1, 0]]
    assert torch.allclose(routing.topk_weight, torch.tensor([[0.8808, 0.1192]]), atol=1e-4)


def test_glider_local_logits_are_gate_dot_layernorm_over_sqrt_d() -> None:
    router = GliderRouter(num_experts=2, d_in=4, num_tasks=1, global_scale=0.0)
    with torch.no_grad():
        router.gate.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    normed = (x - 2.5) / torch.sqrt(torch.tensor(1.25 + 1e-5))
    expected = torch.stack([normed[0, 0], normed[0, 1]]) * 0.5
    assert torch.allclose(router.local_logits(x)[0], expected, atol=1e-6)


def test_phatgoose_is_glider_with_zero_global_scale() -> None:
    torch.manual_seed(1)
    glider = GliderRouter(num_experts=4, d_in=6, num_tasks=2, top_k=2, global_scale=0.0)
    with torch.no_grad():
        glider.gate.normal_()
        glider.task_similarity.normal_()
    x = torch.randn(5, 6)
    a = glider(x, batch_of(5), torch.tensor([0, 1, 0, 1, 0]))
    b = glider(x, batch_of(5), None)
    assert torch.equal(a.topk_idx, b.topk_idx) and torch.equal(a.topk_weight, b.topk_weight)


def test_phatgoose_gate_training_routes_to_one_expert_with_a_sigmoid_gate() -> None:
    glider = GliderRouter(num_experts=3, d_in=4, num_tasks=1)
    glider.gate_training(2)
    x = torch.randn(6, 4)
    routing = glider(x, batch_of(6), None)
    assert (routing.topk_idx == 2).all()
    assert torch.allclose(routing.topk_weight[:, 0], torch.sigmoid(glider.local_logits(x)[:, 2]))


# --- ReMix --------------------------------------------------------------------------------------

def test_remix_rloo_advantages_oracle() -> None:
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(adv, torch.tensor([-1.5, 0.0, 1.5]))
    assert float(adv.sum()) == 0.0
    with pytest.raises(ConfigError, match="at least 2"):
        rloo_advantages(torch.tensor([1.0]))


def test_remix_surrogate_gradient_is_the_leave_one_out_policy_gradient() -> None:
    logp = torch.tensor([[0.1], [0.2], [0.3]], requires_grad=True)
    rloo_surrogate(torch.tensor([[1.0], [2.0], [3.0]]), logp).backward()
    assert torch.allclose(logp.grad[:, 0], torch.tensor([-1.5, 0.0, 1.5]) / 3)


def test_remix_subset_probabilities_sum_to_one_over_ordered_subsets() -> None:
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    total = sum(
        math.exp(float(subset_log_prob(logits, torch.tensor([list(s)]))))
        for s in itertools.permutations(range(4), 2)
    )
    assert total == pytest.approx(1.0, abs=1e-6)


def test_remix_constant_weights_give_effective_support_k_and_sample_distinct_experts() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    adapters = attach_adapters(model, ["0"], num_experts=6, rank=4, method="remix", top_k=3)
    with adapters.context() as records:
        model(torch.randn(2, 10, 8))
    routing = records[0][1]
    assert float(routing.stats["effective_support"]) == pytest.approx(3.0)
    assert torch.allclose(routing.topk_weight, torch.full_like(routing.topk_weight, 1 / 3))
    assert all(len(set(row)) == 3 for row in routing.topk_idx.tolist())
    assert routing.log_prob_T is not None and routing.log_prob_T.requires_grad


def test_effective_support_of_a_collapsed_softmax_is_near_one() -> None:
    idx = torch.tensor([[0, 1]])
    assert float(effective_support_size(idx, torch.tensor([[0.99, 0.01]]))) == pytest.approx(1 / (0.99**2 + 0.01**2))


# --- DynMoLE over LoRA experts ------------------------------------------------------------------

def test_dynmole_routes_lora_experts_top_p_below_the_entropy_threshold() -> None:
    p = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.03, 0.02])
    model = nn.Sequential(nn.Linear(6, 5, bias=False))
    adapters = attach_adapters(model, ["0"], num_experts=6, rank=2, method="dynmole", init_b_std=0.3)
    layer = adapters.layers["0"]
    with torch.no_grad():
        layer.router.router.scorer.weight.zero_()
        layer.router.router.scorer.weight[:, 0] = p.log()
    x = torch.zeros(1, 6)
    x[0, 0] = 1.0
    model.eval()
    with adapters.context() as records:
        y = model(x)
    routing = records[0][1]
    assert sorted(i for i in routing.topk_idx[0].tolist() if i >= 0) == [0, 1]  # cumsum .5 <= .75, keep >= 2
    expected = x @ layer.base.weight.T + reference_routed(x, routing.topk_idx, routing.topk_weight, layer.bank)
    assert torch.allclose(y, expected, atol=1e-6)
    gates = {int(i): float(w.detach()) for i, w in zip(routing.topk_idx[0], routing.topk_weight[0]) if i >= 0}
    assert gates == pytest.approx({0: 0.5, 1: 0.3}, abs=1e-5)  # raw probabilities, not renormalised
    assert layer.bank.scaling[0] == pytest.approx(2.0)  # lora_alpha = 2r (DynMoLE template)


# --- LoRA-Mixer -----------------------------------------------------------------------------------

def test_lora_mixer_forward_is_hard_top_k_and_gradients_reach_every_expert_logit() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    adapters = attach_adapters(model, ["0"], num_experts=4, rank=2, method="lora-mixer", top_k=1, init_b_std=0.5)
    layer = adapters.layers["0"]
    x = torch.randn(6, 8)
    model.train()
    y_train = model(x)
    model.eval()
    with adapters.context() as records:
        y_eval = model(x)
    assert torch.allclose(y_train, y_eval, atol=1e-5)  # same forward value
    routing = records[0][1]
    assert routing.topk_idx.shape == (6, 1) and torch.allclose(routing.topk_weight, torch.ones(6, 1))
    model.train()
    model(x).square().sum().backward()
    grad = layer.router.proj.weight.grad
    assert (grad.abs().sum(dim=1) > 0).all()  # soft gradients reach all experts' router rows


# --- Mixture of Shards -------------------------------------------------------------------------

def test_mos_identity_indices_equal_one_lora_per_layer() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({f"l{i}": nn.ModuleDict({"proj": nn.Linear(8, 6, bias=False)}) for i in range(2)})
    layers = attach_mos(model, ["proj"], rank=3, indices="identity", lora_alpha=6.0)  # one module type: one pool
    # per-layer LoRAs, written into the pools at the identity indices
    loras = [(torch.randn(3, 8), torch.randn(6, 3)) for _ in range(2)]
    pool_a, pool_b = layers["l0.proj"].pool_a, layers["l0.proj"].pool_b
    assert pool_a is layers["l1.proj"].pool_a and pool_a.shards.shape == (6, 8)
    with torch.no_grad():
        for l, (a, b) in enumerate(loras):
            pool_a.shards[3 * l:3 * (l + 1)] = a
            pool_b.shards[3 * l:3 * (l + 1)] = b.T
    x = torch.randn(4, 8)
    for name, (a, b) in zip(["l0.proj", "l1.proj"], loras):
        layer = layers[name]
        expected = x @ layer.base.weight.T + torch.stack([reference_lora(x[t], a.T, b.T, 2.0) for t in range(4)])
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_mos_sharing_strategies_shapes_and_private_ranks() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    layers = attach_mos(model, ["0", "1"], rank=4, num_chunk=2, num_private_rank=1, num_shards=8, seed=1)
    layer = layers["0"]
    assert layer.lora_a().shape == (4, 8) and layer.lora_b().shape == (8, 4)
    assert layer.index_a.shape == (3, 2) and not torch.equal(layer.index_a, layer.index_b)  # pair dissociation
    assert torch.equal(layer(torch.zeros(1, 8)), model[0].base(torch.zeros(1, 8)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(n.endswith("base.weight") or n.endswith("base.bias") for n in trainable)
    with pytest.raises(ConfigError, match="num_private_rank"):
        attach_mos(nn.Sequential(nn.Linear(4, 4)), ["0"], rank=2, num_private_rank=3)


# --- POLAR ------------------------------------------------------------------------------------------

def test_polar_with_full_cache_and_no_paging_cost_is_linucb() -> None:
    rng = np.random.default_rng(0)
    contexts = rng.normal(size=(150, 3))
    theta = rng.normal(size=(5, 3))
    rewards = contexts @ theta.T + 0.1 * rng.normal(size=(150, 5))
    polar = PolarRouter(5, 3, cache_size=5, alpha=0.7, paging_cost=0.0, lam=1.0, epoch_length=10)
    run = run_polar(polar, contexts, lambda t, arm: rewards[t, arm])
    reference = LinUCB(5, 3, alpha=0.7, lam=1.0)
    expected = []
    for t, x in enumerate(contexts):
        arm = reference.select(x)
        reference.update(arm, x, rewards[t, arm])
        expected.append(arm)
    assert run.choices.tolist() == expected
    assert run.paging_loads == 0


def test_polar_greedy_one_dimensional_picks_the_highest_empirical_mean() -> None:
    polar = PolarRouter(3, 1, cache_size=3, alpha=0.0, lam=1e-9)
    one = np.ones(1)
    for arm, rewards in enumerate([[0.2, 0.4], [0.9, 0.7], [0.5, 0.5]]):
        for r in rewards:
            polar.update(arm, one, r)
    assert polar.select(one) == 1


def test_polar_pages_in_a_non_resident_arm_only_when_its_ucb_gap_exceeds_the_cost() -> None:
    one = np.ones(1)
    polar = PolarRouter(2, 1, cache_size=1, alpha=0.0, lam=1e-9, paging_cost=0.5, epoch_length=10**6)
    polar.update(0, one, 1.0)
    polar.update(1, one, 1.4)  # gap 0.4 < c: stays on the resident arm 0
    assert polar.select(one) == 0 and polar.paging_loads == 0
    polar.update(1, one, 2.0)  # arm 1 mean 1.7: gap 0.7 > c
    assert polar.select(one) == 1 and polar.paging_loads == 1


def test_polar_epoch_boundary_makes_the_best_arms_resident_and_lru_replay_counts_loads() -> None:
    one = np.ones(1)
    polar = PolarRouter(3, 1, cache_size=1, alpha=0.0, lam=1e-9, epoch_length=2)
    polar.update(2, one, 5.0)
    for _ in range(2):
        arm = polar.select(one)
        polar.update(arm, one, 0.0 if arm != 2 else 5.0)
    assert polar.resident.tolist() == [False, False, True]
    assert lru_paging_loads(np.array([0, 1, 0, 2, 0]), 3, 2) == 3  # loads 0, 1; hit 0; 2 evicts 1; hit 0


def test_polar_plus_doubles_its_epochs_and_forces_exploration_of_non_resident_arms() -> None:
    one = np.ones(1)
    polar = PolarRouter(3, 1, cache_size=1, alpha=0.0, lam=1e-9, epoch_length=2, doubling=True, explore_every=3)
    polar.update(0, one, 1.0)
    arms = []
    for _ in range(6):
        arm = polar.select(one)
        polar.update(arm, one, 1.0 if arm == 0 else 0.0)
        arms.append(arm)
    assert arms[2] in (1, 2) and arms[5] in (1, 2) and arms[2] != arms[5]  # every 3rd pull: least-pulled non-resident
    assert polar.current_epoch_length == 8  # 2 -> 4 -> 8 after two epoch boundaries
