"""RoMA router fine-tuning on tiny transformers MoE models.

Oracles (hand-computed): r_i = [1,0] with neighbours [0,1], [1,0] at cos .9, .5 and sigma .4
gives W = [.6792, .3208] and regulariser 1.3584 (0 when r_i equals every neighbour).
The regulariser is computed live, so it has a gradient w.r.t. the router weights that
matches finite differences (the published code's precomputed r_i has none). Training
changes the router parameters of the target layers only; everything else is
bit-identical.
"""

from __future__ import annotations

import pytest
import torch

from routelab.core.errors import ConfigError
from routelab.models.hf import (
    RomaTrainer,
    SuccessfulSet,
    attach,
    manifold_regulariser,
    mean_token_embedding,
    neighbour_weights,
    routing_vectors,
)
from routelab.models.hf.roma import RoutingVectorCapture
from tests.hf_tiny import ARCH_NAMES, tiny_batch, tiny_model

pytest.importorskip("transformers")


def router_of(model, layer):
    mlp = model.model.layers[layer].mlp
    return mlp.router if hasattr(mlp, "router") else mlp.gate


def test_regulariser_oracle():
    weights = neighbour_weights(torch.tensor([[0.9, 0.5]]), sigma=0.4)
    torch.testing.assert_close(weights, torch.tensor([[0.6792, 0.3208]]), atol=1e-4, rtol=0)
    r = torch.tensor([[1.0, 0.0]])
    neighbours = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert float(manifold_regulariser(r, neighbours, weights)) == pytest.approx(1.3584, abs=1e-4)
    same = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert float(manifold_regulariser(r, same, weights)) == 0.0
    with pytest.raises(ConfigError):
        neighbour_weights(torch.tensor([[0.9]]), sigma=0.0)


def successful_set(handle, layers, seed=5):
    ids = torch.randint(3, 96, (6, 8), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    embed = mean_token_embedding(handle.model)
    return SuccessfulSet.build(handle, [(ids[:3], mask[:3]), (ids[3:], mask[3:])], embed, layers), embed


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_live_regulariser_has_the_finite_difference_gradient(arch):
    model = tiny_model(arch).double()
    model.config._experts_implementation = "eager"
    with torch.no_grad():  # decisive routers: no top-k flips within the finite-difference step
        for layer in (0, 1):
            router_of(model, layer).weight.mul_(30.0)
    ids, mask = tiny_batch(padded=True)
    with attach(model) as handle:
        successful, embed = successful_set(handle, [0, 1])
        neighbours, weights = successful.neighbours(embed(ids, mask), 3, 0.4)
        capture = handle.add_observer(RoutingVectorCapture([0, 1], handle.num_experts))
        weight = router_of(model, 1).weight

        def regulariser():
            capture.per_layer = {}
            model(ids, attention_mask=mask)
            return manifold_regulariser(capture.vector().double(), neighbours.double(), weights.double())

        value = regulariser()
        (grad,) = torch.autograd.grad(value, [weight])
        assert grad.abs().max() > 1e-4  # the published implementation's gradient is exactly 0
        with torch.no_grad():
            detached = manifold_regulariser(capture.vector().detach(), neighbours, weights)
        assert not detached.requires_grad
        eps = 1e-3
        for e, d in [(0, 0), (1, 3), (handle.num_experts - 1, 7)]:
            with torch.no_grad():
                weight[e, d] += eps
                up = float(regulariser())
                weight[e, d] -= 2 * eps
                down = float(regulariser())
                weight[e, d] += eps
            assert grad[e, d].item() == pytest.approx((up - down) / (2 * eps), rel=1e-2, abs=1e-6)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_roma_trains_the_target_routers_only(arch):
    model = tiny_model(arch)
    ids, mask = tiny_batch(padded=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with attach(model) as handle:
        successful, embed = successful_set(handle, [1])
        with RomaTrainer(handle, successful, embed, layers=[1], k=3, lam=0.8, warmup_steps=2, lr=1e-2) as trainer:
            assert trainer.lam_at(1) == pytest.approx(0.4) and trainer.lam_at(5) == pytest.approx(0.8)
            logs = [trainer.step(ids, mask, labels=ids) for _ in range(3)]
        assert all(log["regulariser"] > 0 for log in logs)
    after = model.state_dict()
    router_keys = {f"model.layers.1.mlp.{'router' if arch == 'gpt_oss' else 'gate'}.{name}"
                   for name, _ in router_of(model, 1).named_parameters()}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == router_keys  # the router of layer 1 moved, nothing else did (buffers included)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_roma_regulariser_pulls_routing_towards_the_neighbours():
    model = tiny_model("olmoe")
    ids, mask = tiny_batch()
    with attach(model) as handle:
        successful, embed = successful_set(handle, [0, 1])
        neighbours, weights = successful.neighbours(embed(ids, mask), 3, 0.4)

        def distance():
            r = routing_vectors(handle, ids, mask, [0, 1])
            return float(manifold_regulariser(r, neighbours, weights))

        start = distance()
        trainer = RomaTrainer(handle, successful, embed, layers=[0, 1], k=3, lam=1.0, warmup_steps=1, lr=5e-2,
                              weight_decay=0.0, task_loss=lambda outputs, labels: outputs.logits.sum() * 0)
        for _ in range(10):
            trainer.step(ids, mask)
        trainer.close()
        assert distance() < start


def test_roma_errors():
    with attach(tiny_model("mixtral")) as handle:
        successful, embed = successful_set(handle, [1])
        with pytest.raises(ConfigError, match="routing vectors of size"):
            RomaTrainer(handle, successful, embed, layers=[0, 1])
        with pytest.raises(ConfigError, match="neighbours requested"):
            successful.neighbours(torch.zeros(1, 16), 7, 0.4)
        ids, mask = tiny_batch()
        with RomaTrainer(handle, successful, embed, layers=[1], k=2) as trainer:
            with pytest.raises(Exception, match="labels"):
                trainer.step(ids, mask)
