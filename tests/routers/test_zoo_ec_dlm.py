"""Expert choice with timestep-dependent capacity (EC-DLM)."""

from __future__ import annotations

import math

import pytest
import torch

from routelab import MoE, create_router
from routelab.core.context import RoutingContext, TokenBatch
from routelab.core.errors import ConfigError, InputError
from routelab.routers.families.ec_dlm import SCHEDULES, norm_matching_factors, timestep_top_k


def test_linear_reverse_table_and_mean():
    k = timestep_top_k(torch.tensor([0.0, 0.25, 0.5, 1.0]), "linear_reverse", 8, 32)
    assert k.tolist() == [32, 26, 20, 8]
    grid = torch.linspace(0, 1, 10_001, dtype=torch.float64)
    assert float(timestep_top_k(grid, "linear_reverse", 8, 32).double().mean()) == pytest.approx(20.0, abs=1e-9)


def test_schedule_values_by_hand():
    r = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    # cosine: 8 + 24 * (1 - cos(pi r)) / 2 -> 8, 11.51, 20, 28.49, 32
    assert timestep_top_k(r, "cosine", 8, 32).tolist() == [8, 12, 20, 28, 32]
    assert timestep_top_k(r, "cosine_reverse", 8, 32).tolist() == [32, 28, 20, 12, 8]
    # bell: 1 - 4 (r - 1/2)^2 -> 0, .75, 1, .75, 0
    assert timestep_top_k(r, "bell", 8, 32).tolist() == [8, 26, 32, 26, 8]
    # Gaussian bell with sigma .22: exactly k_min at the edges and k_max at the centre
    sigma, edge = 0.22, math.exp(-1 / (8 * 0.22**2))
    mid = (math.exp(-(0.25**2) / (2 * sigma**2)) - edge) / (1 - edge)
    assert timestep_top_k(r, "bell_gaussian", 8, 32).tolist() == [8, round(8 + 24 * mid), 32, round(8 + 24 * mid), 8]
    assert timestep_top_k(r, "bell_gaussian_reverse", 8, 32).tolist() == [32, round(32 - 24 * mid), 8, round(32 - 24 * mid), 32]
    assert timestep_top_k(r, "linear", 8, 32).tolist() == [8, 14, 20, 26, 32]
    assert len(SCHEDULES) == 7


def _route(router, x_BLD, timestep):
    batch_size, seq_len, _ = x_BLD.shape
    batch = TokenBatch.from_mask(batch_size, seq_len, None, context=RoutingContext(timestep=timestep))
    return router(x_BLD.reshape(batch_size * seq_len, -1), batch), batch


