"""ReLU routing: ReMoE, BlockFFN, TLS/CLS sparsity."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from routelab import MoE, create_router, end_of_step
from routelab.core.context import TokenBatch
from routelab.core.errors import ConfigError
from routelab.core.routing_sparsity import activity_mask, cls_of_mask, tls_of_mask
from routelab.routers.families.relu import chunk_sparsity_loss

# --- TLS / CLS ----------------------------------------------------------------------------


def test_tls_cls_oracle():
    mask = activity_mask(torch.tensor([[0], [0], [1], [0]]), 4)
    assert float(tls_of_mask(mask)) == pytest.approx(0.75)
    seq, pos = torch.zeros(4, dtype=torch.long), torch.arange(4)
    assert float(cls_of_mask(mask, seq, pos, window=4)) == pytest.approx(0.5)
    assert float(cls_of_mask(mask, seq, pos, window=1)) == pytest.approx(0.75)  # W = 1 is TLS


def test_cls_windows_stay_inside_sequences():
    # two sequences of 4 tokens: seq 0 uses {0}, seq 1 uses {1}; a window of 8 would mix them
    mask = activity_mask(torch.tensor([[0], [0], [0], [0], [1], [1], [1], [1]]), 4)
    seq = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    pos = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    assert float(cls_of_mask(mask, seq, pos, window=4)) == pytest.approx(0.75)
    # no full window of 8 exists: the partial windows (one per sequence) are measured
    assert float(cls_of_mask(mask, seq, pos, window=8)) == pytest.approx(0.75)
    with pytest.raises(ConfigError, match="window"):
        cls_of_mask(mask, seq, pos, window=0)


def test_active_mask_ignores_empty_slots():
    mask = activity_mask(torch.tensor([[-1, 0], [2, -1], [-1, -1]]), 3)
    assert mask.tolist() == [[True, False, False], [False, False, True], [False, False, False]]


# --- chunk sparsification loss ---------------------------------------------------------------


def test_cs_loss_one_hot_oracle():
    p = torch.zeros(4, 4)
    p[:, 0] = 1.0
    assert float(chunk_sparsity_loss(p, torch.zeros(4, dtype=torch.long), 1)) == pytest.approx(0.25, abs=1e-6)


def test_cs_loss_uniform_by_hand():
    p = torch.full((2, 4), 0.25)  # each expert fires with prob 1 - .75^2 in a 2-token chunk
    assert float(chunk_sparsity_loss(p, torch.zeros(2, dtype=torch.long), 1)) == pytest.approx(1 - 0.75**2)


def test_cs_coefficient_schedule():
    router = create_router("blockffn", d_model=8, num_experts=4, chunk_stable_steps=4, chunk_window=2)
    loss = next(part for part in router.losses if part.name == "chunk_sparsity")
    initial = loss.coef
    assert initial == pytest.approx(5e-2)

    def step(value):
        loss.pending_sum.fill_(value)
        loss.pending_count.fill_(1)
        loss.end_of_step()

    for value in (1.0, 1.0, 1.0, 1.0):  # steps 1-4: stable phase, window means 1, 1
        step(value)
    assert loss.coef == pytest.approx(initial)
    step(1.01)
    step(1.01)  # step 6: ratio 1.01 > 1 is raised to 1.025; reached linearly over 2 steps
    assert loss.coef == pytest.approx(initial)
    step(1.01)
    assert loss.coef == pytest.approx(initial * (1 + 0.025 / 2))
    step(0.505)  # step 8: window mean (1.01 + .505)/2 vs 1.01 -> ratio .75
    assert loss.coef == pytest.approx(initial * 1.025)
    step(0.5)
    step(0.5)
    assert loss.coef == pytest.approx(initial * 1.025 * 0.75)
    state = router.state_dict()
    clone = create_router("blockffn", d_model=8, num_experts=4, chunk_stable_steps=4, chunk_window=2)
    clone.load_state_dict(state)
    assert next(p for p in clone.losses if p.name == "chunk_sparsity").coef == pytest.approx(loss.coef)


def test_cs_coefficient_is_capped():
    router = create_router("blockffn", d_model=8, num_experts=4, chunk_stable_steps=0, chunk_window=1)
    loss = next(part for part in router.losses if part.name == "chunk_sparsity")
    value = 1.0
    for _ in range(40):
        value *= 2
        loss.pending_sum.fill_(value)
        loss.pending_count.fill_(1)
        loss.end_of_step()
    assert loss.coef == pytest.approx(4 * 5e-2)


# --- ReMoE ----------------------------------------------------------------------------------


def test_remoe_lambda_oracle():
    router = create_router("remoe", d_model=8, num_experts=4, top_k=1).train()
    l1 = next(part for part in router.losses if part.name == "l1")
    with torch.no_grad():
        router.scorer.weight.fill_(1.0)  # every gate positive for positive inputs: sparsity 0 < .75
    x = torch.rand(16, 8)
    for _ in range(3):
        router(x)
        end_of_step(router)
    assert l1.coef == pytest.approx(1.728e-8, rel=1e-9)
    with torch.no_grad():
        router.scorer.weight.fill_(-1.0)  # every gate zero: sparsity 1 >= .75
    router(x)
    end_of_step(router)
    assert l1.coef == pytest.approx(1.728e-8 / 1.2, rel=1e-9)
    clone = create_router("remoe", d_model=8, num_experts=4, top_k=1)
    clone.load_state_dict(router.state_dict())
    assert next(part for part in clone.losses if part.name == "l1").coef == pytest.approx(l1.coef)


def test_remoe_loss_value_by_hand():
    router = create_router("remoe", d_model=2, num_experts=2, top_k=1)
    with torch.no_grad():
        router.scorer.weight.copy_(torch.eye(2))
    routing = router(torch.tensor([[1.0, -1.0], [2.0, 3.0]]))
    # gates [[1, 0], [2, 3]]; counts (2, 1); f = counts / (T k) = (1, .5); P = (1.5, 1.5)
    assert float(routing.losses["l1"].detach()) == pytest.approx(2 * (1 * 1.5 + 0.5 * 1.5))
    assert routing.topk_idx.tolist() == [[0, -1], [1, 0]]
    assert routing.topk_weight.tolist() == [[1.0, 0.0], [3.0, 2.0]]


@pytest.mark.parametrize("name", ["remoe", "blockffn"])
def test_zero_logits_give_zero_output(name):
    layer = MoE(d_model=8, d_hidden=8, num_experts=4, router=name)
    with torch.no_grad():
        layer.router.scorer.weight.zero_()
    out = layer(torch.randn(2, 5, 8))
    assert torch.equal(out.y, torch.zeros_like(out.y))
    assert float(out.routing.stats["tokens_without_expert"]) == 10
    assert float(out.routing.stats["tls"]) == 1.0


@pytest.mark.parametrize("name", ["remoe", "blockffn"])
def test_relu_routers_in_moe_layer(name):
    torch.manual_seed(5)
    layer = MoE(d_model=16, d_hidden=16, num_experts=8, router=name)
    x = torch.randn(2, 16, 16, requires_grad=True)
    out = layer(x)
    (out.y.square().mean() + out.aux_loss).backward()
    end_of_step(layer)
    routing = out.routing
    active = (routing.scores > 0).sum(1)
    assert routing.k_max == int(active.max())
    assert torch.equal((routing.topk_idx >= 0).sum(1), active)
    assert bool((routing.topk_weight[routing.topk_idx < 0] == 0).all())
    assert {"tls", "cls", "cls_window"} <= set(routing.stats)
    assert float(routing.stats["tls"]) == pytest.approx(1 - float(active.sum()) / (32 * 8))
    assert torch.isfinite(x.grad).all()


# --- BlockFFN ---------------------------------------------------------------------------------


def test_blockffn_gates_rmsnorm_scale_invariant():
    router = create_router("blockffn", d_model=4, num_experts=4)
    with torch.no_grad():
        router.scorer.weight.copy_(torch.eye(4))
        router.score_fn.gamma.copy_(torch.tensor([1.0, 2.0, 1.0, 1.0]))
    x = torch.tensor([[3.0, 4.0, -1.0, 0.0]])
    gates = router(x).scores
    rms = ((9 + 16) / 4 + 1e-5) ** 0.5
    assert torch.allclose(gates, torch.tensor([[3 / rms, 2 * 4 / rms, 0.0, 0.0]]))
    assert torch.allclose(router(100 * x).scores, gates, atol=1e-6)


def test_blockffn_locality_loss_by_hand():
    router = create_router("blockffn", d_model=2, num_experts=2, chunk_loss_coef=0.0, locality_steepness=1.0)
    with torch.no_grad():
        router.scorer.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, -1.0], [0.5, 2.0], [3.0, 0.0]])
    batch = TokenBatch.from_mask(2, 2, torch.tensor([[True, True], [True, False]]))
    routing = router(x, batch)
    # only (token 0 -> token 1) are consecutive in one sequence
    expected = F.binary_cross_entropy_with_logits(x[0], torch.sigmoid(x[1]))
    assert float(routing.losses["locality"].detach()) == pytest.approx(float(expected))


def test_blockffn_options_checked():
    with pytest.raises(ConfigError, match="chunk_size"):
        create_router("blockffn", d_model=8, num_experts=4, chunk_size=0)
    with pytest.raises(ConfigError, match="l1_lambda_init"):
        create_router("remoe", d_model=8, num_experts=4, l1_lambda_init=0.0)
    with pytest.raises(ConfigError, match="target_sparsity"):
        create_router("remoe", d_model=8, num_experts=4, target_sparsity=1.0)
    with pytest.raises(ConfigError, match="cls_window"):
        create_router("remoe", d_model=8, num_experts=4, cls_window=0)


def test_cs_coefficient_stays_fixed_without_adaptation():
    """chunk_adaptive=False: the schedule of test_cs_coefficient_schedule leaves the coefficient alone."""
    router = create_router("blockffn", d_model=8, num_experts=4, chunk_stable_steps=4, chunk_window=2,
                           chunk_adaptive=False)
    loss = next(part for part in router.losses if part.name == "chunk_sparsity")
    initial = loss.coef
    for value in (1.0, 1.0, 1.0, 1.0, 1.01, 1.01, 1.01, 0.505, 0.5, 0.5):
        loss.pending_sum.fill_(value)
        loss.pending_count.fill_(1)
        loss.end_of_step()
    assert loss.coef == pytest.approx(initial)
