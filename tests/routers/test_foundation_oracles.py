"""Hand-computed oracles for the first presets: top-k gating, expert choice, loss-free bias, hash
routing and the shared parts (balance losses, capacity, statistics)."""

from __future__ import annotations

import math

import pytest
import torch

import routelab
from routelab.core.context import TokenBatch
from routelab.core.routing_stats import balance_stats, routing_stats
from routelab.routers.parts.balancers import LossFreeBias
from routelab.routers.parts.router import Router
from routelab.routers.parts.capacity import Capacity, expert_capacity
from routelab.routers.parts.gates import GateNorm
from routelab.routers.parts.losses import SwitchBalanceLoss, ZLoss, cv_squared
from routelab.routers.parts.score_functions import Identity, Softmax
from routelab.routers.parts.selectors import GroupLimitedTopK, TopK
from tests.helpers import FixedScorer
from tests.reference import reference_balance, reference_capacity_keep, reference_switch_loss


def fixed_router(logits_TE, *, top_k, gate="renorm", score_fn=None, losses=(), capacity=None, balancer=None, scaling=1.0):
    logits_TE = torch.as_tensor(logits_TE, dtype=torch.float32)
    num_experts = logits_TE.shape[1]
    return Router(
        num_experts=num_experts, top_k=top_k, scorer=FixedScorer(logits_TE), score_fn=score_fn or Softmax(),
        selector=TopK(num_experts, top_k), gate_norm=GateNorm(gate, scaling), losses=list(losses),
        capacity=capacity, balancer=balancer,
    )


def run(router: Router, num_tokens: int) -> routelab.Routing:
    return router(torch.zeros(num_tokens, 1))


# §1 softmax / renorm / z-loss on z = [2, 1, 0, -1], k = 2
def test_softmax_renorm_norenorm_and_zloss_numbers() -> None:
    z = [[2.0, 1.0, 0.0, -1.0]]
    renorm = run(fixed_router(z, top_k=2, gate="renorm", losses=[ZLoss(1e-3)]), 1)
    norenorm = run(fixed_router(z, top_k=2, gate="none"), 1)
    torch.testing.assert_close(renorm.scores, torch.tensor([[0.6439, 0.2369, 0.0871, 0.0321]]), atol=1e-4, rtol=0)
    assert renorm.topk_idx.tolist() == [[0, 1]]
    torch.testing.assert_close(renorm.topk_weight, torch.tensor([[0.7311, 0.2689]]), atol=1e-4, rtol=0)
    torch.testing.assert_close(renorm.topk_weight, torch.softmax(torch.tensor([[2.0, 1.0]]), -1))
    torch.testing.assert_close(norenorm.topk_weight, torch.tensor([[0.6439, 0.2369]]), atol=1e-4, rtol=0)
    assert renorm.losses["z"].item() == pytest.approx(5.9545, abs=1e-4)
    assert renorm.aux_loss.item() == pytest.approx(5.9545e-3, abs=1e-7)


def test_switch_loss_is_one_at_uniform_f_whatever_p() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 4, generator=g) * 3
    # four tokens per ... make f uniform: force selection by a huge bias on a round-robin pattern
    forced = torch.full((8, 4), -1e4)
    forced[torch.arange(8), torch.arange(8) % 4] = 0.0
    router = fixed_router(logits, top_k=1, gate="none", losses=[SwitchBalanceLoss(1e-2)])
    router.selector = _SelectBy(forced)
    r = run(router, 8)
    assert r.losses["aux"].item() == pytest.approx(1.0, abs=1e-6)
    assert r.aux_loss.item() == pytest.approx(1e-2, abs=1e-8)


def test_switch_loss_is_e_when_collapsed_with_probability_one() -> None:
    logits = torch.full((6, 4), -1e4)
    logits[:, 2] = 1e4
    r = run(fixed_router(logits, top_k=1, gate="none", losses=[SwitchBalanceLoss(1e-2)]), 6)
    assert r.losses["aux"].item() == pytest.approx(4.0, abs=1e-6)