def test_every_expert_takes_exactly_c_b_tokens_per_sequence():
    torch.manual_seed(0)
    num_experts, seq_len = 8, 32
    router = create_router("ec-dlm", d_model=16, num_experts=num_experts, top_k=4, k_min=2, k_max=6)
    timestep = torch.tensor([0.0, 0.5, 1.0])
    routing, batch = _route(router, torch.randn(3, seq_len, 16), timestep)
    k_b = timestep_top_k(timestep, "linear_reverse", 2, 6)
    assert k_b.tolist() == [6, 4, 2]
    mask = routing.mask()
    for b in range(3):
        per_expert = mask[batch.seq_id_T == b].sum(0)
        c_b = max(1, seq_len * int(k_b[b]) // num_experts)
        assert per_expert.tolist() == [c_b] * num_experts
        assert int(mask[batch.seq_id_T == b].sum()) == num_experts * c_b
    # post-softmax gates of every picked token sum to 1
    picked = (routing.topk_idx >= 0).any(1)
    assert torch.allclose(routing.topk_weight[picked].sum(1), torch.ones(int(picked.sum())), atol=1e-6)
    assert float(routing.stats["ec_mean_k"]) == pytest.approx(4.0)


def test_oracle_capacity_l16_e4_k2():
    router = create_router("ec-dlm", d_model=8, num_experts=4, top_k=2, k_min=2, k_max=2)
    routing, _ = _route(router, torch.randn(1, 16, 8), torch.tensor([0.3]))
    assert routing.stats["load"].tolist() == [8.0] * 4


def test_pre_softmax_and_sigmoid_gates():
    torch.manual_seed(1)
    x = torch.randn(2, 16, 8)
    t = torch.tensor([0.2, 0.9])
    pre = create_router("ec-dlm", d_model=8, num_experts=4, ec_gate="pre-softmax")
    routing, _ = _route(pre, x, t)
    probs = torch.softmax(routing.logits, -1)
    valid = routing.topk_idx >= 0
    assert torch.allclose(routing.topk_weight[valid], probs.gather(1, routing.topk_idx.clamp_min(0))[valid])
    sig = create_router("ec-dlm", d_model=8, num_experts=4, ec_gate="sigmoid")
    sig.load_state_dict(pre.state_dict())
    routing, _ = _route(sig, x, t)
    picked = (routing.topk_idx >= 0).any(1)
    assert torch.allclose(routing.topk_weight[picked].sum(1), torch.ones(int(picked.sum())), atol=1e-6)


def test_norm_matching_factors():
    factors = norm_matching_factors(8, 2)
    assert factors.shape == (9,)
    assert float(factors[0]) == 1.0
    assert float(factors[1]) == pytest.approx(math.sqrt(2), abs=1e-6)  # one renormalised prob has norm 1
    assert bool((factors[2:] > factors[1:-1]).all())  # more experts -> flatter gates -> larger factor
    assert float(factors[8]) < math.sqrt(2) * math.sqrt(8)  # bounded by the uniform case
    assert torch.equal(norm_matching_factors(8, 2), factors)  # seed 42: deterministic
    router = create_router("ec-dlm", d_model=8, num_experts=8, norm_match_shared=2)
    plain = create_router("ec-dlm", d_model=8, num_experts=8)
    plain.load_state_dict(router.state_dict())
    x, t = torch.randn(1, 16, 8), torch.tensor([0.5])
    scaled, _ = _route(router, x, t)
    base, _ = _route(plain, x, t)
    n_T = (base.topk_idx >= 0).sum(1)
    assert torch.allclose(scaled.topk_weight, base.topk_weight * factors[n_T].unsqueeze(1))


def test_timestep_from_moe_layer_and_padding_invariance():
    torch.manual_seed(2)
    layer = MoE(d_model=8, d_hidden=8, num_experts=4, top_k=2, router="ec-dlm").eval()
    x = torch.randn(2, 10, 8)
    t = torch.tensor([0.1, 0.8])
    out = layer(x, timestep=t)
    padded = torch.cat([x, torch.randn(2, 3, 8)], dim=1)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[:, 10:] = False
    out_padded = layer(padded, padding_mask=mask, timestep=t)
    assert torch.equal(out.routing.topk_idx, out_padded.routing.topk_idx)
    assert torch.allclose(out.y, out_padded.y[:, :10], atol=1e-6)


def test_timestep_errors():
    layer = MoE(d_model=8, d_hidden=8, num_experts=4, router="ec-dlm")
    x = torch.randn(2, 6, 8)
    with pytest.raises(InputError, match="timestep"):
        layer(x, timestep=torch.tensor([0.5]))
    with pytest.raises(InputError, match="timestep"):
        layer(x, timestep=torch.tensor([0.5, 1.5]))
    strict = MoE(d_model=8, d_hidden=8, num_experts=4, router="ec-dlm", missing_timestep="error")
    with pytest.raises(InputError, match="timestep"):
        strict(x)
    assert torch.isfinite(layer(x).y).all()  # static top_k without a timestep


@pytest.mark.parametrize(
    "options, match",
    [({"ec_schedule": "sqrt"}, "ec_schedule"), ({"k_min": 5, "k_max": 3}, "k_min"), ({"ec_gate": "softmax2"}, "ec_gate"),
     ({"bell_sigma": 0.0}, "bell_sigma"), ({"k_max": 9}, "k_max")],
)
def test_ec_dlm_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        create_router("ec-dlm", d_model=8, num_experts=8, **options)


def test_default_k_range_follows_top_k():
    router = create_router("ec-dlm", d_model=8, num_experts=512, top_k=20)
    assert (router.selector.k_min, router.selector.k_max) == (8, 32)
