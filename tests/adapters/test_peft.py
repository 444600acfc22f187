"""peft interoperability: peft's saved LoRA folders as routed experts, and back."""

from __future__ import annotations

import copy

import pytest
import torch

from routelab.adapters.peft_io import load_peft_experts, save_peft_expert
from routelab.models.tinylm import TinyLM, TinyLMConfig

peft = pytest.importorskip("peft")


def base_model() -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(TinyLMConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, ffn="dense", d_ff=64)).eval()


def save_random_peft_adapter(base: TinyLM, folder, *, r: int, alpha: float, targets: list[str], seed: int,
                             rslora: bool = False) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, use_rslora=rslora)
    model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    model.save_pretrained(str(folder))
    return model


IDS = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(1))


def test_a_peft_adapter_gives_the_same_output_in_peft_and_routelab(tmp_path) -> None:
    base = base_model()
    peft_model = save_random_peft_adapter(base, tmp_path / "a", r=4, alpha=8, targets=["qkv", "w_out"], seed=1)
    with torch.no_grad():
        want = peft_model(IDS).logits
    model = copy.deepcopy(base)
    adapters = load_peft_experts(model, [tmp_path / "a"], method="task", num_tasks=1)
    assert sorted(adapters.layers) == ["blocks.0.attn.qkv", "blocks.0.ffn.w_out", "blocks.1.attn.qkv", "blocks.1.ffn.w_out"]
    with torch.no_grad(), adapters.context(task_ids=[0, 0]):
        got = model(IDS).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, base(IDS).logits, atol=1e-3)  # the adapter does change the output


def test_a_pool_of_peft_adapters_with_different_ranks_and_targets(tmp_path) -> None:
    base = base_model()
    models = [
        save_random_peft_adapter(base, tmp_path / "a", r=4, alpha=8, targets=["qkv"], seed=1),
        save_random_peft_adapter(base, tmp_path / "b", r=2, alpha=3, targets=["qkv", "out"], seed=2, rslora=True),
    ]
    model = copy.deepcopy(base)
    adapters = load_peft_experts(model, [tmp_path / "a", tmp_path / "b"], method="task", num_tasks=2)
    assert adapters.rank == 4 and adapters.num_experts == 2
    with torch.no_grad(), adapters.context(task_ids=[1, 0]):
        got = model(IDS).logits
    with torch.no_grad():
        assert torch.allclose(got[0], models[1](IDS[:1]).logits[0], atol=1e-5)
        assert torch.allclose(got[1], models[0](IDS[1:]).logits[0], atol=1e-5)


def test_load_save_load_round_trip_and_peft_reads_what_routelab_wrote(tmp_path) -> None:
    base = base_model()
    save_random_peft_adapter(base, tmp_path / "a", r=4, alpha=8, targets=["qkv", "w_in"], seed=3)
    save_random_peft_adapter(base, tmp_path / "b", r=4, alpha=4, targets=["qkv", "w_in"], seed=4)
    first = copy.deepcopy(base)
    adapters = load_peft_experts(first, [tmp_path / "a", tmp_path / "b"], method="topk", router="mixtral", top_k=1)
    with torch.no_grad():
        for name, layer in adapters.layers.items():  # as if trained: expert 1 now differs from its file
            layer.bank.lora_B[1].mul_(1.5)
            if name.startswith("blocks.0"):
                layer.bank.scaling[1] = 0.75  # per-module scaling: written as peft's alpha_pattern
    for expert in range(2):
        save_peft_expert(adapters, expert, tmp_path / f"saved{expert}")
    assert peft.LoraConfig.from_pretrained(str(tmp_path / "saved1")).alpha_pattern
    second = copy.deepcopy(base)
    reloaded = load_peft_experts(second, [tmp_path / "saved0", tmp_path / "saved1"], method="topk", router="mixtral",
                                 top_k=1)
    for name, layer in reloaded.layers.items():  # same routers, so the same routing
        layer.router.load_state_dict(adapters.layers[name].router.state_dict())
    with torch.no_grad():
        assert torch.equal(first(IDS).logits, second(IDS).logits)
        peft_model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "saved1")).eval()
        single = copy.deepcopy(base)
        one = load_peft_experts(single, [tmp_path / "saved1"], method="task", num_tasks=1)
        with one.context(task_ids=[0, 0]):
            assert torch.allclose(peft_model(IDS).logits, single(IDS).logits, atol=1e-5)


def test_adapters_routelab_cannot_represent_are_refused(tmp_path) -> None:
    from routelab.core import InputError

    base = base_model()
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["qkv"], use_dora=True)
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(InputError, match="DoRA"):
        load_peft_experts(copy.deepcopy(base), [tmp_path / "dora"])
    with pytest.raises(InputError, match="not a saved peft adapter"):
        load_peft_experts(copy.deepcopy(base), [tmp_path])