def test_switch_loss_can_fall_below_alpha() -> None:
    probs = [[0.6, 0.4], [0.55, 0.45], [0.0, 1.0]]
    logits = torch.tensor(probs).clamp_min(1e-12).log()
    r = run(fixed_router(logits, top_k=1, gate="none", losses=[SwitchBalanceLoss(1.0)]), 3)
    assert r.losses["aux"].item() == pytest.approx(0.9222, abs=1e-4)
    assert r.losses["aux"].item() == pytest.approx(reference_switch_loss(probs, [[0], [0], [1]]), abs=1e-6)


def test_switch_loss_matches_reference_on_random_inputs() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 5, generator=g)
    r = run(fixed_router(logits, top_k=2, losses=[SwitchBalanceLoss(1.0)]), 20)
    expected = reference_switch_loss(torch.softmax(logits, -1).tolist(), r.topk_idx.tolist())
    assert r.losses["aux"].item() == pytest.approx(expected, rel=1e-5)


class _SelectBy(TopK):
    """Select by a fixed matrix (to force a selection in a test), gates from the real scores."""

    def __init__(self, key_TE: torch.Tensor) -> None:
        super().__init__(key_TE.shape[1], 1)
        self.key_TE = key_TE

    def forward(self, draft):
        idx = self.key_TE.topk(1, dim=-1).indices
        return idx, draft.scores_TE.gather(1, idx)


# §1 capacity example: T=8, E=4, k=1, CF=1 -> C=2; all tokens pick expert 0
@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_example_keeps_two_best_tokens(policy: str) -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(8, 4, generator=g)
    logits[:, 0] += 10.0
    router = fixed_router(logits, top_k=1, gate="none", capacity=Capacity(1.0, policy))
    r = run(router, 8)
    assert expert_capacity(8, 1, 4, 1.0) == 2 and r.capacity == 2
    kept = (r.topk_idx[:, 0] == 0).tolist()
    gates = torch.softmax(logits, -1)[:, 0].tolist()
    assert kept == reference_capacity_keep([0] * 8, gates, 2, policy)
    assert sum(kept) == 2
    if policy == "position":
        assert kept == [True, True] + [False] * 6
    assert r.stats["dropped"].item() == 6 and r.stats["drop_rate"].item() == pytest.approx(0.75)
    assert r.stats["tokens_without_expert"].item() == 6
    assert bool((r.topk_weight[r.topk_idx < 0] == 0).all())


# §0 / A4 balance metrics oracle: loads [4, 2, 1, 1]
def test_balance_metrics_oracle() -> None:
    stats = balance_stats(torch.tensor([4.0, 2.0, 1.0, 1.0]))
    assert stats["max_vio"].item() == pytest.approx(1.0)
    assert stats["cv"].item() == pytest.approx(0.6124, abs=1e-4)
    assert stats["entropy"].item() == pytest.approx(0.875, abs=1e-4)
    ref = reference_balance([4, 2, 1, 1])
    assert stats["cv"].item() == pytest.approx(ref["cv"], rel=1e-6)
    assert stats["entropy"].item() == pytest.approx(ref["entropy"], rel=1e-6)


def test_routing_stats_count_dead_experts_and_empty_tokens() -> None:
    idx = torch.tensor([[0, -1], [0, 1], [-1, -1]])
    stats = routing_stats(idx, 4, selected_assignments=5)
    assert stats["load"].tolist() == [2.0, 1.0, 0.0, 0.0]
    assert stats["dead_experts"].item() == 2
    assert stats["tokens_without_expert"].item() == 1
    assert stats["dropped"].item() == 2 and stats["drop_rate"].item() == pytest.approx(0.4)
    assert stats["active_experts_per_token"].item() == pytest.approx(1.0)


