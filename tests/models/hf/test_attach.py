"""Attaching routelab to tiny random transformers MoE models of all six architectures.

Attach/detach is invisible (bit-identical logits, the same modules back, no hook left);
observed routing equals the model's own rule recomputed from its logits by a slow
reference; the native router and the equivalent presets reproduce the model; expert
choice and loss-free run in every architecture with output_router_logits and aux loss.
"""

from __future__ import annotations

import pytest
import torch

import routelab
from routelab.core.errors import ConfigError
from routelab.models.hf import attach, supported_architectures
from tests.hf_tiny import ARCH_NAMES, tiny_batch, tiny_model
from tests.reference_hf import reference_route

pytest.importorskip("transformers")


def logits_of(model, ids, mask=None):
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def router_of(model, layer: int):
    mlp = model.model.layers[layer].mlp
    return mlp.router if hasattr(mlp, "router") else mlp.gate


def rule_options(arch: str, router) -> dict:
    if arch == "deepseek_v3":
        return dict(norm_topk_prob=router.norm_topk_prob, bias=router.e_score_correction_bias.tolist(),
                    num_groups=router.num_group, topk_group=router.topk_group, scaling=router.routed_scaling_factor)
    return dict(norm_topk_prob=getattr(router, "norm_topk_prob", True))


def test_supported_architectures_listed_in_error():
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)
    dense = tf.LlamaForCausalLM(config)
    with pytest.raises(ConfigError) as err:
        attach(dense)
    message = str(err.value)
    assert "LlamaForCausalLM" in message
    for name in supported_architectures():
        assert name in message
    assert len(supported_architectures()) == 6


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_attach_replace_detach_restores_everything(arch):
    model = tiny_model(arch)
    ids, mask = tiny_batch(padded=True)
    before = logits_of(model, ids, mask)
    originals = [router_of(model, i) for i in range(2)]
    classes = [type(r) for r in originals]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = [dict(r._forward_hooks) for r in originals]

    handle = attach(model)
    assert torch.equal(logits_of(model, ids, mask), before)  # observing changes nothing
    handle.replace_router("expert-choice", layers=[0])
    handle.replace_router("loss-free", layers=[1])
    model.train()
    model(ids, attention_mask=mask, labels=ids).loss.backward()  # train the replacements a little
    for layer in (0, 1):
        replacement = router_of(model, layer)
        assert isinstance(replacement, classes[layer]) and replacement is not originals[layer]
        assert replacement.routelab_router.scorer.weight.grad is not None
        assert originals[layer].weight.grad is None  # the original weights are not shared
    model.eval()
    handle.detach()

    for layer in (0, 1):
        assert router_of(model, layer) is originals[layer]
        assert type(router_of(model, layer)) is classes[layer]
        assert dict(originals[layer]._forward_hooks) == hooks[layer]
    after_state = model.state_dict()
    assert after_state.keys() == state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in state.items())
    assert not hasattr(model, "_routelab_handle")
    assert not model.model._forward_pre_hooks and not model.model._forward_hooks
    assert torch.equal(logits_of(model, ids, mask), before)
    handle.detach()  # idempotent
    with pytest.raises(ConfigError, match="detached"):
        handle.replace_router("mixtral")


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_observed_routing_is_the_models_rule_on_real_tokens(arch):
    model = tiny_model(arch)
    ids, mask = tiny_batch(padded=True)
    calls = []
    with attach(model) as handle:
        handle.add_observer(type("Keep", (), {"on_router_call": lambda self, call: calls.append(call)})())
        with torch.no_grad():
            out = model(ids, attention_mask=mask, output_router_logits=True)
        stats = handle.routing_stats()
    real = mask.reshape(-1).bool()
    assert [c.layer for c in calls] == [0, 1]
    for call in calls:
        router = router_of(model, call.model_layer)
        logits = out.router_logits[call.layer][real].float()
        assert call.topk_idx_TK.shape == (int(real.sum()), router.top_k)
        for t in range(logits.shape[0]):
            experts, gates = reference_route(arch, logits[t].tolist(), router.top_k, **rule_options(arch, router))
            assert sorted(call.topk_idx_TK[t].tolist()) == sorted(experts)
            got = dict(zip(call.topk_idx_TK[t].tolist(), call.topk_weight_TK[t].tolist()))
            assert [got[e] for e in experts] == pytest.approx(gates, rel=1e-5, abs=1e-6)
        per_token = call.tokens.per_token()
        assert per_token["positions_T"].tolist() == list(range(9)) + list(range(6))  # row 1 has 3 left pads
        assert per_token["seq_ids_T"].tolist() == [0] * 9 + [1] * 6
        assert per_token["token_ids_T"].tolist() == ids[mask.bool()].tolist()
        load = torch.bincount(call.topk_idx_TK.reshape(-1), minlength=router.num_experts).tolist()
        assert stats[f"layer_{call.layer}"]["load"] == load
        assert stats[f"layer_{call.layer}"]["num_tokens"] == 15


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_native_router_is_bit_identical_and_generates_the_same(arch):
    model = tiny_model(arch)
    ids, _ = tiny_batch()
    before = logits_of(model, ids)
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    with attach(model) as handle:
        handle.replace_router("native")
        assert all(handle.routelab_router(i) is not None for i in handle.moe_layers)
        assert torch.equal(logits_of(model, ids), before)
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), generated)


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_equivalent_preset_reproduces_where_the_rule_is_the_same(arch):
    model = tiny_model(arch)
    ids, _ = tiny_batch()
    before = logits_of(model, ids)
    with attach(model) as handle:
        equivalent = handle.equivalent_preset()
        handle.replace_router(equivalent.preset, **equivalent.options)
        after = logits_of(model, ids)
    expected_exact = arch != "gpt_oss"  # GPT-OSS: softmax over the k logits vs renormalised full softmax
    assert equivalent.exact is expected_exact
    if expected_exact:
        assert torch.equal(after, before)
    else:
        assert not torch.equal(after, before)
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)


