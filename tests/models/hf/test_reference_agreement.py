"""routelab against the transformers router blocks themselves, for all six architectures.

The native router and the equivalent preset are run on the same hidden states as the
model's own router module; what "exact" means is what these tests check.
"""

from __future__ import annotations

import pytest
import torch

from routelab.models.hf import architecture_of, equivalent_preset, native_router, preset_router
from tests.hf_tiny import ARCH_NAMES, tiny_batch, tiny_model

pytest.importorskip("transformers")

# tiny models with more than two experts per token: the order in which the k gates are summed matters
WIDE = {
    "mixtral": {"num_experts_per_tok": 3},
    "olmoe": {"num_experts_per_tok": 3},
    "qwen2_moe": {"num_experts_per_tok": 3},
    "qwen3_moe": {"num_experts_per_tok": 3},
    "deepseek_v3": {"num_experts_per_tok": 4, "n_group": 2, "topk_group": 2},
    "gpt_oss": {"num_experts_per_tok": 3},
}


def routers_of(model):
    for layer in model.model.layers:
        mlp = layer.mlp
        yield mlp.router if hasattr(mlp, "router") else mlp.gate


def by_expert(idx_TK: torch.Tensor, weight_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order_TK = idx_TK.argsort(dim=-1)
    return idx_TK.gather(1, order_TK), weight_TK.gather(1, order_TK)


def hidden_states(model, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(40, model.config.hidden_size, generator=g)


@pytest.mark.parametrize("wide", [False, True], ids=["k2", "wide"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_native_router_equals_the_transformers_router_bit_for_bit(arch, wide):
    model = tiny_model(arch, **(WIDE[arch] if wide else {}))
    architecture = architecture_of(model)
    x_TD = hidden_states(model)
    for original in routers_of(model):
        with torch.no_grad():
            _, weight_ref, idx_ref = original(x_TD)[:3]
            routing = native_router(architecture, original)(x_TD)
        idx_ref, weight_ref = by_expert(idx_ref, weight_ref.float())
        idx, weight = by_expert(routing.topk_idx, routing.topk_weight)
        assert torch.equal(idx, idx_ref)
        assert torch.equal(weight, weight_ref)


@pytest.mark.parametrize("wide", [False, True], ids=["k2", "wide"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_equivalent_preset_is_exact_where_it_says_so_and_within_2e7_elsewhere(arch, wide):
    model = tiny_model(arch, **(WIDE[arch] if wide else {}))
    architecture = architecture_of(model)
    x_TD = hidden_states(model)
    for original in routers_of(model):
        eq = equivalent_preset(architecture, original)
        router, _ = preset_router(eq.preset, architecture, original, **eq.options)
        with torch.no_grad():
            _, weight_ref, idx_ref = original(x_TD)[:3]
            routing = router.eval()(x_TD)
        idx_ref, weight_ref = by_expert(idx_ref, weight_ref.float())
        idx, weight = by_expert(routing.topk_idx, routing.topk_weight)
        assert torch.equal(idx, idx_ref)
        if eq.exact:
            assert torch.equal(weight, weight_ref)
        else:
            torch.testing.assert_close(weight, weight_ref, rtol=0, atol=2e-7)


def test_deepseek_v3_preset_is_flagged_inexact_beyond_two_experts_and_native_is_exact_in_the_model():
    model = tiny_model("deepseek_v3", **WIDE["deepseek_v3"])
    ids, _ = tiny_batch()
    from routelab.hf import attach

    with torch.no_grad():
        before = model(ids).logits
    with attach(model) as handle:
        assert not handle.equivalent_preset().exact
        handle.replace_router("native")
        with torch.no_grad():
            native = model(ids).logits
        eq = handle.equivalent_preset()
        handle.replace_router(eq.preset, **eq.options)
        with torch.no_grad():
            preset = model(ids).logits
    assert torch.equal(native, before)
    torch.testing.assert_close(preset, before, rtol=0, atol=2e-7)