# §1 noisy top-k
def test_noisy_topk_in_eval_equals_plain_softmax_topk() -> None:
    layer = routelab.MoE(d_model=8, d_hidden=8, num_experts=6, top_k=2, router="noisy-topk").eval()
    with torch.no_grad():
        layer.router.scorer.weight.normal_()
        layer.router.scorer.noise_weight.normal_()
    x = torch.randn(1, 10, 8)
    r = layer(x).routing
    z = x[0] @ layer.router.scorer.weight.T
    top = z.topk(2, dim=-1)
    torch.testing.assert_close(r.topk_weight, torch.softmax(top.values, -1), atol=1e-6, rtol=1e-6)
    assert torch.equal(r.topk_idx, top.indices)


def test_noisy_topk_training_adds_noise_and_load_loss_is_differentiable() -> None:
    layer = routelab.MoE(d_model=8, d_hidden=8, num_experts=6, top_k=2, router="noisy-topk").train()
    with torch.no_grad():
        layer.router.scorer.weight.normal_()
    x = torch.randn(1, 64, 8)
    out = layer(x)
    assert not torch.equal(out.routing.logits, x[0] @ layer.router.scorer.weight.T)
    out.routing.losses["load"].backward()
    assert layer.router.scorer.noise_weight.grad.abs().sum() > 0
    assert cv_squared(torch.full((5,), 3.0)).item() == 0.0


# §2 expert choice
def test_expert_choice_gives_every_expert_exactly_its_capacity() -> None:
    layer = routelab.MoE(d_model=8, d_hidden=8, num_experts=4, top_k=2, router="expert-choice")
    r = layer(torch.randn(3, 16, 8)).routing
    assert r.capacity == 3 * 8  # L=16, E=4, k=2 -> C=8 per sequence
    seq_of_token = torch.arange(48) // 16
    for b in range(3):
        idx = r.topk_idx[seq_of_token == b]
        counts = torch.bincount(idx[idx >= 0], minlength=4)
        assert counts.tolist() == [8, 8, 8, 8]
    assert int((r.topk_idx >= 0).sum()) == 4 * 8 * 3


def test_expert_choice_picks_each_experts_top_tokens() -> None:
    logits = torch.randn(16, 4, generator=torch.Generator().manual_seed(5))
    router = routelab.create_router("expert-choice", d_model=1, num_experts=4, top_k=2)
    router.scorer = FixedScorer(logits)
    r = router(torch.zeros(16, 1))
    probs = torch.softmax(logits, -1)
    for e in range(4):
        chosen = set((r.topk_idx == e).any(dim=1).nonzero().flatten().tolist())
        assert chosen == set(probs[:, e].topk(8).indices.tolist())
    torch.testing.assert_close(r.topk_weight, torch.where(r.topk_idx >= 0, probs.gather(1, r.topk_idx.clamp_min(0)),
                                                         torch.zeros(())))


def test_expert_choice_post_softmax_gates_sum_to_one() -> None:
    layer = routelab.MoE(d_model=8, d_hidden=8, num_experts=4, top_k=2, router="expert-choice", ec_gate="post-softmax")
    r = layer(torch.randn(2, 16, 8)).routing
    routed = (r.topk_idx >= 0).any(1)
    torch.testing.assert_close(r.topk_weight.sum(1)[routed], torch.ones(int(routed.sum())))


# §4 loss-free balancing oracle: E=2, T=100, s=(.5+d/2, .5-d/2), u=1e-3
def test_loss_free_two_expert_oracle() -> None:
    d = torch.linspace(0, 0.1, 100)
    scores = torch.stack([0.5 + d / 2, 0.5 - d / 2], dim=1)
    balancer = LossFreeBias(2, update_rate=1e-3)
    router = fixed_router(scores, top_k=1, gate="none", score_fn=Identity(), balancer=balancer).train()
    loads = []
    for _ in range(40):
        r = run(router, 100)
        loads.append(int((r.topk_idx[:, 0] == 0).sum()))
        routelab.end_of_step(router)
    assert loads[0] == 100
    assert all(a >= b for a, b in zip(loads[:26], loads[1:26]))  # monotone fall
    assert loads[25] == 50 and loads[24] > 50
    assert loads[25:] == [50] * 15  # exactly balanced, then frozen
    torch.testing.assert_close(balancer.bias, torch.tensor([-0.025, 0.025]), atol=1e-6, rtol=0)
    # gates never see the bias
    torch.testing.assert_close(r.topk_weight[:, 0], scores.gather(1, r.topk_idx).squeeze(1))


