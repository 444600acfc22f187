"""The routed LoRA layer: batched dispatch against per-token references, frozen base, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from routelab.adapters import attach_adapters, list_methods, prepare_finetune, routed_delta
from routelab.core import ConfigError, InputError
from routelab.models.tinylm import TinyLM, TinyLMConfig
from tests.adapters.reference import reference_routed


def tiny_lm() -> TinyLM:
    return TinyLM(TinyLMConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, ffn="dense", d_ff=64))


@pytest.mark.parametrize("dispatch", ["grouped_mm", "dense"])
@pytest.mark.parametrize("router", ["mixtral", "expert-choice", "dynmole"])
def test_routed_layer_matches_the_per_token_reference_in_value_and_gradient(dispatch: str, router: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32, bias=True))
    adapters = attach_adapters(model, ["0"], num_experts=4, rank=4, method="topk", router=router, dispatch=dispatch,
                               init_b_std=0.3, lora_alpha=8.0)
    layer = adapters.layers["0"]
    x = torch.randn(3, 5, 16, requires_grad=True)
    with adapters.context() as records:
        y = model(x)
    (_, routing, batch), = records
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    grads = [x.grad.clone(), layer.bank.lora_A.grad.clone(), layer.bank.lora_B.grad.clone()]

    x_ref = x.detach().clone().requires_grad_(True)
    for p in layer.bank.parameters():
        p.grad = None
    again = layer.router(x_ref.reshape(-1, 16), batch, None)  # the same routing, differentiable in x_ref
    assert torch.equal(again.topk_idx, routing.topk_idx)
    idx, weight = again.topk_idx, again.topk_weight
    y_ref = layer.base(x_ref) + reference_routed(x_ref.reshape(-1, 16), idx, weight, layer.bank).reshape(3, 5, 32)
    (y_ref * upstream).sum().backward()
    assert torch.allclose(y, y_ref, atol=1e-5)
    for got, want in zip(grads, [x_ref.grad, layer.bank.lora_A.grad, layer.bank.lora_B.grad]):
        assert torch.allclose(got, want, atol=1e-4)


def test_grouped_and_dense_dispatch_agree_in_bf16() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    adapters = attach_adapters(model, ["0"], num_experts=4, rank=8, init_b_std=0.2)
    bank = adapters.layers["0"].bank
    x = torch.randn(20, 32, dtype=torch.bfloat16)
    idx = torch.randint(0, 4, (20, 2))
    w = torch.rand(20, 2)
    a = routed_delta(x, idx, w, bank, "grouped_mm")
    b = routed_delta(x, idx, w, bank, "dense")
    assert a.dtype == torch.bfloat16
    assert torch.allclose(a.float(), b.float(), atol=3e-2, rtol=3e-2)


def test_routing_to_a_single_adapter_equals_that_lora_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    adapters = attach_adapters(model, ["0"], num_experts=3, rank=2, method="task", num_tasks=3, init_b_std=0.5)
    layer = adapters.layers["0"]
    x = torch.randn(3, 4, 8)
    with adapters.context(task_ids=[2, 0, 1]):
        y = model(x)
    for b, expert in enumerate([2, 0, 1]):
        alone = layer.base(x[b]) + layer.bank.expert_delta(expert, x[b])
        assert torch.allclose(y[b], alone, atol=1e-6)
    single = nn.Sequential(nn.Linear(8, 8))
    one = attach_adapters(single, ["0"], num_experts=1, rank=2, method="topk", router="mixtral", top_k=1, init_b_std=0.5)
    lone = one.layers["0"]
    assert torch.allclose(single(x), lone.base(x) + lone.bank.expert_delta(0, x), atol=1e-6)


def test_only_adapter_and_router_parameters_change_in_training() -> None:
    torch.manual_seed(0)
    model = tiny_lm()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters = attach_adapters(model, ["qkv", "out", "w_in"], num_experts=4, rank=4, method="topk", router="mixtral")
    assert len(adapters.layers) == 6
    optimizer = torch.optim.AdamW(adapters.trainable_parameters(), lr=1e-2)
    ids = torch.randint(0, 50, (2, 12))
    for _ in range(2):
        with adapters.context() as records:
            out = model(ids, ids)
        (out.loss + adapters.aux_loss(records)).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before.get(n, torch.empty(0)))}
    base_names = set(before)
    assert changed and all(n not in base_names for n in changed)
    remapped = {n.replace(".base.", "."): p for n, p in model.named_parameters() if ".base." in n}
    assert all(torch.equal(remapped[n], before[n]) for n in remapped)
    assert any("lora_B" in n for n in changed) and any("router" in n for n in changed)


def test_padding_is_not_routed_and_gets_no_update() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    adapters = attach_adapters(model, ["0"], num_experts=2, rank=2, init_b_std=0.5)
    x = torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    with adapters.context(padding_mask=mask) as records:
        y = model(x)
    assert records[0][1].num_tokens == 4
    base = adapters.layers["0"].base
    assert torch.equal(y[0, 3], base(x)[0, 3]) and torch.equal(y[1, 1:], base(x)[1, 1:])


def test_every_method_runs_trains_and_returns_a_routing() -> None:
    names = {m.name for m in list_methods()}
    assert {"topk", "poly", "mhr", "glider", "phatgoose", "remix", "dynmole", "lora-mixer", "uniform", "task"} <= names
    for method in sorted(names):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 16))
        adapters = attach_adapters(model, ["0"], num_experts=4, rank=4, method=method, num_tasks=2, init_b_std=0.1,
                                   **({"num_heads": 2} if method == "mhr" else {}))
        with adapters.context(task_ids=[0, 1]) as records:
            y = model(torch.randn(2, 3, 16))
        routing = records[0][1]
        assert routing.topk_idx.shape[0] == 6 and torch.isfinite(y).all(), method
        (y.sum() + adapters.aux_loss(records)).backward()


def test_clear_errors() -> None:
    with pytest.raises(ConfigError, match="method="):
        attach_adapters(nn.Sequential(nn.Linear(4, 4)), ["0"], num_experts=2, method="polytropon")
    with pytest.raises(ConfigError, match="matches no nn.Linear"):
        attach_adapters(nn.Sequential(nn.Linear(4, 4)), ["qkv"], num_experts=2)
    with pytest.raises(ConfigError, match="token ids or attention"):
        attach_adapters(nn.Sequential(nn.Linear(4, 4)), ["0"], num_experts=2, router="hash")
    with pytest.raises(ConfigError, match="num_tasks"):
        attach_adapters(nn.Sequential(nn.Linear(4, 4)), ["0"], num_experts=2, method="poly")
    with pytest.raises(ConfigError, match="unknown option"):
        attach_adapters(nn.Sequential(nn.Linear(4, 4)), ["0"], num_experts=2, method="remix", heads=3)
    model = nn.Sequential(nn.Linear(4, 4))
    adapters = attach_adapters(model, ["0"], num_experts=2, method="poly", num_tasks=2)
    with pytest.raises(InputError, match="task ids"):
        model(torch.randn(1, 2, 4))
    with pytest.raises(InputError, match="task ids must lie"), adapters.context(task_ids=[5]):
        model(torch.randn(1, 2, 4))
    with pytest.raises(ConfigError, match="already has routed LoRA"):
        attach_adapters(model, ["0"], num_experts=2)


def test_finetune_modes_of_mhr() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    adapters = attach_adapters(model, ["0"], num_experts=4, rank=2, method="poly", num_tasks=2, init_b_std=0.5)
    layer = adapters.layers["0"]
    params = prepare_finetune(adapters, "z")
    assert params == [layer.router.logits]
    x = torch.randn(1, 3, 8)
    model.eval()
    with adapters.context(task_ids=[-1]):
        uniform = model(x)
    params = prepare_finetune(adapters, "mu")
    assert layer.bank.num_experts == 1 and {id(p) for p in params} == {id(p) for p in layer.bank.parameters()}
    with adapters.context(task_ids=[0]):
        averaged = model(x)
    # h = 1: the uniform weight-space mixture is the averaged adapter
    assert torch.allclose(uniform, averaged, atol=1e-6)
