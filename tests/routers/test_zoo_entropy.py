"""Entropy-driven routing: DynMoLE (Li et al. 2025) and MAGNET (Dai et al. 2026)."""

from __future__ import annotations

import math

import pytest
import torch

import routelab
from routelab.core.context import TokenBatch
from routelab.routers.parts.router import RoutingDraft
from routelab.routers.families.dynamic import TopPSelector
from routelab.routers.families.entropy import DynMoLESelector, MagnetLoss, normalized_entropy, renyi_entropy, tsallis_entropy


def draft_of(p_TE: torch.Tensor, training: bool = False) -> RoutingDraft:
    p_TE = p_TE.float()
    return RoutingDraft(x_TD=torch.zeros(p_TE.shape[0], 1), batch=TokenBatch.single_sequence(p_TE.shape[0]),
                        num_experts=p_TE.shape[1], top_k=2, training=training, logits_TE=p_TE.log(), scores_TE=p_TE,
                        selection_scores_TE=p_TE, extras={"scores_are_probs": True})


DYNMOLE = routelab.preset_info("dynmole").specific_options()  # the family's defaults live in its presets
MAGNET = routelab.preset_info("magnet").specific_options()


def dynmole_selector(num_experts: int, keep: int, **overrides) -> DynMoLESelector:
    options = {"top_p": DYNMOLE["top_p"], "threshold": DYNMOLE["entropy_threshold"],
               "entropy_index": DYNMOLE["entropy_index"], "entropy_kind": DYNMOLE["entropy_kind"],
               "eps": DYNMOLE["entropy_eps"]}
    return DynMoLESelector(num_experts, keep, **{**options, **overrides})


def magnet_loss(**overrides) -> MagnetLoss:
    options = {"coverage_weight": MAGNET["coverage_weight"], "specialization_weight": MAGNET["specialization_weight"],
               "trigger": MAGNET["entropy_trigger"], "ema_decay": MAGNET["entropy_ema_decay"],
               "ramp_steps": MAGNET["ramp_steps"], "patience": MAGNET["patience"]}
    return MagnetLoss(**{**options, **overrides})


def experts_of(idx: torch.Tensor) -> list[list[int]]:
    return [sorted(e for e in row if e >= 0) for row in idx.tolist()]


def test_tsallis_entropy_oracles() -> None:
    uniform = torch.full((1, 4), 0.25)
    assert float(tsallis_entropy(uniform, 2.0)) == pytest.approx(0.75)
    assert float(tsallis_entropy(uniform, 1.1)) == pytest.approx(1.2945, abs=1e-4)
    assert float(normalized_entropy(uniform, "tsallis", 1.1)) == pytest.approx(1.0)
    p = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.03, 0.02]])
    assert float(normalized_entropy(p, "tsallis", 1.1, eps=1e-5)) == pytest.approx(0.7091, abs=5e-5)  # DynMoLE eps
    assert float(normalized_entropy(p, "tsallis", 1.1)) == pytest.approx(0.7094, abs=5e-5)
    assert float(tsallis_entropy(p, 1.0)) == pytest.approx(-sum(v * math.log(v) for v in p[0].tolist()), rel=1e-5)
    assert float(renyi_entropy(uniform, 2.0)) == pytest.approx(math.log(4), rel=1e-6)


def test_dynmole_top_p_rule_differs_from_an_et_al() -> None:
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    confident = 0.99  # soft-routing threshold above this token's normalised entropy

    def dynmole(keep: int, top_p: float) -> list[list[int]]:
        return experts_of(dynmole_selector(4, keep, top_p=top_p, threshold=confident)(draft_of(p))[0])

    def an_et_al(top_p: float) -> list[list[int]]:
        return experts_of(TopPSelector(4, top_p)(draft_of(p))[0])

    assert dynmole(2, 0.6) == an_et_al(0.6) == [[0, 1]]  # hand-computed: P = .6, keep 2 -> {0, 1}; the rules agree
    assert dynmole(2, 0.4) == [[0, 1]] and an_et_al(0.4) == [[0]]  # ... and differ at P = .4
    assert dynmole(1, 0.79) == [[0]] and an_et_al(0.79) == [[0, 1]]  # cumsum <= P vs "first to exceed P"


def test_dynmole_routes_uncertain_tokens_to_every_expert_with_raw_gates() -> None:
    p = torch.tensor([[0.5, 0.3, 0.1, 0.05, 0.03, 0.02], [0.2, 0.18, 0.17, 0.16, 0.15, 0.14]])
    idx, gates = dynmole_selector(6, 2)(draft_of(p))  # defaults: threshold .9, q 1.1, top_p .75
    assert experts_of(idx) == [[0, 1], [0, 1, 2, 3, 4, 5]]  # entropy .709 < .9: top-p; second token > .9: all
    torch.testing.assert_close(gates[1].sort(descending=True).values, p[1])