def test_equivalent_preset_names_the_rule():
    cases = {
        ("olmoe", False): "topk", ("olmoe", True): "mixtral", ("mixtral", True): "mixtral",
    }
    for (arch, norm), preset in cases.items():
        model = tiny_model(arch, norm_topk_prob=norm) if arch != "mixtral" else tiny_model(arch)
        with attach(model) as handle:
            assert handle.equivalent_preset().preset == preset
    deepseek = tiny_model("deepseek_v3", num_experts_per_tok=4, topk_group=1)  # group score: top-4 vs top-2
    with attach(deepseek) as handle:
        eq = handle.equivalent_preset()
        assert eq.preset == "deepseek-v3" and not eq.exact and "top 2" in eq.reason


@pytest.mark.parametrize("preset", ["expert-choice", "loss-free"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_presets_train_in_every_architecture(arch, preset):
    model = tiny_model(arch)
    ids, mask = tiny_batch(padded=True)
    with attach(model) as handle:
        inits = handle.replace_router(preset)
        assert "weight" in inits[0].copied
        model.train()
        out = model(ids, attention_mask=mask, labels=ids, output_router_logits=True)
        assert len(out.router_logits) == 2 and out.router_logits[0].shape == (18, handle.num_experts)
        if arch == "deepseek_v3":
            assert out.aux_loss is None  # transformers' DeepSeek-V3 has no aux loss
        else:
            assert torch.isfinite(out.aux_loss) and out.aux_loss.requires_grad
        (out.loss + handle.aux_loss()).backward()
        for layer in handle.moe_layers:
            router = handle.routelab_router(layer)
            assert router.scorer.weight.grad is not None and router.scorer.weight.grad.abs().sum() > 0
        routing = router_of(model, 0).last_routing
        if preset == "expert-choice":  # every expert takes floor(L*k/E) tokens of each sequence
            for seq, length in ((0, 9), (1, 6)):
                rows = torch.arange(9) if seq == 0 else torch.arange(9, 15)
                valid = routing.topk_idx[rows][routing.topk_idx[rows] >= 0]
                capacity = max(1, length * handle.top_k // handle.num_experts)
                assert torch.bincount(valid, minlength=handle.num_experts).tolist() == [capacity] * handle.num_experts
        else:
            bias_before = router_of(model, 0).routelab_router.balancer.bias.clone()
            routelab.end_of_step(model)
            assert not torch.equal(router_of(model, 0).routelab_router.balancer.bias, bias_before)
        model.eval()


def test_deepseek_presets_take_the_pretrained_selection_bias():
    model = tiny_model("deepseek_v3")
    with attach(model) as handle:
        inits = handle.replace_router("deepseek-v3", num_groups=2, group_topk=1)
        assert "e_score_correction_bias" in inits[0].copied
        bias = handle.routelab_router(0).balancer.bias
        assert torch.equal(bias, handle.layer(0).original.e_score_correction_bias.float())
        inits = handle.replace_router("loss-free")
        assert any("e_score_correction_bias" in s for s in inits[0].skipped)


@pytest.mark.parametrize("capture_first", [True, False])
def test_output_router_logits_survives_replacement_and_detach(capture_first):
    model = tiny_model("mixtral")
    ids, _ = tiny_batch()
    with torch.no_grad():
        reference = tiny_model("mixtral")(ids, output_router_logits=True).router_logits
        if capture_first:  # transformers installs its capture hooks on the original routers now
            assert len(model(ids, output_router_logits=True).router_logits) == 2
    with attach(model) as handle:
        handle.replace_router("expert-choice")
        with torch.no_grad():
            out = model(ids, output_router_logits=True)
        assert len(out.router_logits) == 2
        for layer in (0, 1):
            assert torch.equal(out.router_logits[layer], router_of(model, layer).last_routing.logits)
    with torch.no_grad():
        out = model(ids, output_router_logits=True)  # collected from the originals again
    assert len(out.router_logits) == 2
    assert all(torch.equal(a, b) for a, b in zip(out.router_logits, reference))


def test_layers_are_named_by_decoder_index_with_clear_errors():
    model = tiny_model("qwen2_moe", mlp_only_layers=[0])
    with attach(model) as handle:
        assert handle.moe_layers == [1]
        with pytest.raises(ConfigError, match="not an MoE layer"):
            handle.replace_router("mixtral", layers=[0])
        assert handle.resolve_layers(-1) == [1]
        with pytest.raises(ConfigError, match="no option"):
            handle.replace_router("mixtral", bogus=1)
    with attach(tiny_model("mixtral")) as handle:
        with pytest.raises(ConfigError, match="already has routelab attached"):
            attach(handle.model)


def test_activation_checkpointing_is_observed_once():
    model = tiny_model("mixtral")
    model.train()
    model.activation_checkpointing_enable()
    ids, mask = tiny_batch(padded=True)
    with attach(model) as handle:
        handle.replace_router("expert-choice", layers=[0])
        model(ids, attention_mask=mask, labels=ids).loss.backward()  # recomputes the routers in backward
        assert handle.routing_stats()["all"]["num_tokens"] == 2 * 15
        assert handle.routelab_router(0).scorer.weight.grad.abs().sum() > 0
