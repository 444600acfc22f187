"""Behaviour of the depth stacks inside TinyLM, against slow per-token references."""

from __future__ import annotations

import pytest
import torch

from routelab.core.errors import ConfigError
from routelab.depth.mod import MoDStack
from routelab.models.tinylm import TinyLM, TinyLMConfig
from tests.depth.reference import mod_layer_reference

VOCAB = 40


def model(depth: str | None = None, ffn: str = "dense", n_layers: int = 2, seq: int = 12, **options) -> TinyLM:
    torch.manual_seed(0)
    return TinyLM(TinyLMConfig(vocab_size=VOCAB, d_model=32, n_layers=n_layers, n_heads=2, max_seq_len=seq, ffn=ffn,
                               num_experts=4, top_k=2, depth_router=depth, depth_options=options))


def same_weights(target: TinyLM, source: TinyLM) -> TinyLM:
    target.load_state_dict(source.state_dict(), strict=False)
    return target


def ids(batch: int = 2, seq: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(3))


# --- Mixture-of-Depths ---------------------------------------------------------------------

def test_mod_capacity_one_without_weight_is_the_dense_block() -> None:
    dense = model()
    mod = same_weights(model("mod", capacity=1.0, every=1, weight="none"), dense)
    x = ids()
    assert torch.allclose(mod(x).logits, dense(x).logits, atol=1e-5)


def test_mod_matches_the_per_token_reference_with_original_positions() -> None:
    from routelab.core.context import RoutingContext
    from tests.depth.reference import block_on_tokens

    m = model("mod", n_layers=1, capacity=0.5, layers=[0])
    x = torch.randn(2, 12, 32)
    cos, sin = m.rope_cos[:12], m.rope_sin[:12]
    with torch.no_grad():
        y, result = m.depth(m.blocks, x, cos, sin, None, None, RoutingContext())
        decision = result.decisions[0]
        for b in range(2):
            selected = decision.choice_BS[b] == 1
            assert int(selected.sum()) == 6  # capacity 0.5 of 12 tokens
            expected = mod_layer_reference(m.blocks[0], x[b], selected, decision.weight_BS[b])
            assert torch.allclose(y[b], expected, atol=1e-5)
        # renumbering the selected tokens 0..k-1 (the pitfall) changes the block's output
        positions = (decision.choice_BS[0] == 1).nonzero(as_tuple=True)[0].tolist()
        tokens = [x[0, p] for p in positions]
        original = torch.stack(block_on_tokens(m.blocks[0], tokens, positions))
        renumbered = torch.stack(block_on_tokens(m.blocks[0], tokens, list(range(len(positions)))))
        assert not torch.allclose(original, renumbered, atol=1e-4)


def test_mod_gradients_match_the_per_token_reference() -> None:
    from routelab.core.context import RoutingContext

    m = model("mod", n_layers=1, capacity=0.25, layers=[0])
    x = torch.randn(1, 12, 32, requires_grad=True)
    cos, sin = m.rope_cos[:12], m.rope_sin[:12]
    y, result = m.depth(m.blocks, x, cos, sin, None, None, RoutingContext())
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    fast = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    fast_x = x.grad.clone()
    m.zero_grad()
    x.grad = None
    selected = result.decisions[0].choice_BS[0] == 1
    router = m.depth.routers["0"]
    weight = router(x[0]).logits[:, 0]  # the router weight, recomputed with its gradient path
    ref = mod_layer_reference(m.blocks[0], x[0], selected, weight)
    (ref * upstream[0]).sum().backward()
    slow = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert set(slow) <= set(fast)
    for name, grad in slow.items():
        assert torch.allclose(fast[name], grad, atol=1e-5), name
    assert torch.allclose(fast_x, x.grad, atol=1e-5)


@pytest.mark.parametrize("capacity", [0.125, 0.3, 0.5])
def test_mod_capacity_is_respected_with_padding(capacity: float) -> None:
    m = model("mod", capacity=capacity, every=1)
    m.train()
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[1, 7:] = False
    out = m(ids(), padding_mask=pad)
    for decision in out.depth.decisions:
        for b, length in enumerate((12, 7)):
            executed = int((decision.choice_BS[b] == 1).sum())
            assert executed == min(length, max(1, int(length * capacity)))
            assert bool((decision.choice_BS[b, length:] == -1).all())
        assert out.depth.routings[0].num_experts == 1  # the expert-choice router over one "execute" expert


@pytest.mark.parametrize("mode", ["causal-aux", "causal-mlp"])
def test_mod_causal_predictors_never_look_ahead(mode: str) -> None:
    m = model("mod", capacity=0.25, every=1, eval_mode=mode).eval()
    with torch.no_grad():
        for module in m.depth.predictors.values():  # make both predictors select a mix of tokens
            module.net[-1].bias.fill_(0.0)
        x = ids()
        changed = x.clone()
        changed[:, 7:] = (changed[:, 7:] + 1) % VOCAB
        a, b = m(x), m(changed)
    for da, db in zip(a.depth.decisions, b.depth.decisions):
        assert torch.equal(da.choice_BS[:, :7], db.choice_BS[:, :7])
    assert torch.allclose(a.logits[:, :7], b.logits[:, :7], atol=1e-6)


