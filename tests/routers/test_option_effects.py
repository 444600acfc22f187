"""Registry-wide: every option a preset accepts changes something it computes, or is refused.

For each preset and each accepted option (common and specific), the option is set to
another value (``ALTERNATIVES``, or a generic change of its default) and a short training
run is compared with the default one: routing, gates, outputs, losses, router gradients and
state after ``end_of_step`` over three steps, then an eval forward. Losses count through their
gradients (to the router's parameters and to its input, which trains the layers below), not
through their reported values. An option that changes
none of them must be refused by ``create_router`` with a ``ConfigError`` naming it. Several
values are tried (choices are read from the option's own error message); one that changes
something, or a refusal naming the option, settles it.

``NOT_SHOWN_BY_PROBE`` lists the specific options whose effect this short probe does not
reach (long schedules, multi-layer state, options that need another one on in both runs);
they are skipped with that reason, visibly, and each names the test file that shows its
effect directly.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any

import pytest
import torch

import routelab
from routelab.routers import CommonOptions
from tests.helpers import ALL_PRESETS, preset, side_inputs

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
    "group_topk": 1,
    "seed": 5,
    "vocab_size": 53,
    "max_experts": 1,
    "k_min": 2,
    "k_max": 1,
    "target_sparsity": 0.5,
    "bandpass_low": 0.2,
    "bandpass_high": 0.05,
}
# Per preset, where the generic value is not valid for it.
PRESET_ALTERNATIVES: dict[tuple[str, str], Any] = {
    ("bip", "normalization"): "renorm",
    ("sra", "normalization"): "renorm",
    ("ssr", "sinkhorn_tol"): 0.9,  # stops after the first iteration: another plan
    ("sinkhorn", "sinkhorn_tol"): 0.9,
}
# Options of one preset whose effect needs another of its settings (in both runs): SSR routes
# by Sinkhorn on 1% of training forwards by default, so its Sinkhorn options need p_sel
# raised; EC-DLM's subset choice acts on the shared-expert norm matching only; ProMoE's
# first-slot-only contrastive loss differs from all slots at top-2 only.
PRESET_CONTEXT: dict[tuple[str, str], dict[str, Any]] = {
    ("ssr", "ssr_cost"): {"p_sel": 1.0},
    ("ssr", "sinkhorn_grad"): {"p_sel": 1.0},
    ("ssr", "sinkhorn_tol"): {"p_sel": 1.0},
    ("ssr", "seed"): {"p_sel": 0.5},
    ("ec-dlm", "norm_match_subset"): {"norm_match_shared": 1},
    ("promoe", "rcl_use_top_k"): {"top_k": 2},
    # near-uniform logits converge within any tolerance; spread ones need iterations
    ("sinkhorn", "sinkhorn_tol"): {"router_init_std": 2.0},
}
# Options whose effect needs another option set (in both runs).
CONTEXT: dict[str, dict[str, Any]] = {
    "drop_policy": {"capacity_factor": 0.5},
    "bias_counts": {"capacity_factor": 0.5},
    "group_topk": {"num_groups": 4},
    "bandpass_loss_coef": {"bandpass_low": 0.2},  # a band the uniform load (1/8) falls outside
}


def choices_of(name: str, option: str) -> tuple:
    try:
        routelab.create_router(name, d_model=D_MODEL, num_experts=NUM_EXPERTS, **{option: "__not_a_choice__"})
    except routelab.ConfigError as err:
        found = re.search(r"must be one of \((.*)\)", str(err))
        if found:
            return tuple(ast.literal_eval("(" + found.group(1) + ",)"))
    return ()


def alternatives(name: str, option: str, default: Any) -> list[Any]:
    if (name, option) in PRESET_ALTERNATIVES:
        return [PRESET_ALTERNATIVES[(name, option)]]
    if option in ALTERNATIVES:
        return [ALTERNATIVES[option]]
    if isinstance(default, bool):
        return [not default]
    if isinstance(default, int):
        return [v for v in (1, default * 2, max(default // 2, 0), 0) if v != default]
    if isinstance(default, float):
        return [v for v in (default * 3 if default else 0.1, default / 3, 0.5, 0.0, 1.0) if v != default]
    if isinstance(default, str):
        return [c for c in choices_of(name, option) if c != default]
    raise AssertionError(f"no alternative value for {name}.{option} (default {default!r}); add one to ALTERNATIVES")


# Options whose effect builds up over training: probed with more steps.
PROBE_STEPS: dict[tuple[str, str], int] = {
    ("magnet", "ramp_steps"): 40,
    ("magnet", "specialization_weight"): 40,  # acts once the entropy trigger fires
}


def fingerprint(name: str, options: dict[str, Any], steps: int = STEPS) -> list[torch.Tensor]:
    torch.manual_seed(0)
    layer = routelab.moe_layer(d_model=D_MODEL, d_hidden=12, num_experts=NUM_EXPERTS, router=name, **options).train()
    extra = side_inputs(BATCH, SEQ)
    # timestep and attention travel in a model-wide context (SoftMoE refuses them as arguments)
    context = routelab.RoutingContext(attention=extra["attention"], timestep=extra["timestep"])
    g = torch.Generator().manual_seed(1)
    target = torch.randn(BATCH, SEQ, D_MODEL, generator=g)
    seen: list[torch.Tensor] = []
    for _ in range(steps):
        x = torch.randn(BATCH, SEQ, D_MODEL, generator=g).requires_grad_()
        torch.manual_seed(7)  # the same noise draws in both runs
        out = layer(x, token_ids=extra["token_ids"], context=context)
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
        out = layer(torch.randn(BATCH, SEQ, D_MODEL, generator=g), token_ids=extra["token_ids"], context=context)
    return seen + [out.y, out.routing.topk_idx, out.routing.topk_weight]


_BASELINES: dict[tuple[str, tuple], list[torch.Tensor]] = {}


def baseline_of(name: str, context: dict[str, Any], steps: int = STEPS) -> list[torch.Tensor]:
    """The default run of ``name`` under ``context`` (computed once per worker)."""
    key = (name, tuple(sorted(context.items())), steps)
    if key not in _BASELINES:
        _BASELINES[key] = fingerprint(name, context, steps)
    return _BASELINES[key]


def differs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return True
    return any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(a, b))


COMMON_OPTIONS = tuple(f.name for f in dataclasses.fields(CommonOptions))
CASES = [(name, option) for name in ALL_PRESETS for option in preset(name).options()]

NOT_SHOWN_BY_PROBE: dict[tuple[str, str], str] = {
    ("rmoe", "rnn_cell"): "takes a module, not a value (test_zoo_recurrent.py)",
    ("rmoe", "layer_index"): "needs the routing state of earlier layers in one forward (test_zoo_recurrent.py)",
    ("rmoe", "carry_key"): "needs the routing state of earlier layers in one forward (test_zoo_recurrent.py)",
    ("rmoe", "detach_state"): "acts on gradients through the state carried between layers (test_zoo_recurrent.py)",
    ("attention-aware", "detach_attention"): "acts on gradients into the attention weights (test_zoo_graph.py)",
    ("attention-aware", "attention_causal"): "the probe's attention is already causal (test_zoo_graph.py)",
    ("condenser", "tail_fraction"): "acts once the sparsifying bias has built up (test_zoo_reuse.py)",
    ("magnet", "patience"): "a schedule over many steps (test_zoo_entropy.py)",
    ("ec-dlm", "missing_timestep"): "the probe always passes a timestep (test_zoo_ec_dlm.py)",
    ("cosine", "bandpass_loss_coef"): "the band needs the loss on in both runs (test_zoo_geometry.py)",
    ("sra", "bandpass_loss_coef"): "the band needs the loss on in both runs (test_zoo_geometry.py)",
    ("blockffn", "chunk_adaptive"): "a schedule over many steps (test_zoo_relu.py)",
    ("blockffn", "chunk_stable_steps"): "a schedule over many steps (test_zoo_relu.py)",
}


@pytest.mark.parametrize("name, option", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_every_accepted_option_changes_an_output_or_is_refused(name, option):
    if (name, option) in NOT_SHOWN_BY_PROBE:
        pytest.skip(f"{name}.{option}: effect not shown by the short probe; {NOT_SHOWN_BY_PROBE[(name, option)] or 'to triage'}")
    info = preset(name)
    default = info.options()[option]
    context = {k: v for k, v in CONTEXT.get(option, {}).items() if k in info.options()}
    context.update(PRESET_CONTEXT.get((name, option), {}))
    candidates = alternatives(name, option, default)
    assert candidates, f"no alternative value for {name}.{option}"
    steps = PROBE_STEPS.get((name, option), STEPS)
    try:
        baseline = baseline_of(name, context, steps)
    except routelab.ConfigError:
        context = {}
        baseline = baseline_of(name, context, steps)
    tried = []
    for changed in candidates:
        try:
            modified = fingerprint(name, {**context, option: changed}, steps)
        except routelab.ConfigError as err:
            if option in str(err):
                return
            tried.append(f"{changed!r}: refused without naming it ({err})")
            continue
        if differs(baseline, modified):
            return
        tried.append(f"{changed!r}: no change")
    pytest.fail(f"{name}: {option} (default {default!r}) " + "; ".join(tried))