def test_dynmole_losses_by_hand() -> None:
    router = routelab.create_router("dynmole", d_model=4, num_experts=4)
    assert {loss.name: loss.coef for loss in router.losses} == {"dynmole_entropy": 1e-2, "dynmole_aux": 1e-3}
    assert router.selector.top_p == 0.75 and router.selector.threshold == 0.9 and router.selector.entropy_index == 1.1
    p = torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.1, 0.6, 0.2, 0.1]])
    draft = draft_of(p)
    draft.topk_idx_TK, _ = router.selector(draft)
    losses = {loss.name: float(loss(draft)) for loss in router.losses}
    mask = torch.tensor([[1.0, 1, 0, 0], [0, 1, 1, 0]])  # cumsum <= .75 plus the first 2
    f = (p * mask).mean(dim=0)
    assert losses["dynmole_aux"] == pytest.approx(float(4 * (f * p.mean(dim=0)).sum()), rel=1e-5)
    expected_entropy = normalized_entropy(p, "tsallis", 1.1, eps=1e-5).mean()
    assert losses["dynmole_entropy"] == pytest.approx(float(expected_entropy), rel=1e-5)


def test_magnet_switches_exactly_at_the_first_crossing_and_never_reverts() -> None:
    loss = magnet_loss(trigger=0.5, ema_decay=0.0, ramp_steps=2)  # decay 0: the EMA is the last value
    stages = []
    for value in [0.9, 0.7, 0.45, 0.8, 0.95, 0.3]:
        loss.observe_entropy(value)
        loss.end_of_step()
        stages.append(int(loss.stage))
    assert stages == [1, 1, 2, 2, 2, 2]


def test_magnet_ema_trigger_and_patience() -> None:
    loss = magnet_loss(trigger=0.5, ema_decay=0.5)
    for value in [0.8, 0.4]:  # EMA: .8 then .6: not below .5 yet
        loss.observe_entropy(value)
        loss.end_of_step()
    assert int(loss.stage) == 1 and float(loss.entropy_ema) == pytest.approx(0.6)
    loss.observe_entropy(0.3)  # .45
    loss.end_of_step()
    assert int(loss.stage) == 2
    stall = magnet_loss(trigger=0.1, ema_decay=0.0, patience=2)
    for value in [0.8, 0.8, 0.8]:
        stall.observe_entropy(value)
        stall.end_of_step()
    assert int(stall.stage) == 2, "switches when the EMA stops improving for `patience` steps"


def test_magnet_loss_values_per_stage_and_stage_lives_in_state_dict() -> None:
    p = torch.tensor([[0.9, 0.1], [0.1, 0.9]])
    loss = magnet_loss(coverage_weight=0.1, specialization_weight=0.2, trigger=0.99, ema_decay=0.0, ramp_steps=4)
    draft = draft_of(p, training=True)
    assert float(loss(draft)) == pytest.approx(-0.1)  # stage 1: -l1 * H(mean p)/ln 2 = -0.1 * 1
    loss.end_of_step()  # observed entropy (~.47) < .99: stage 2
    h_tok = float(-(p * p.log()).sum(dim=1).mean() / math.log(2))
    assert int(loss.stage) == 2 and float(loss(draft)) == pytest.approx(0.2 * 0.25 * h_tok, rel=1e-5)
    loss.end_of_step()
    assert float(loss(draft)) == pytest.approx(0.2 * 0.5 * h_tok, rel=1e-5)  # the ramp rises
    fresh = magnet_loss()
    fresh.load_state_dict(loss.state_dict())
    assert int(fresh.stage) == 2 and int(fresh.steps_in_stage2) == int(loss.steps_in_stage2)


def test_magnet_in_the_layer_observes_only_in_training() -> None:
    torch.manual_seed(0)
    layer = routelab.MoE(d_model=8, d_hidden=8, num_experts=4, router="magnet", entropy_trigger=0.999)
    magnet = layer.router.losses[-1]
    layer.eval()
    layer(torch.randn(1, 5, 8))
    assert float(magnet.pending_count) == 0
    layer.train()
    out = layer(torch.randn(1, 5, 8))
    assert out.routing.stats["magnet_stage"] == 1 and float(magnet.pending_count) == 1
    routelab.end_of_step(layer)
    assert int(magnet.stage) == 2


def test_bad_options_are_refused() -> None:
    with pytest.raises(routelab.ConfigError, match="top_p"):
        routelab.create_router("dynmole", d_model=4, num_experts=4, top_p=1.5)
    with pytest.raises(routelab.ConfigError, match="entropy_kind"):
        routelab.create_router("dynmole", d_model=4, num_experts=4, entropy_kind="gini")
    with pytest.raises(routelab.ConfigError, match="entropy_index"):
        routelab.create_router("dynmole", d_model=4, num_experts=4, entropy_index=0.0)
    with pytest.raises(routelab.ConfigError, match="entropy_trigger"):
        routelab.create_router("magnet", d_model=4, num_experts=4, entropy_trigger=2.0)
    with pytest.raises(routelab.ConfigError, match="entropy_ema_decay"):
        routelab.create_router("magnet", d_model=4, num_experts=4, entropy_ema_decay=1.0)
    with pytest.raises(routelab.ConfigError, match="ramp_steps"):
        routelab.create_router("magnet", d_model=4, num_experts=4, ramp_steps=-1)