def test_loss_free_bias_does_not_move_in_eval_and_counts_accumulate_over_microbatches() -> None:
    layer = routelab.MoE(d_model=8, d_hidden=8, num_experts=4, top_k=2, router="loss-free")
    x = torch.randn(1, 32, 8)
    layer.eval()
    layer(x)
    routelab.end_of_step(layer)
    assert torch.equal(layer.router.balancer.bias, torch.zeros(4))
    layer.train()
    first = layer(x).routing.stats["load"]
    second = layer(x).routing.stats["load"]
    torch.testing.assert_close(layer.router.balancer.pending_counts, first + second)
    assert routelab.end_of_step(layer) == 1
    assert layer.router.balancer.pending_counts.sum() == 0
    assert int(layer.router.balancer.num_updates) == 1
    assert "router.balancer.bias" in layer.state_dict()  # the bias is checkpointed
    assert "router.balancer.pending_counts" not in layer.state_dict()  # the accumulator is not


# §13 group-limited top-k
def test_group_limited_topk_stays_within_group_topk_groups() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(50, 16, generator=g)
    router = Router(num_experts=16, top_k=4, scorer=FixedScorer(scores), score_fn=Identity(),
                    selector=GroupLimitedTopK(16, 4, num_groups=8, group_topk=2), gate_norm=GateNorm("renorm"))
    r = router(torch.zeros(50, 1))
    groups = r.topk_idx // 2
    assert all(len(set(row)) <= 2 for row in groups.tolist())
    # the kept groups are the best two by the sum of their top-2 scores (k // group_topk = 2)
    group_score = scores.view(50, 8, 2).sum(-1)
    best = group_score.topk(2, dim=-1).indices
    for row_groups, row_best in zip(groups.tolist(), best.tolist()):
        assert set(row_groups) <= set(row_best)


def test_deepseek_v3_uses_sigmoid_groups_and_scaling() -> None:
    router = routelab.create_router("deepseek-v3", d_model=8, num_experts=64, top_k=8)
    assert isinstance(router.selector, GroupLimitedTopK)
    assert (router.selector.num_groups, router.selector.group_topk) == (8, 4)
    r = router(torch.randn(20, 8))
    torch.testing.assert_close(r.topk_weight.sum(1), torch.full((20,), 2.5))
    s = torch.sigmoid(r.logits)
    sel = s.gather(1, r.topk_idx)
    torch.testing.assert_close(r.topk_weight, 2.5 * sel / sel.sum(1, keepdim=True))
    assert set(r.losses) == {"seq_aux"}


# §6 hash layers
def test_hash_same_id_same_expert_regardless_of_context() -> None:
    layer = routelab.MoE(d_model=8, d_hidden=8, num_experts=8, router="hash")
    ids = torch.randint(0, 50, (4, 20))
    r = layer(torch.randn(4, 20, 8), token_ids=ids).routing
    table = {}
    for token_id, expert in zip(ids.reshape(-1).tolist(), r.topk_idx[:, 0].tolist()):
        assert table.setdefault(token_id, expert) == expert
    assert r.topk_weight.eq(1.0).all()
    layer2 = routelab.MoE(d_model=8, d_hidden=8, num_experts=8, router="hash")
    r2 = layer2(torch.randn(4, 20, 8) * 5, token_ids=ids).routing
    assert torch.equal(r.topk_idx, r2.topk_idx)


