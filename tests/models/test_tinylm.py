"""TinyLM: trains with a dense FFN and with every foundation preset; routing inputs reach the routers."""

from __future__ import annotations

import pytest
import torch

from routelab.core.errors import ConfigError, InputError
from routelab.models.tinylm import CausalSelfAttention, TinyLM, TinyLMConfig, rotary_tables
from routelab.routers.registry import PRESETS, create_router, list_routers, preset_info

FOUNDATION_PRESETS = (
    "switch", "gshard", "mixtral", "topk", "noisy-topk", "deepseek-v3", "loss-free", "expert-choice", "hash",
    "random-fixed",
)
VOCAB = 64


def tiny(**kw) -> TinyLMConfig:
    settings = dict(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, max_seq_len=16, num_experts=4,
                    expert_d_hidden=32, top_k=None)
    settings.update(kw)
    return TinyLMConfig(**settings)


def fixed_batch(seed: int = 0, batch: int = 4, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def train_steps(model: TinyLM, steps: int = 25) -> list[float]:
    from routelab import end_of_step

    inputs, targets = fixed_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        out = model(inputs, targets)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        end_of_step(model)
        losses.append(float(out.lm_loss.detach()))
    return losses


@pytest.mark.parametrize("router", ["dense", *FOUNDATION_PRESETS])
def test_trains_and_loss_decreases_on_a_fixed_batch(router):
    torch.manual_seed(0)
    config = tiny(ffn="dense", d_ff=64) if router == "dense" else tiny(router=router, top_k=None if router in ("switch", "hash") else 2)
    model = TinyLM(config)
    losses = train_steps(model)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 1.0, losses  # memorising one batch: the loss must fall a lot
    out = model(*fixed_batch())
    assert len(out.routings) == (0 if router == "dense" else 2)
    assert float(out.loss.detach()) == pytest.approx(float((out.lm_loss + out.aux_loss).detach()), rel=1e-6)


@pytest.mark.parametrize("router", [r["name"] for r in list_routers() if r["name"] not in FOUNDATION_PRESETS])
def test_every_registered_preset_runs_in_tinylm(router):
    """Whatever the registry holds trains inside TinyLM (the lab compares any of them)."""
    info = preset_info(router)
    torch.manual_seed(0)
    top_k = max(info.min_top_k, min(info.default_top_k, 2))
    model = TinyLM(tiny(router=router, top_k=top_k, num_experts=8))
    losses = train_steps(model, steps=15)
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses


def test_aux_loss_is_the_sum_of_layer_losses():
    torch.manual_seed(0)
    model = TinyLM(tiny(router="mixtral", router_options={"aux_loss_coef": 0.5, "z_loss_coef": 0.1}))
    out = model(*fixed_batch())
    expected = sum(0.5 * r.losses["aux"] + 0.1 * r.losses["z"] for r in out.routings)
    assert torch.allclose(out.aux_loss, expected)
    assert out.aux_loss > 0


def test_moe_every_and_per_layer_top_k():
    model = TinyLM(tiny(n_layers=4, moe_every=2, top_k=[1, 3], router="topk", router_options={"normalization": "pre_softmax_norenorm"}))
    assert model.moe_layers == [1, 3]
    out = model(*fixed_batch())
    assert [r.k_max for r in out.routings] == [1, 3]
    assert not model.blocks[0].is_moe and model.blocks[1].is_moe
    with pytest.raises(ConfigError, match="one top_k per MoE layer"):
        tiny(n_layers=4, moe_every=2, top_k=[1, 2, 3])


def test_shared_experts_and_dense_equivalent():
    config = tiny(router="mixtral", top_k=2, num_shared_experts=1, shared_d_hidden=16)
    model = TinyLM(config)
    assert model.blocks[0].ffn.shared_experts is not None
    dense = config.dense_equivalent()
    assert dense.ffn == "dense" and dense.d_ff == 2 * 32 + 16
    counts = model.parameter_counts()
    experts = sum(p.numel() for p in model.blocks[0].ffn.experts.parameters())
    assert counts["total"] - counts["active"] == pytest.approx(2 * experts * (1 - 2 / 4), abs=2)


def test_hash_router_receives_token_ids():
    torch.manual_seed(0)
    model = TinyLM(tiny(router="hash", top_k=1))
    inputs, _ = fixed_batch()
    out = model(inputs)
    expected = create_router("hash", d_model=32, num_experts=4, top_k=1, seed=0).selector.random_experts(inputs.reshape(-1))
    assert torch.equal(out.routings[0].topk_idx, expected)


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    model = TinyLM(tiny(router="mixtral", top_k=2)).eval()
    inputs, _ = fixed_batch(batch=2, seq=10)
    padded = torch.cat([inputs, torch.zeros(2, 6, dtype=torch.long)], dim=1)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :10] = True
    mask[1, 10:13] = True  # the second row has 3 more real tokens
    padded[1, 10:13] = torch.tensor([5, 6, 7])
    plain = model(inputs)
    masked = model(padded, padding_mask=mask)
    assert torch.allclose(plain.logits, masked.logits[:, :10], atol=1e-5)
    assert masked.routings[0].num_tokens == 23  # padding is never routed
    targets = torch.full((2, 16), 3)
    out = model(padded, targets, padding_mask=mask)
    token_loss = torch.nn.functional.cross_entropy(masked.logits[mask], targets[mask])
    assert torch.allclose(out.lm_loss, token_loss, atol=1e-6)


