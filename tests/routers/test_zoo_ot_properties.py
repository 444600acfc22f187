"""Router-agnostic properties for the transport, balancing, geometry and ReLU presets.

Evaluation mode throughout (training-mode Sinkhorn/BASE/BIP couple the tokens of a batch by
design); each property is skipped only where the preset declares an exemption.
"""

from __future__ import annotations

import pytest
import torch

from routelab import MoE, create_router, end_of_step, preset_info
from routelab.core.context import TokenBatch

PRESETS = ["base", "sinkhorn", "ssr", "ec-dlm", "bip", "cosine", "sra", "kmeans", "remoe", "blockffn"]
EXTRA = {"ssr": {"p_sel": 0.5}}


def _router(name, top_k=None, **options):
    torch.manual_seed(0)
    return create_router(name, d_model=16, num_experts=8, top_k=top_k, **{**EXTRA.get(name, {}), **options})


@pytest.mark.parametrize("name", PRESETS)
def test_registered_with_paper(name):
    info = preset_info(name)
    assert info.paper and info.description
    assert info.builder.__doc__


@pytest.mark.parametrize("name", PRESETS)
def test_eval_token_permutation_equivariance(name):
    router = _router(name).eval()
    x = torch.randn(24, 16)
    perm = torch.randperm(24)
    base, permuted = router(x), router(x[perm])
    assert torch.equal(base.topk_idx[perm].sort(1).values, permuted.topk_idx.sort(1).values)
    assert torch.allclose(base.dense_gates()[perm], permuted.dense_gates(), atol=1e-6)


@pytest.mark.parametrize("name", PRESETS)
def test_padding_does_not_change_real_tokens(name):
    layer = MoE(d_model=16, d_hidden=16, num_experts=8, router=_router(name)).eval()
    x = torch.randn(2, 10, 16)
    padded = torch.cat([x, torch.randn(2, 4, 16)], dim=1)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[:, 10:] = False
    out, out_padded = layer(x), layer(padded, padding_mask=mask)
    assert torch.equal(out.routing.topk_idx, out_padded.routing.topk_idx)
    assert torch.allclose(out.y, out_padded.y[:, :10], atol=1e-5)
    assert torch.equal(out_padded.y[:, 10:], torch.zeros(2, 4, 16))


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("training", [False, True])
def test_empty_slots_and_weight_sums(name, training):
    router = _router(name).train(training)
    routing = router(torch.randn(32, 16))
    empty = routing.topk_idx < 0
    assert bool((routing.topk_weight[empty] == 0).all())
    assert torch.isfinite(routing.topk_weight).all()
    if "weights_sum_to_one" not in preset_info(name).exemptions:
        assert torch.allclose(routing.topk_weight.sum(1), torch.ones(32), atol=1e-5)


@pytest.mark.parametrize("name", [n for n in PRESETS if n != "ec-dlm"])
def test_capacity_is_never_exceeded(name):
    router = _router(name, capacity_factor=1.0).train()
    x = torch.randn(64, 16) + 2.0  # a shared offset skews the routing
    routing = router(x)
    assert routing.capacity is not None
    assert float(routing.stats["load"].max()) <= routing.capacity


@pytest.mark.parametrize("name", PRESETS)
def test_two_layer_toy_model_trains_and_state_round_trips(name):
    torch.manual_seed(1)
    layers = torch.nn.ModuleList(MoE(d_model=16, d_hidden=16, num_experts=8, router=_router(name)) for _ in range(2))
    head = torch.nn.Linear(16, 16)
    params = [p for p in list(layers.parameters()) + list(head.parameters()) if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-2)
    x, target = torch.randn(4, 16, 16), torch.randn(4, 16, 16)
    timestep = torch.rand(4)
    for _ in range(3):
        h, aux = x, 0.0
        for layer in layers:
            out = layer(h, timestep=timestep)
            h, aux = h + out.y, aux + out.aux_loss
        loss = (head(h) - target).square().mean() + aux
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)
        optimizer.step()
        end_of_step(layers)
    assert torch.isfinite(loss)
    clone = torch.nn.ModuleList(MoE(d_model=16, d_hidden=16, num_experts=8, router=_router(name)) for _ in range(2))
    clone.load_state_dict(layers.state_dict())
    layers.eval(), clone.eval()
    for a, b in zip(layers, clone):
        assert torch.equal(a(x, timestep=timestep).routing.topk_idx, b(x, timestep=timestep).routing.topk_idx)


@pytest.mark.parametrize("name", PRESETS)
def test_empty_batch(name):
    router = _router(name).eval()
    routing = router(torch.zeros(0, 16), TokenBatch.from_mask(1, 4, torch.zeros(1, 4, dtype=torch.bool)))
    assert routing.topk_idx.shape[0] == 0
