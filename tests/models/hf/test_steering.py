"""Router steering on tiny transformers MoE models.

Oracles (hand-computed): epsilon = 0 is the identity; a large positive epsilon puts the expert in
every token's top-k; forcing keeps the remaining slots in their original order; a large
negative epsilon removes the expert; selection-only steering leaves the gate values of
unchanged selections alone; Delta_e is the hand-computed risk difference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routelab.core.errors import ConfigError
from routelab.models.hf import activation_rates, attach, risk_difference, steer, top_experts
from tests.hf_tiny import ARCH_NAMES, KeepCalls, tiny_batch, tiny_model

pytest.importorskip("transformers")


def routed(handle, ids, mask):
    keep = handle.add_observer(KeepCalls())
    with torch.no_grad():
        logits = handle.model(ids, attention_mask=mask).logits
    handle.remove_observer(keep)
    return logits, keep.calls


@pytest.mark.parametrize("mode", ["logit", "selection", "force"])
@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_zero_epsilon_is_identity_and_large_epsilon_forces_the_expert(arch, mode):
    model = tiny_model(arch)
    ids, mask = tiny_batch(padded=True)
    with attach(model) as handle:
        base_logits, base_calls = routed(handle, ids, mask)
        with steer(handle, {1: [0]}, 0.0, mode=mode):
            logits, _ = routed(handle, ids, mask)
            assert torch.equal(logits, base_logits)
        with steer(handle, {1: [0]}, 1e3, mode=mode):
            _, calls = routed(handle, ids, mask)
        assert bool((calls[1].topk_idx_TK == 0).any(dim=1).all())
        assert torch.equal(calls[0].topk_idx_TK, base_calls[0].topk_idx_TK)  # layer 0 not steered
        with steer(handle, {1: [0]}, -1e3, mode=mode):
            _, calls = routed(handle, ids, mask)
        assert not bool((calls[1].topk_idx_TK == 0).any())
        assert handle.routelab_router(1) is None  # removing the steering restored the model's router
        logits, _ = routed(handle, ids, mask)
        assert torch.equal(logits, base_logits)


@pytest.mark.parametrize("arch", ["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "gpt_oss"])
def test_forcing_keeps_the_other_slots_in_their_original_order(arch):
    model = tiny_model(arch)
    ids, mask = tiny_batch()
    forced = 2
    with attach(model) as handle:
        _, base = routed(handle, ids, mask)
        with steer(handle, [forced], float("inf"), layers=[0], mode="force"):
            _, calls = routed(handle, ids, mask)
    k = handle.top_k
    ranking_TE = base[0].logits_TE.argsort(dim=1, descending=True)
    for t in range(ranking_TE.shape[0]):
        rest = [e for e in ranking_TE[t].tolist() if e != forced][: k - 1]
        assert calls[0].topk_idx_TK[t].tolist() == [forced] + rest


def test_selection_steering_keeps_the_gates_of_unchanged_selections():
    model = tiny_model("qwen3_moe", norm_topk_prob=False)
    ids, mask = tiny_batch()
    with attach(model) as handle:
        _, base = routed(handle, ids, mask)
        with steer(handle, [1], 0.02, layers=[0], mode="selection"):
            _, calls = routed(handle, ids, mask)
    before, after = base[0], calls[0]
    same = (before.topk_idx_TK.sort(dim=1).values == after.topk_idx_TK.sort(dim=1).values).all(dim=1)
    changed = ~same
    assert bool(changed.any()) and bool(same.any())  # a small offset changes some selections only
    assert bool((after.topk_idx_TK[changed] == 1).any(dim=1).all())  # ... towards the promoted expert
    probs_TE = torch.softmax(before.logits_TE, dim=-1)
    torch.testing.assert_close(after.topk_weight_TK, probs_TE.gather(1, after.topk_idx_TK), rtol=0, atol=0)


def test_risk_difference_oracle_and_top_experts():
    domain = np.array([[0, 1], [0, 2]])
    reference = np.array([[1, 2], [3, -1]])
    assert activation_rates(domain, 4).tolist() == [1.0, 0.5, 0.5, 0.0]
    assert activation_rates(reference, 4).tolist() == [0.0, 0.5, 0.5, 0.5]
    delta = risk_difference(domain, reference, 4)
    assert delta.tolist() == [1.0, 0.0, 0.0, -0.5]
    assert top_experts(delta, 2) == [0, 1]
    with pytest.raises(Exception, match="at least one token"):
        activation_rates(np.zeros((0, 2), dtype=np.int64), 4)


def test_steering_toward_domain_experts_raises_their_rate_elsewhere():
    model = tiny_model("mixtral")
    domain_ids = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(3))
    other_ids = torch.randint(40, 96, (2, 12), generator=torch.Generator().manual_seed(4))
    ones = torch.ones_like(domain_ids)
    with attach(model) as handle:
        _, domain_calls = routed(handle, domain_ids, ones)
        _, other_calls = routed(handle, other_ids, ones)
        delta = risk_difference(domain_calls[1].topk_idx_TK, other_calls[1].topk_idx_TK, handle.num_experts)
        expert = top_experts(delta, 1)[0]
        assert delta[expert] > 0
        before = activation_rates(other_calls[1].topk_idx_TK, handle.num_experts)[expert]
        with steer(handle, {1: [expert]}, 0.5):
            _, steered = routed(handle, other_ids, ones)
        after = activation_rates(steered[1].topk_idx_TK, handle.num_experts)[expert]
    assert after > before


def test_steering_errors_name_the_argument():
    with attach(tiny_model("mixtral")) as handle:
        with pytest.raises(ConfigError, match="out of range"):
            steer(handle, [9], 1.0)
        with pytest.raises(ConfigError, match="mode"):
            steer(handle, [0], 1.0, mode="push")
        with pytest.raises(ConfigError, match="finite"):
            steer(handle, [0], float("inf"))
        with pytest.raises(ConfigError, match="not an MoE layer"):
            steer(handle, {5: [0]}, 1.0)


def test_steering_and_rerouting_share_a_layer_and_undo_independently():
    from routelab.models.hf import Rerouter

    model = tiny_model("olmoe")
    ids, mask = tiny_batch()
    with attach(model) as handle:
        base, _ = routed(handle, ids, mask)
        steering = steer(handle, [1], 0.3, layers=[0])
        rerouter = Rerouter(handle, layers=[0], steps=1, lr=0.5)
        rerouter.fit(ids, mask)
        steering.remove()  # the rerouting offset keeps the routelab router in place
        assert handle.routelab_router(0) is not None and list(rerouter.deltas()) == [0]
        rerouter.reset()
        assert handle.routelab_router(0) is None
        after, _ = routed(handle, ids, mask)
    assert torch.equal(after, base)
