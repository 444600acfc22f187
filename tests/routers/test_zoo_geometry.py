"""Geometric routers: low-dimensional cosine, SRA, online k-means; multi-hop halting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

import routelab
from routelab import MoE, create_router, end_of_step
from routelab.core.errors import ConfigError
from routelab.moe import apply_hops
from routelab.routers.families.geometry import BandpassLoss, default_band


# --- cosine routing ---------------------------------------------------------------------


@pytest.mark.parametrize("name, top_k", [("cosine", 1), ("cosine", 2), ("sra", 2)])
def test_cosine_routing_is_scale_invariant_and_bounded(name, top_k):
    torch.manual_seed(0)
    router = create_router(name, d_model=32, num_experts=8, top_k=top_k).eval()
    x = torch.randn(50, 32)
    small, big = router(x), router(10 * x)
    assert torch.equal(small.topk_idx, big.topk_idx)
    assert torch.allclose(small.topk_weight, big.topk_weight, atol=1e-5)
    tau = float(router.scorer.tau.detach().abs())
    assert float(small.logits.detach().abs().max()) <= tau + 1e-5
    if top_k > 1:
        assert torch.allclose(small.topk_weight.sum(1), torch.ones(50), atol=1e-6)
    else:  # top-1 keeps the full-softmax probability (no gradient starvation)
        assert torch.allclose(small.topk_weight[:, 0], torch.softmax(small.logits, -1).max(1).values)


def test_cosine_parameter_count_and_negative_tau():
    router = create_router("cosine", d_model=128, num_experts=16, proj_dim=64)
    assert sum(p.numel() for p in router.parameters()) == 128 * 64 + 16 * 64 + 1
    with torch.no_grad():
        router.scorer.tau.fill_(-10.0)
    x = torch.randn(20, 128)
    flipped = router(x)
    with torch.no_grad():
        router.scorer.tau.fill_(10.0)
    assert torch.equal(router(x).topk_idx, flipped.topk_idx)  # |tau|: a sign flip changes nothing


def test_bandpass_loss_by_hand():
    low, high = default_band(128)
    assert (low, high) == pytest.approx((1e-3, 2e-2))
    loss = BandpassLoss(1.0, 0.1, 0.3)

    class Draft:
        num_experts = 4

        def probs_TE(self):
            return torch.tensor([[0.6, 0.2, 0.2, 0.0], [0.6, 0.2, 0.2, 0.0]])

    # mean probs (.6, .2, .2, 0): ceiling .3 -> .3^2; floor .1 -> .1^2; E^2 * mean = 16 * (.09 + .01) / 4
    assert float(loss(Draft())) == pytest.approx(0.4)
    with pytest.raises(ConfigError, match="bandpass"):
        BandpassLoss(1.0, 0.3, 0.1)


def test_sra_has_bandpass_loss_and_cosine_options_checked():
    router = create_router("sra", d_model=16, num_experts=8)
    routing = router(torch.randn(20, 16))
    assert "bandpass" in routing.losses and routing.aux_loss.requires_grad
    with pytest.raises(ConfigError, match="proj_dim"):
        create_router("cosine", d_model=16, num_experts=8, proj_dim=0)
    with pytest.raises(ConfigError, match="tau_init"):
        create_router("cosine", d_model=16, num_experts=8, tau_init=0.0)


# --- multi-hop halting ------------------------------------------------------------------


def test_halting_threshold_limits():
    torch.manual_seed(1)
    layer = MoE(d_model=16, d_hidden=32, num_experts=4, router="cosine").eval()
    x = torch.randn(2, 9, 16)
    plain = apply_hops(layer, x, hops=3)
    never = apply_hops(layer, x, hops=3, halt_threshold=0.0)
    once = apply_hops(layer, x, hops=3, halt_threshold=float("inf"))
    assert torch.equal(plain.h, never.h)
    assert plain.hops_per_token.unique().tolist() == [3] and plain.token_hops == 54
    assert once.hops_per_token.unique().tolist() == [1] and once.token_hops == 18
    assert torch.allclose(once.h, x + layer(x).y)


def test_halting_skips_halted_tokens():
    torch.manual_seed(2)
    layer = MoE(d_model=16, d_hidden=32, num_experts=4, router="cosine").eval()
    x = torch.randn(1, 12, 16)
    first = layer(x).y.detach()
    ratio = first.norm(dim=-1) / x.norm(dim=-1)
    theta = float(ratio.median())
    out = apply_hops(layer, x, hops=2, halt_threshold=theta)
    halted = ratio < theta
    assert out.hops_per_token[halted].unique().tolist() == [1]
    assert out.hops_per_token[~halted].unique().tolist() == [2]
    assert torch.allclose(out.h[halted], (x + first)[halted])
    assert out.flop_fraction(2) == pytest.approx((12 + int((~halted).sum())) / 24)
    with pytest.raises(ConfigError, match="halt_threshold"):
        apply_hops(layer, x, hops=2, halt_threshold=-1.0)


# --- online k-means ---------------------------------------------------------------------


def _kmeans(**options):
    router = create_router("kmeans", d_model=2, num_experts=2, top_k=1, **options).train()
    with torch.no_grad():
        router.scorer.centroids.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        router.scorer.initialized.fill_(True)
    return router


def test_kmeans_centroids_equal_mean_of_routed_states():
    router = _kmeans()
    x1 = torch.tensor([[2.0, 0.1], [3.0, -0.2], [0.1, 5.0], [-0.2, 1.0]])
    router(x1)
    assert torch.equal(router.scorer.centroids, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))  # only end_of_step moves them
    end_of_step(router)
    x1_hat = F.normalize(x1, dim=-1)
    expected = torch.stack([x1_hat[:2].mean(0), x1_hat[2:].mean(0)])
    assert torch.allclose(router.scorer.centroids, expected, atol=1e-6)
    x2 = torch.tensor([[1.0, 0.3], [0.2, 2.0], [0.3, 1.0]])
    router(x2)
    end_of_step(router)
    x2_hat = F.normalize(x2, dim=-1)
    expected = torch.stack([torch.cat([x1_hat[:2], x2_hat[:1]]).mean(0), torch.cat([x1_hat[2:], x2_hat[1:]]).mean(0)])
    assert torch.allclose(router.scorer.centroids, expected, atol=1e-6)
    assert router.scorer.counts.tolist() == [3.0, 4.0]


def test_kmeans_ema_update_and_reseeding():
    router = _kmeans(kmeans_update="ema", kmeans_ema_rate=0.5, kmeans_reseed_after=2, seed=0)
    x = torch.tensor([[1.0, 0.1], [2.0, -0.1]])  # both tokens go to expert 0; expert 1 starves
    router(x)
    end_of_step(router)
    x_hat = F.normalize(x, dim=-1)
    assert torch.allclose(router.scorer.centroids[0], 0.5 * torch.tensor([1.0, 0.0]) + 0.5 * x_hat.mean(0), atol=1e-6)
    assert torch.equal(router.scorer.centroids[1], torch.tensor([0.0, 1.0]))
    router(x)
    end_of_step(router)  # expert 1 unused for 2 steps -> re-seeded with a token of the batch
    reseeded = router.scorer.centroids[1]
    assert any(torch.allclose(reseeded, row) for row in x_hat)


def test_kmeans_learns_clusters():
    torch.manual_seed(3)
    num_experts, dim = 4, 16
    means = F.normalize(torch.randn(num_experts, dim), dim=-1) * 4

    def sample(n):
        labels = torch.randint(num_experts, (n,))
        return means[labels] + 0.3 * torch.randn(n, dim), labels

    router = create_router("kmeans", d_model=dim, num_experts=num_experts, top_k=1, seed=0).train()
    assert sum(p.numel() for p in router.parameters()) == 0
    for _ in range(15):
        router(sample(256)[0])
        end_of_step(router)
    cos = F.normalize(router.scorer.centroids, dim=-1) @ F.normalize(means, dim=-1).t()
    rows, cols = linear_sum_assignment(cos.numpy(), maximize=True)
    assert float(cos[rows, cols].min()) > 0.99
    x, labels = sample(512)
    assigned = router.eval()(x).topk_idx[:, 0]
    mapping = {int(r): int(c) for r, c in zip(rows, cols)}
    accuracy = float((torch.tensor([mapping[int(a)] for a in assigned]) == labels).float().mean())
    assert accuracy == 1.0


def test_kmeans_gates_and_bad_options():
    router = create_router("kmeans", d_model=8, num_experts=4, top_k=2, kmeans_gate="uniform")
    routing = router(torch.randn(10, 8))
    assert torch.equal(routing.topk_weight, torch.full((10, 2), 0.5))
    with pytest.raises(ConfigError, match="kmeans_update"):
        create_router("kmeans", d_model=8, num_experts=4, kmeans_update="median")
    with pytest.raises(ConfigError, match="kmeans_gate"):
        create_router("kmeans", d_model=8, num_experts=4, kmeans_gate="sigmoid")
    with pytest.raises(ConfigError, match="kmeans_tau"):
        create_router("kmeans", d_model=8, num_experts=4, kmeans_tau=0.0)


def test_kmeans_state_dict_roundtrip_and_first_batch_init():
    torch.manual_seed(4)
    router = create_router("kmeans", d_model=8, num_experts=4, seed=1).train()
    x = torch.randn(32, 8)
    router(x)
    assert not bool(router.scorer.initialized)
    end_of_step(router)
    assert bool(router.scorer.initialized)
    rows = F.normalize(x, dim=-1)
    for centroid in router.scorer.centroids:  # k-means++ picks tokens of the first batch
        assert any(torch.allclose(centroid, row) for row in rows)
    clone = create_router("kmeans", d_model=8, num_experts=4)
    clone.load_state_dict(router.state_dict())
    assert torch.equal(clone.eval()(x).topk_idx, router.eval()(x).topk_idx)


@pytest.mark.parametrize("router", ["cosine", "sra"])
def test_bandpass_loss_acts_only_outside_its_band(router):
    """E^2 mean_e relu(p_lo - P_e)^2 + relu(P_e - p_hi)^2: zero inside the band, positive (with a
    gradient into the router) when every load is below a raised lower edge; absent at coefficient 0."""
    torch.manual_seed(0)
    x = torch.randn(2, 12, 8)
    off = routelab.moe_layer(d_model=8, d_hidden=12, num_experts=8, router=router, bandpass_loss_coef=0.0).train()
    assert "bandpass" not in off(x).routing.losses
    torch.manual_seed(0)
    wide = routelab.moe_layer(d_model=8, d_hidden=12, num_experts=8, router=router, bandpass_loss_coef=0.1,
                              bandpass_low=0.0, bandpass_high=1.0).train()
    assert float(wide(x).routing.losses["bandpass"]) == 0.0
    torch.manual_seed(0)
    low = routelab.moe_layer(d_model=8, d_hidden=12, num_experts=8, router=router, bandpass_loss_coef=0.1,
                             bandpass_low=0.9, bandpass_high=1.0).train()
    out = low(x)
    assert float(out.routing.losses["bandpass"]) > 0
    out.aux_loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in low.router.parameters())
