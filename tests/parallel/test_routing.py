"""Routing from gathered logits equals routing from the hidden states, for every preset that
``auto`` sends that way (single process: the tail of the router run on the logits alone)."""

from __future__ import annotations

import copy

import pytest
import torch

import routelab
from routelab.core.errors import ConfigError
from routelab.parallel.layer import ExpertParallelMoE
from routelab.parallel.routing import (
    check_router_supported,
    has_stateful_scorer,
    reads_activations_after_scoring,
    route_from_logits,
    score_locally,
)

PRESETS = [info["name"] for info in routelab.list_routers()]


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return routelab.moe_layer(d_model=16, d_hidden=16, num_experts=8, router=name)


@pytest.mark.parametrize("name", PRESETS)
def test_logits_route_matches_or_auto_gathers_tokens(name: str) -> None:
    layer = build(name)
    if type(layer) is not routelab.MoE or any(getattr(m, "uses_experts", False) for m in layer.router.modules()):
        return  # refused under EP (test below)
    x = torch.randn(2, 8, 16)
    ids = torch.randint(0, 100, (2, 8))
    attention = torch.softmax(torch.randn(2, 8, 8), dim=-1)
    x_TD, batch = layer.real_tokens(x, None, ids, attention=attention, timestep=torch.rand(2))
    router = layer.router.train()
    twin = copy.deepcopy(router)
    torch.manual_seed(1)
    reference = router(x_TD, batch)
    if reads_activations_after_scoring(twin) or has_stateful_scorer(twin):
        return  # 'auto' gathers the hidden states: the router itself runs on the global batch
    torch.manual_seed(1)
    logits_TE, leftovers = score_locally(twin, x_TD, batch)
    if leftovers:
        return  # 'auto' gathers the hidden states
    routing = route_from_logits(twin, logits_TE, batch, x_TD.shape[1])
    assert torch.equal(routing.topk_idx, reference.topk_idx)
    torch.testing.assert_close(routing.topk_weight, reference.topk_weight)
    torch.testing.assert_close(routing.aux_loss, reference.aux_loss)
    for key, value in reference.stats.items():
        torch.testing.assert_close(torch.as_tensor(routing.stats[key]).float(), torch.as_tensor(value).float(), msg=key)


@pytest.mark.parametrize("name", ["erc", "moe-x"])
def test_routers_that_read_expert_weights_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="reads the experts' weights"):
        check_router_supported(build(name).router)


def test_soft_moe_is_refused() -> None:
    with pytest.raises(ConfigError, match="distributes routelab.MoE layers"):
        ExpertParallelMoE(build("soft-moe"), group=None)  # type: ignore[arg-type]
