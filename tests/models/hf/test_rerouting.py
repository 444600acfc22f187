"""Test-time rerouting (Rewiring Experts on the Fly) on tiny transformers MoE models.

Oracles: delta = 0 is the identity; a large positive delta_e puts e into every token's
top-k of that layer; the autograd gradient of the context loss w.r.t. delta equals central
finite differences; per-request deltas only see their own sequence; fitting lowers the
context loss; confidence-based layer selection picks a layer made confident by hand.
"""

from __future__ import annotations

import pytest
import torch

from routelab.core.errors import ConfigError
from routelab.models.hf import Rerouter, attach
from routelab.models.hf.rerouting import next_token_loss
from tests.hf_tiny import ARCH_NAMES, KeepCalls, tiny_batch, tiny_model

pytest.importorskip("transformers")


def context_loss(model, ids, mask):
    with torch.no_grad():
        return float(next_token_loss(model(ids, attention_mask=mask).logits, ids, mask.bool()))


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_zero_delta_is_identity_and_large_delta_forces_the_expert(arch):
    model = tiny_model(arch)
    ids, mask = tiny_batch(padded=True)
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    with attach(model) as handle:
        rerouter = Rerouter(handle, layers=[1], steps=0)
        rerouter.fit(ids, mask)
        assert list(rerouter.deltas()) == [1] and rerouter.deltas()[1].shape == (2, handle.num_experts)
        with torch.no_grad():
            assert torch.equal(model(ids, attention_mask=mask).logits, before)
        expert = handle.num_experts - 1
        with torch.no_grad():
            rerouter.deltas()[1][:, expert] = 50.0
        keep = handle.add_observer(KeepCalls())
        with torch.no_grad():
            model(ids, attention_mask=mask)
        layer0, layer1 = keep.calls
        assert bool((layer1.topk_idx_TK == expert).any(dim=1).all())  # in every real token's top-k
        baseline = KeepCalls()
        rerouter.reset()
        handle.add_observer(baseline)
        with torch.no_grad():
            model(ids, attention_mask=mask)
        assert torch.equal(baseline.calls[0].topk_idx_TK, layer0.topk_idx_TK)  # other layer untouched
        assert handle.routelab_router(1) is None  # reset put the model's own router back


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_delta_gradient_matches_finite_differences(arch):
    model = tiny_model(arch).double()
    model.config._experts_implementation = "eager"  # grouped_mm has no fp64
    with torch.no_grad():  # a decisive router and loud experts: the gates matter well above rounding
        model.model.layers[0].mlp.experts.down_proj.mul_(30.0)
        mlp = model.model.layers[0].mlp
        (mlp.router if hasattr(mlp, "router") else mlp.gate).weight.mul_(30.0)
    ids, mask = tiny_batch(padded=True)
    with attach(model) as handle:
        rerouter = Rerouter(handle, layers=[0], steps=0, per_request=False)
        rerouter.fit(ids, mask)
        delta = rerouter.deltas()[0]
        with torch.no_grad():
            delta.copy_(torch.linspace(-0.05, 0.05, delta.numel()))
        loss = next_token_loss(model(ids, attention_mask=mask).logits, ids, mask.bool())
        (grad,) = torch.autograd.grad(loss, [delta])
        eps = 1e-2  # well below the smallest gap between a selected and an unselected logit
        numeric = torch.zeros_like(delta)
        for e in range(delta.numel()):
            with torch.no_grad():
                delta[e] += eps
                up = context_loss(model, ids, mask)
                delta[e] -= 2 * eps
                down = context_loss(model, ids, mask)
                delta[e] += eps
            numeric[e] = (up - down) / (2 * eps)
        assert grad.abs().max() > 1e-3
        torch.testing.assert_close(grad, numeric, atol=1e-5, rtol=1e-2)


def test_per_request_delta_sees_only_its_own_sequence():
    model = tiny_model("qwen3_moe")
    ids, mask = tiny_batch(padded=True)
    other = ids.clone()
    other[1, 3:] = torch.flip(other[1, 3:], dims=[0])
    grads = []
    with attach(model) as handle:
        for batch in (ids, other):
            rerouter = Rerouter(handle, layers=[0, 1], steps=0)
            rerouter.fit(batch, mask)
            deltas = list(rerouter.deltas().values())
            loss = next_token_loss(model(batch, attention_mask=mask).logits, batch, mask.bool())
            grads.append(torch.autograd.grad(loss, deltas))
            rerouter.reset()
    for first, second in zip(*grads):
        torch.testing.assert_close(first[0], second[0], rtol=1e-5, atol=1e-9)  # row 0: the same sequence
        assert (first[1] - second[1]).abs().max() > 100 * (first[0] - second[0]).abs().max() + 1e-7


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_fit_lowers_the_context_loss_and_freezes_the_model(arch):
    model = tiny_model(arch)
    ids, mask = tiny_batch(padded=True)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with attach(model) as handle:
        history = Rerouter(handle, layers=[0, 1], steps=8, lr=0.5).fit(ids, mask)
        assert history[-1] < history[0] - 1e-4
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_layer_selection_by_routing_confidence():
    model = tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[1].mlp.gate.weight.mul_(200.0)  # layer 1 routes decisively
    ids, mask = tiny_batch()
    with attach(model) as handle:
        for rule in ("max_prob", "entropy"):
            assert Rerouter(handle, layer_ratio=0.5, confidence=rule).select_layers(ids, mask) == [1]
    with pytest.raises(ConfigError):
        Rerouter(handle, confidence="vibes")
    with pytest.raises(ConfigError, match="no option"):
        Rerouter(handle, stepz=3)


def test_generate_refits_every_interval_and_matches_plain_generation_without_steps():
    model = tiny_model("olmoe")
    ids, mask = tiny_batch(padded=True)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    with attach(model) as handle:
        rerouter = Rerouter(handle, layers=[0], steps=0, interval=2)
        out = rerouter.generate(ids, mask, max_new_tokens=5, do_sample=False)
        assert len(rerouter.losses) == 3  # prefill, after 2 and after 4 generated tokens
        assert torch.equal(out, plain)
        rerouter.reset()
        fitted = Rerouter(handle, layers=[0], steps=2, lr=0.5, interval=3)
        out = fitted.generate(ids, mask, max_new_tokens=5, do_sample=False)
        assert out.shape == (2, 14) and len(fitted.losses) == 2
