"""Oracle tests of the loss-free balancing options (Wang et al. 2024, arXiv 2408.15664):
``bias_step_rule`` sign/proportional/decaying, ``bias_recenter``, ``bias_clamp``.

Every case is computed by hand from the update rules in ``routelab.routers.parts.balancers``; the
logit gaps are large, so the small biases never change which experts are selected and the
loads of every step are known in advance.
"""

from __future__ import annotations

import pytest
import torch

import routelab

# top-1 choices: experts 0, 0, 0, 1 -> loads [3, 1, 0, 0], mean 1
ROWS = torch.tensor([[8.0, 0, 0, 0], [8.0, 0, 0, 0], [8.0, 0, 0, 0], [0, 8.0, 0, 0]])
LOADS = [3.0, 1.0, 0.0, 0.0]


def trained_bias(steps: int, **options) -> list[float]:
    router = routelab.create_router("loss-free", d_model=4, num_experts=4, top_k=1, bias_update_rate=0.01, **options)
    with torch.no_grad():
        router.scorer.weight.copy_(torch.eye(4))
    router.train()
    for _ in range(steps):
        out = router(ROWS)
        assert out.topk_idx[:, 0].tolist() == [0, 0, 0, 1]
        routelab.end_of_step(router)
    return router.balancer.bias.tolist()


def test_sign_rule():
    assert trained_bias(2) == pytest.approx([2 * -0.01, 0.0, 2 * 0.01, 2 * 0.01])


def test_proportional_rule_steps_by_the_relative_load_error():
    step = [0.01 * (1.0 - c) / 1.0 for c in LOADS]  # u * (mean - c) / mean
    assert trained_bias(2, bias_step_rule="proportional") == pytest.approx([2 * s for s in step])


def test_decaying_rule_divides_the_step_by_the_update_count():
    step = [0.01 * (1.0 - c) for c in LOADS]
    expected = [s / 1 + s / 2 + s / 3 for s in step]
    assert trained_bias(3, bias_step_rule="decaying") == pytest.approx(expected)


def test_recenter_subtracts_the_mean_bias_after_each_update():
    raw = [-0.01, 0.0, 0.01, 0.01]  # one sign step
    mean = sum(raw) / 4
    assert trained_bias(1, bias_recenter=True) == pytest.approx([b - mean for b in raw])
    assert sum(trained_bias(3, bias_recenter=True)) == pytest.approx(0.0, abs=1e-8)  # fp32


def test_clamp_bounds_the_bias():
    assert trained_bias(3, bias_clamp=0.015) == pytest.approx([-0.015, 0.0, 0.015, 0.015])
    assert trained_bias(3) == pytest.approx([-0.03, 0.0, 0.03, 0.03])  # the same steps unclamped


def test_no_update_without_a_training_forward():
    router = routelab.create_router("loss-free", d_model=4, num_experts=4, top_k=1)
    router.eval()
    router(ROWS)
    routelab.end_of_step(router)
    assert router.balancer.bias.tolist() == [0.0] * 4
