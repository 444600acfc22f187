"""Optimal-transport routers: Sinkhorn solver, Megatron Sinkhorn, SSR, BASE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from routelab import MoE, create_router, end_of_step
from routelab.core.context import TokenBatch
from routelab.core.errors import ConfigError
from routelab.routers.parts.balanced_assignment import auction_assignment, hungarian_assignment
from routelab.routers.parts.sinkhorn import sinkhorn_potentials, transport_plan


def _plan(cost, xi, tol=1e-7, max_iter=2000):
    cost = torch.tensor(cost)
    num_tokens, num_experts = cost.shape
    return transport_plan(cost / xi, row_mass=1.0, col_mass=num_tokens / num_experts, tol=tol, max_iter=max_iter)


# --- the solver -------------------------------------------------------------------------


def test_ssr_plan_oracle_symmetric():
    plan = _plan([[0.73, 0.27], [0.27, 0.73]], 0.5)
    assert torch.allclose(plan, torch.tensor([[0.715, 0.285], [0.285, 0.715]]), atol=5e-4)


def test_ssr_plan_oracle_forced_split():
    plan = _plan([[0.95, 0.05], [0.90, 0.10]], 0.5)
    assert torch.allclose(plan, torch.tensor([[0.525, 0.475], [0.475, 0.525]]), atol=5e-4)
    assert torch.allclose(plan.sum(0), torch.ones(2), atol=1e-5)
    assert torch.allclose(plan.sum(1), torch.ones(2), atol=1e-5)


def test_megatron_marginals_columns_exact_rows_within_tolerance():
    torch.manual_seed(0)
    z = torch.randn(256, 8) * 2
    pot = sinkhorn_potentials(z, row_mass=1 / 256, col_mass=1 / 8, tol=1e-4, max_iter=100)
    plan = torch.exp(pot.log_plan(z))
    assert pot.converged and not pot.robust
    assert torch.allclose(plan.sum(0), torch.full((8,), 1 / 8), rtol=1e-5)
    assert float((plan.sum(1) * 256 - 1).abs().max()) < 1e-3


@pytest.mark.parametrize("scale", [1e2, 1e4])
def test_huge_logits_stay_finite(scale):
    torch.manual_seed(1)
    z = torch.randn(64, 8) * scale
    pot = sinkhorn_potentials(z, row_mass=1 / 64, col_mass=1 / 8, max_iter=50)
    plan = torch.exp(pot.log_plan(z))
    assert torch.isfinite(pot.f_T).all() and torch.isfinite(pot.g_E).all()
    assert torch.isfinite(plan).all()
    assert torch.allclose(plan.sum(0), torch.full((8,), 1 / 8), rtol=1e-4)
    assert pot.iterations <= 50


def test_fast_and_logsumexp_paths_agree():
    torch.manual_seed(2)
    z = torch.randn(128, 16) * 3
    fast = sinkhorn_potentials(z, row_mass=1.0, col_mass=8.0, tol=1e-6, max_iter=500)
    robust = sinkhorn_potentials(z, row_mass=1.0, col_mass=8.0, tol=1e-6, max_iter=500, robust=True)
    assert not fast.robust and robust.robust
    assert torch.allclose(fast.log_plan(z), robust.log_plan(z), atol=1e-4)


def test_sinkhorn_options_are_checked():
    with pytest.raises(ConfigError, match="sinkhorn_iters"):
        create_router("sinkhorn", d_model=8, num_experts=4, sinkhorn_iters=0)
    with pytest.raises(ConfigError, match="sinkhorn_tol"):
        create_router("ssr", d_model=8, num_experts=4, sinkhorn_tol=-1.0)


# --- Megatron Sinkhorn router -----------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
def test_megatron_selection_is_topk_of_plan_rows_and_gates_from_logits(top_k):
    torch.manual_seed(3)
    router = create_router("sinkhorn", d_model=16, num_experts=8, top_k=top_k, router_init_std=0.5).train()
    x = torch.randn(64, 16)
    routing = router(x)
    z = routing.logits.detach()
    plan = transport_plan(z, row_mass=1 / 64, col_mass=1 / 8, tol=1e-9, max_iter=2000)
    expected = torch.topk(plan, top_k, dim=1).indices
    assert torch.equal(routing.topk_idx.sort(1).values, expected.sort(1).values)
    activated = torch.sigmoid(z) if top_k == 1 else torch.softmax(z, dim=-1)
    assert torch.allclose(routing.topk_weight, activated.gather(1, routing.topk_idx), atol=1e-6)


def test_megatron_eval_is_plain_topk():
    torch.manual_seed(4)
    router = create_router("sinkhorn", d_model=16, num_experts=8, top_k=2, router_init_std=0.5).eval()
    routing = router(torch.randn(32, 16))
    assert torch.equal(routing.topk_idx, torch.topk(routing.logits, 2, dim=1).indices)


def test_megatron_refuses_aux_loss():
    with pytest.raises(ConfigError, match="balance loss"):
        create_router("sinkhorn", d_model=8, num_experts=4, aux_loss_coef=1e-2)


# --- Selective Sinkhorn Routing ---------------------------------------------------------


@pytest.mark.parametrize("cost", ["softmax", "logits"])
def test_ssr_sinkhorn_gates_are_renormalised_plan(cost):
    torch.manual_seed(5)
    router = create_router(
        "ssr", d_model=16, num_experts=8, top_k=2, p_sel=1.0, ssr_cost=cost, xi=0.5, sinkhorn_tol=1e-9,
        sinkhorn_iters=2000, router_init_std=0.3,
    ).train()
    routing = router(torch.randn(64, 16))
    assert float(routing.stats["ssr_sinkhorn"]) == 1.0
    cost_TE = routing.scores if cost == "softmax" else routing.logits
    plan = transport_plan(cost_TE.detach() / 0.5, row_mass=1.0, col_mass=64 / 8, tol=1e-9, max_iter=2000)
    top = torch.topk(plan, 2, dim=1)
    assert torch.equal(routing.topk_idx, top.indices)
    expected = top.values / top.values.sum(1, keepdim=True)
    assert torch.allclose(routing.topk_weight, expected, atol=1e-5)


def test_ssr_softmax_branch_and_eval():
    torch.manual_seed(6)
    x = torch.randn(32, 16)
    router = create_router("ssr", d_model=16, num_experts=8, top_k=2, p_sel=0.0).train()
    routing = router(x)
    probs = torch.softmax(routing.logits, dim=-1)
    top = torch.topk(probs, 2, dim=1)
    assert torch.equal(routing.topk_idx, top.indices)
    assert torch.allclose(routing.topk_weight, top.values / top.values.sum(1, keepdim=True), atol=1e-6)
    router_eval = create_router("ssr", d_model=16, num_experts=8, top_k=2, p_sel=1.0)
    router_eval.load_state_dict(router.state_dict())
    assert torch.equal(router_eval.eval()(x).topk_idx, top.indices)


def test_ssr_draws_are_seeded_and_match_p_sel():
    def draws(seed):
        router = create_router("ssr", d_model=8, num_experts=4, p_sel=0.3, seed=seed, sinkhorn_iters=4).train()
        x = torch.randn(16, 8)
        with torch.no_grad():
            return [float(router(x).stats["ssr_sinkhorn"]) for _ in range(300)]

    first, second = draws(7), draws(7)
    assert first == second
    assert 0.2 < sum(first) / len(first) < 0.4
    assert draws(8) != first


def test_ssr_per_step_draw_changes_only_in_end_of_step():
    router = create_router("ssr", d_model=8, num_experts=4, p_sel=0.5, ssr_draw="step", seed=3).train()
    x = torch.randn(16, 8)
    seen = []
    for _ in range(40):
        within = {float(router(x).stats["ssr_sinkhorn"]) for _ in range(3)}
        assert len(within) == 1
        seen.append(within.pop())
        end_of_step(router)
    assert 0 < sum(seen) < len(seen)


def test_ssr_gradient_modes():
    torch.manual_seed(9)
    x = torch.randn(32, 16)
    for mode, has_grad in (("unrolled", True), ("detach", False)):
        router = create_router("ssr", d_model=16, num_experts=4, top_k=2, p_sel=1.0, sinkhorn_grad=mode, xi=0.5).train()
        routing = router(x)
        loss = (routing.topk_weight * torch.arange(2.0)).sum()
        if has_grad:
            loss.backward()
            assert float(router.scorer.weight.grad.abs().sum()) > 0
        else:
            assert not loss.requires_grad


@pytest.mark.parametrize(
    "options, match",
    [({"xi": 0.0}, "xi"), ({"p_sel": 1.5}, "p_sel"), ({"ssr_cost": "l2"}, "ssr_cost"), ({"sinkhorn_grad": "x"}, "sinkhorn_grad")],
)
def test_ssr_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        create_router("ssr", d_model=8, num_experts=4, **options)


# --- BASE layers ------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens, top_k", [(64, 1), (64, 2), (70, 1)])
def test_base_training_load_is_exactly_balanced(num_tokens, top_k):
    torch.manual_seed(10)
    router = create_router("base", d_model=16, num_experts=8, top_k=top_k).train()
    x = torch.randn(num_tokens, 16) + torch.randn(1, 16) * 3  # a shared direction makes greedy routing skewed
    routing = router(x)
    load = routing.stats["load"]
    assert float(load.sum()) == num_tokens * top_k
    assert float(load.max() - load.min()) <= (0 if num_tokens * top_k % 8 == 0 else 1)
    if top_k > 1:
        assert bool((routing.topk_idx[:, 0] != routing.topk_idx[:, 1]).all())
    greedy = torch.bincount(routing.logits.argmax(1), minlength=8)
    assert int(greedy.max()) > num_tokens // 8  # balancing did real work


@pytest.mark.parametrize("seed", range(4))
def test_auction_matches_hungarian(seed):
    torch.manual_seed(seed)
    values = torch.randn(48, 6)
    exact = hungarian_assignment(values)
    auction = auction_assignment(values, 1, eps_rel=1e-7, eps_min=1e-9)
    assert torch.equal(exact.topk_idx_TK, auction.topk_idx_TK)
    big = np.repeat(values.double().numpy(), 8, axis=1)
    rows, cols = linear_sum_assignment(big, maximize=True)
    assert float(values.gather(1, auction.topk_idx_TK).sum()) == pytest.approx(big[rows, cols].sum(), abs=1e-4)


def test_auction_default_eps_is_near_optimal_and_balanced():
    torch.manual_seed(11)
    values = torch.randn(256, 8)
    exact = float(values.gather(1, hungarian_assignment(values).topk_idx_TK).sum())
    result = auction_assignment(values, 1)
    got = float(values.gather(1, result.topk_idx_TK).sum())
    eps = 0.02 * float(values.max() - values.min())
    assert exact - 256 * eps <= got <= exact + 1e-4
    assert torch.equal(torch.bincount(result.topk_idx_TK.flatten(), minlength=8), torch.full((8,), 32))


def test_base_eval_greedy_gate_sigmoid_and_gradient():
    torch.manual_seed(12)
    router = create_router("base", d_model=16, num_experts=4)
    x = torch.randn(20, 16)
    routing = router.eval()(x)
    assert torch.equal(routing.topk_idx[:, 0], routing.logits.argmax(1))
    router.train()
    routing = router(x)
    assert torch.allclose(routing.topk_weight, torch.sigmoid(routing.logits).gather(1, routing.topk_idx))
    routing.topk_weight.sum().backward()
    assert float(router.scorer.centroids.grad.abs().sum()) > 0


def test_base_hungarian_solver_and_warm_start():
    torch.manual_seed(13)
    router = create_router("base", d_model=8, num_experts=4, base_solver="hungarian").train()
    x = torch.randn(16, 8)
    auction_router = create_router("base", d_model=8, num_experts=4, auction_eps=1e-6, warm_start=True)
    auction_router.load_state_dict(router.state_dict())
    assert torch.equal(router(x).topk_idx, auction_router.train()(x).topk_idx)
    selector = auction_router.selector
    assert not bool(selector.has_prices)
    end_of_step(auction_router)
    assert bool(selector.has_prices)
    assert torch.equal(auction_router(x).topk_idx, router(x).topk_idx)  # warm start, same optimum
    with pytest.raises(ConfigError, match="hungarian"):
        create_router("base", d_model=8, num_experts=4, top_k=2, base_solver="hungarian")
    with pytest.raises(ConfigError, match="auction_eps"):
        create_router("base", d_model=8, num_experts=4, auction_eps=0.0)


@pytest.mark.parametrize("name", ["base", "sinkhorn", "ssr"])
def test_transport_presets_train_in_moe_layer(name):
    torch.manual_seed(14)
    layer = MoE(d_model=16, d_hidden=32, num_experts=4, top_k=2, router=name, **({"p_sel": 0.5} if name == "ssr" else {}))
    x = torch.randn(2, 12, 16, requires_grad=True)
    for _ in range(3):
        out = layer(x)
        (out.y.square().mean() + out.aux_loss).backward()
        end_of_step(layer)
    assert torch.isfinite(out.y).all() and torch.isfinite(x.grad).all()


def test_sinkhorn_router_on_empty_batch():
    router = create_router("ssr", d_model=8, num_experts=4, p_sel=1.0).train()
    batch = TokenBatch.from_mask(1, 3, torch.zeros(1, 3, dtype=torch.bool))
    routing = router(torch.zeros(0, 8), batch)
    assert routing.topk_idx.shape[0] == 0