def test_mod_trains_the_predictors_and_reports_mismatch() -> None:
    m = model("mod", capacity=0.25, every=1).train()
    out = m(ids(), ids())
    assert {"mod_bce_0", "mod_predictor_0", "mod_bce_1", "mod_predictor_1"} <= set(out.depth.losses)
    out.loss.backward()
    predictor = m.depth.predictors["0"].net[0].weight
    assert predictor.grad is not None and float(predictor.grad.abs().sum()) > 0
    assert 0.0 <= out.depth.extras["mismatch_mlp_0"] <= 1.0
    # the predictor reads a stop-gradient input: its loss alone puts no gradient into the LM
    m.zero_grad()
    out = m(ids(), ids())
    out.depth.losses["mod_predictor_0"].backward()
    assert m.embed.weight.grad is None or float(m.embed.weight.grad.abs().sum()) == 0.0


def test_mod_every_other_block_and_flops_fall_with_capacity() -> None:
    assert MoDStack(32, 4).layers == [1, 3]
    x = ids()
    full = model("mod", capacity=1.0, every=1, n_layers=2).train()(x).flops_per_token
    eighth = model("mod", capacity=0.125, every=1, n_layers=2).train()(x).flops_per_token
    dense = model(n_layers=2)(x).flops_per_token
    assert eighth < 0.5 * dense
    assert full > dense  # capacity 1 executes everything, plus the router


# --- the other stacks --------------------------------------------------------------------

def test_lff_equal_to_the_unit_gives_identical_outputs_at_any_sparsity() -> None:
    dense = model()
    x = ids()
    reference = dense(x).logits
    for sparsity in (0.1, 0.5, 1.0):
        for mode in ("topk", "threshold"):
            lff = same_weights(model("lff", sparsity=sparsity, eval_mode=mode), dense).eval()
            lff.depth.unit_override = [block.ffn for block in lff.blocks]
            out = lff(x)
            assert torch.allclose(out.logits, reference, atol=1e-5)
    lff = same_weights(model("lff", sparsity=1.0, eval_mode="topk"), dense).eval()  # rho = 1: the base model
    assert torch.allclose(lff(x).logits, reference, atol=1e-5)


def test_duo_big_mode_is_the_dense_model_and_skip_is_cheaper() -> None:
    dense = model()
    duo = same_weights(model("duo"), dense).eval()
    x = ids()
    with duo.depth.use_mode("big"):
        out = duo(x)
    assert torch.allclose(out.logits, dense(x).logits, atol=1e-5)
    assert out.flops_per_token == pytest.approx(dense(x).flops_per_token)
    with duo.depth.use_mode("skip"):
        assert duo(x).flops_per_token < out.flops_per_token


def test_drllm_execute_is_the_base_model_and_repeat_applies_a_block_twice() -> None:
    dense = model()
    dr = same_weights(model("drllm"), dense).eval()
    x = ids()
    with dr.depth.use_mode("execute"):
        assert torch.allclose(dr(x).logits, dense(x).logits, atol=1e-5)
    unrolled = model(n_layers=3)  # blocks (0, 0, 1): layer 0 repeated
    unrolled.load_state_dict({k.replace("blocks.1.", "blocks.2."): v for k, v in dense.state_dict().items()}, strict=False)
    unrolled.blocks[1].load_state_dict(dense.blocks[0].state_dict())
    dr.depth.set_decisions(torch.tensor([[2, 1], [2, 1]]))
    with dr.depth.use_mode("given"):
        out = dr(x)
    assert torch.allclose(out.logits, unrolled(x).logits, atol=1e-5)
    assert out.depth.decisions[0].rates() == {"skip": 0.0, "execute": 0.0, "repeat": 1.0}


def test_halting_theta_zero_is_all_hops_and_infinite_theta_is_one_hop() -> None:
    m = model("halting", ffn="moe", hops=3, threshold=0.0).eval()
    x = ids()
    with m.depth.use_mode("all-hops"):
        all_hops = m(x)
    assert torch.allclose(m(x).logits, all_hops.logits, atol=1e-6)
    m.depth.threshold = float("inf")
    one = m(x)
    assert all(bool((d.choice_BS == 0).all()) for d in one.depth.decisions)
    assert one.flops_per_token < all_hops.flops_per_token


def test_gamma_mod_protected_tokens_are_always_selected() -> None:
    m = model("gamma-mod", every=1).train()
    protected = torch.zeros(2, 12, dtype=torch.bool)
    protected[:, 8:] = True
    m.depth.set_protected(protected)
    out = m(ids(), ids())
    for decision in out.depth.decisions:
        assert bool((decision.choice_BS[:, 8:] == 1).all())
        assert int((decision.choice_BS[0] == 1).sum()) == 12 - 4  # ceil(12 (1 - 0.5 * 8/12)) = 8
    assert "gamma_ce_0" in out.depth.losses


def test_unknown_depth_router_and_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="Did you mean 'mod'"):
        model("mdo")
    with pytest.raises(ConfigError, match="capacity"):
        model("mod", capacty=0.5)
    with pytest.raises(ConfigError, match="capacity must be in"):
        model("mod", capacity=1.5)
    with pytest.raises(ConfigError, match="ffn='dense'"):
        model("duo", ffn="moe")
