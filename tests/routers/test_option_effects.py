"""Registry-wide: every common option a preset accepts changes something it computes, or is refused.

For each preset and each common option (``CommonOptions``), the option is set to
another value (``ALTERNATIVES``, or a generic change of its default) and a short training
run is compared with the default one: routing, gates, outputs, losses, router gradients and
state after ``end_of_step`` over three steps, then an eval forward. Losses count through their
gradients (to the router's parameters and to its input, which trains the layers below), not
through their reported values. An option that changes
none of them must be refused by ``create_router`` with a ``ConfigError`` naming it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

import routelab
from routelab.routers import CommonOptions
from tests.helpers import ALL_PRESETS, make_layer, preset, side_inputs

D_MODEL, NUM_EXPERTS, BATCH, SEQ, STEPS = 8, 8, 2, 12, 3

# Values to switch to, where changing the default generically would not be valid or telling.
ALTERNATIVES: dict[str, Any] = {
    "capacity_factor": 0.5,
    "drop_policy": "position",
    "jitter_eps": 0.5,
    "router_init_std": 0.5,
    "normalization": "pre_softmax_norenorm",
    "bias_step_rule": "proportional",
    "bias_counts": "before_drops",
    "bias_update_rate": 0.3,
    "bias_clamp": 1e-4,
    "scaling_factor": 1.7,
    "num_groups": 2,
    "group_topk": 2,
    "seed": 5,
    "vocab_size": 53,
}
# Per preset, where the generic value is not valid for it.
PRESET_ALTERNATIVES: dict[tuple[str, str], Any] = {}
# Options whose effect needs another option set (in both runs).
CONTEXT: dict[str, dict[str, Any]] = {
    "drop_policy": {"capacity_factor": 0.5},
    "bias_counts": {"capacity_factor": 0.5},
    "group_topk": {"num_groups": 4},
}


def alternative(name: str, option: str, default: Any) -> Any:
    if (name, option) in PRESET_ALTERNATIVES:
        return PRESET_ALTERNATIVES[(name, option)]
    if option in ALTERNATIVES:
        return ALTERNATIVES[option]
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default * 2 if default else 1
    if isinstance(default, float):
        return default * 3 if default else 0.1
    raise AssertionError(f"no alternative value for {name}.{option} (default {default!r}); add one to ALTERNATIVES")


def fingerprint(name: str, options: dict[str, Any]) -> list[torch.Tensor]:
    layer = make_layer(name, d_model=D_MODEL, num_experts=NUM_EXPERTS, seed=0, **options).train()
    extra = side_inputs(BATCH, SEQ)
    g = torch.Generator().manual_seed(1)
    target = torch.randn(BATCH, SEQ, D_MODEL, generator=g)
    seen: list[torch.Tensor] = []
    for _ in range(STEPS):
        x = torch.randn(BATCH, SEQ, D_MODEL, generator=g).requires_grad_()
        torch.manual_seed(7)  # the same noise draws in both runs
        out = layer(x, token_ids=extra["token_ids"], attention=extra["attention"], timestep=extra["timestep"])
        loss = (out.y * target).sum() + out.aux_loss
        layer.zero_grad()
        loss.backward()
        r = out.routing
        seen += [out.y.detach(), r.topk_idx, r.topk_weight.detach(), x.grad]
        seen += [p.grad.clone() for p in layer.router.parameters() if p.grad is not None]
        with torch.no_grad():
            for p in layer.router.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
        routelab.end_of_step(layer)
        seen += [b.detach().clone() for b in layer.router.buffers()]
    layer.eval()
    with torch.no_grad():
        out = layer(torch.randn(BATCH, SEQ, D_MODEL, generator=g), token_ids=extra["token_ids"],
                    attention=extra["attention"], timestep=extra["timestep"])
    return seen + [out.y, out.routing.topk_idx, out.routing.topk_weight]


def differs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return True
    return any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, b))


COMMON_OPTIONS = tuple(f.name for f in dataclasses.fields(CommonOptions))
CASES = [(name, option) for name in ALL_PRESETS for option in COMMON_OPTIONS]


@pytest.mark.parametrize("name, option", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_every_accepted_option_changes_an_output_or_is_refused(name, option):
    info = preset(name)
    default = info.options()[option]
    context = {k: v for k, v in CONTEXT.get(option, {}).items() if k in info.options()}
    changed = alternative(name, option, default)
    assert changed != default
    try:
        baseline = fingerprint(name, context)
    except routelab.ConfigError:  # the preset refuses what the option would need: test it alone
        context = {}
        baseline = fingerprint(name, context)
    try:
        modified = fingerprint(name, {**context, option: changed})
    except routelab.ConfigError as err:
        assert option in str(err), f"{name} refused {option}={changed!r} without naming it: {err}"
        return
    assert differs(baseline, modified), f"{name}: {option}={changed!r} (default {default!r}) changes nothing"