def test_random_hash_is_roughly_uniform_and_gives_distinct_experts() -> None:
    router = routelab.create_router("hash", d_model=4, num_experts=8, top_k=3)
    ids = torch.arange(8000)
    r = router(torch.zeros(8000, 4), TokenBatch.single_sequence(8000, token_ids=ids.view(1, -1)))
    assert all(len(set(row)) == 3 for row in r.topk_idx[:200].tolist())
    load = r.stats["load"]
    assert float(load.max() / load.mean()) < 1.1


def test_balanced_hash_bound() -> None:
    g = torch.Generator().manual_seed(0)
    freq = (torch.rand(200, generator=g) ** 4 * 100).round() + 1
    router = routelab.create_router("hash", d_model=4, num_experts=8, hash_mode="balanced", vocab_size=200)
    router.selector.fit(freq)
    ids = torch.repeat_interleave(torch.arange(200), freq.long())
    r = router(torch.zeros(ids.numel(), 4), TokenBatch.single_sequence(ids.numel(), token_ids=ids.view(1, -1)))
    load = r.stats["load"]
    assert float(load.max()) <= float(load.mean() + freq.max())


def test_random_fixed_router_is_frozen() -> None:
    layer = routelab.MoE(d_model=8, d_hidden=8, num_experts=4, router="random-fixed")
    assert not any(p.requires_grad for p in layer.router.parameters())
    x = torch.randn(2, 5, 8)
    before = layer(x).routing.topk_idx.clone()
    opt = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(x).y.square().sum().backward()
    opt.step()
    assert torch.equal(layer(x).routing.topk_idx, before)


def test_sequence_aux_loss_is_mean_of_per_sequence_losses() -> None:
    router = routelab.create_router("mixtral", d_model=8, num_experts=4, top_k=2, aux_loss_coef=0.0,
                                    seq_aux_loss_coef=1.0)
    x = torch.randn(2, 6, 8)
    batch = TokenBatch.from_mask(2, 6, None)
    r = router(x.reshape(-1, 8), batch)
    per_seq = []
    for b in range(2):
        rb = router(x[b])
        probs = torch.softmax(rb.logits, -1).tolist()
        per_seq.append(reference_switch_loss(probs, rb.topk_idx.tolist()))
    assert r.losses["seq_aux"].item() == pytest.approx(sum(per_seq) / 2, rel=1e-5)


def test_jitter_changes_training_logits_only() -> None:
    layer = routelab.MoE(d_model=8, d_hidden=8, num_experts=4, router="mixtral", jitter_eps=0.1)
    x = torch.randn(1, 6, 8)
    clean = x[0] @ layer.router.scorer.weight.T
    layer.train()
    assert not torch.allclose(layer(x).routing.logits, clean)
    layer.eval()
    torch.testing.assert_close(layer(x).routing.logits, clean)


def test_empty_and_all_padding_batches_return_zeros_and_valid_stats() -> None:
    for name in ("mixtral", "expert-choice", "hash", "deepseek-v3", "noisy-topk"):
        losses = {} if name == "hash" else {"z_loss_coef": 1e-3}  # hash refuses a loss it cannot train
        layer = routelab.MoE(d_model=8, d_hidden=8, num_experts=4, router=name, **losses)
        empty = layer(torch.randn(0, 5, 8), token_ids=torch.zeros(0, 5, dtype=torch.long))
        assert empty.y.shape == (0, 5, 8)
        mask = torch.zeros(2, 5, dtype=torch.bool)
        x = torch.randn(2, 5, 8, requires_grad=True)
        out = layer(x, padding_mask=mask, token_ids=torch.zeros(2, 5, dtype=torch.long))
        assert torch.equal(out.y, torch.zeros(2, 5, 8))
        stats = out.routing.stats_dict()
        assert stats["num_tokens"] == 0 and stats["max_vio"] == 0 and stats["drop_rate"] == 0
        assert all(math.isfinite(v) for v in out.routing.loss_dict().values())
        assert float(out.aux_loss) == 0.0
        out.y.sum().backward()  # no crash on an empty graph path