def test_attention_is_passed_only_to_routers_that_need_it():
    torch.manual_seed(0)
    model = TinyLM(tiny(router="mixtral", top_k=2))
    seen = []
    router = model.blocks[1].ffn.router
    router.needs_attention = True
    model.blocks[1].needs_attention = True  # as the block sets it at construction for such routers
    original = router.forward

    def recording_forward(x_TD, batch=None):
        seen.append(batch.context.attention)
        return original(x_TD, batch)

    router.forward = recording_forward
    inputs, _ = fixed_batch(batch=3, seq=12)
    model(inputs)
    attention = seen[0]
    assert attention is not None and attention.shape == (3, 12, 12)
    assert torch.allclose(attention.sum(-1), torch.ones(3, 12), atol=1e-5)
    assert torch.all(attention.triu(diagonal=1) == 0)  # causal
    seen.clear()
    model.blocks[0].ffn.router.forward = lambda x, batch=None, f=model.blocks[0].ffn.router.forward: (
        seen.append(batch.context.attention) or f(x, batch)
    )
    model(inputs)
    assert seen[0] is None  # layer 0's router does not ask for attention


def test_presets_registered_as_attention_aware_get_attention():
    names = [info.name for info in PRESETS if getattr(info, "needs_attention", False)]
    if not names:
        pytest.skip("no preset in this registry reads attention")
    model = TinyLM(tiny(router=names[0], top_k=2))
    assert all(block.needs_attention for block in model.blocks)
    assert not any(block.needs_attention for block in TinyLM(tiny(router="mixtral", top_k=2)).blocks)


def test_explicit_attention_equals_fused_attention():
    torch.manual_seed(0)
    attn = CausalSelfAttention(32, 4)
    x = torch.randn(2, 9, 32)
    cos, sin = rotary_tables(9, 8, 10000.0)
    fused, none = attn(x, cos, sin, None, need_weights=False)
    explicit, probs = attn(x, cos, sin, None, need_weights=True)
    assert none is None and probs.shape == (2, 9, 9)
    assert torch.allclose(fused, explicit, atol=1e-5)


def test_rotary_is_relative():
    """q.k after rotation depends only on the distance between positions (RoFormer)."""
    cos, sin = rotary_tables(20, 8, 10000.0)
    from routelab.models.tinylm import apply_rotary

    q, k = torch.randn(8), torch.randn(8)
    rot = lambda v, p: apply_rotary(v.view(1, 1, 1, 8), cos[p : p + 1], sin[p : p + 1]).flatten()  # noqa: E731
    assert torch.allclose(rot(q, 3) @ rot(k, 1), rot(q, 12) @ rot(k, 10), atol=1e-5)


def test_router_math_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    model = TinyLM(tiny(router="mixtral", top_k=2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*fixed_batch())
    assert out.logits.dtype == torch.bfloat16
    assert all(r.logits.dtype == torch.float32 and r.topk_weight.dtype == torch.float32 for r in out.routings)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_bad_inputs_and_configs():
    model = TinyLM(tiny(router="mixtral", top_k=2))
    with pytest.raises(InputError, match="vocab_size"):
        model(torch.full((1, 4), VOCAB))
    with pytest.raises(InputError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(InputError, match="input_ids"):
        model(torch.zeros(4))
    with pytest.raises(ConfigError, match="n_heads"):
        tiny(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="not a known router preset"):
        tiny(router="mixtrall")
    with pytest.raises(ConfigError, match="moe_every"):
        tiny(moe_every=3)
    with pytest.raises(ConfigError, match="unknown TinyLM config keys"):
        TinyLMConfig.from_dict({"vocab_size": 10, "width": 3})
