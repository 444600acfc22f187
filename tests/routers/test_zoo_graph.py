"""Similarity- and attention-aware routing over a graph of tokens (Nguyen et al. 2025)."""

from __future__ import annotations

import pytest
import torch

import routelab
from routelab.core.context import RoutingContext, TokenBatch
from routelab.routers.families.graph import mix_probabilities

D, E = 8, 6


def batch_of(batch: int, seq: int, mask=None, attention=None) -> TokenBatch:
    return TokenBatch.from_mask(batch, seq, mask, context=RoutingContext(attention=attention))


def test_identity_graph_reduces_to_softmax_gating() -> None:
    torch.manual_seed(0)
    tb = batch_of(2, 5)
    p = torch.softmax(torch.randn(10, E), dim=-1)
    eye = torch.eye(5).expand(2, 5, 5)
    torch.testing.assert_close(mix_probabilities(p, eye, tb), p)
    # the preset with an identity attention matrix routes exactly like softmax top-k
    router = routelab.create_router("attention-aware", d_model=D, num_experts=E, top_k=2)
    mixtral = routelab.create_router("mixtral", d_model=D, num_experts=E, top_k=2)
    mixtral.scorer.weight.data.copy_(router.scorer.weight.data)
    x = torch.randn(10, D)
    a, b = router(x, batch_of(2, 5, attention=eye)), mixtral(x, batch_of(2, 5))
    assert torch.equal(a.topk_idx, b.topk_idx)
    torch.testing.assert_close(a.topk_weight, b.topk_weight)
    torch.testing.assert_close(a.scores, b.scores)


def test_uniform_graph_gives_every_token_of_a_sequence_the_same_experts() -> None:
    torch.manual_seed(0)
    x = torch.randn(2 * 7, D)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    x = x[mask.reshape(-1)]
    uniform = torch.full((2, 7, 7), 1.0 / 7)
    attention_router = routelab.create_router("attention-aware", d_model=D, num_experts=E, top_k=2)
    similarity_router = routelab.create_router("similarity-aware", d_model=D, num_experts=E, top_k=2,
                                               similarity_causal=False)
    similarity_router.score_fn.proj.weight.data.zero_()  # zero similarity scores -> S uniform over each sequence
    for router, attention in ((attention_router, uniform), (similarity_router, None)):
        routing = router(x, batch_of(2, 7, mask, attention))
        seq_id = torch.tensor([0] * 7 + [1] * 5)
        for s in (0, 1):
            rows = routing.topk_idx[seq_id == s]
            assert (rows == rows[0]).all(), "all tokens of a sequence pick the same experts"
            scores = routing.scores[seq_id == s]
            torch.testing.assert_close(scores, scores[:1].expand_as(scores))


def test_mixed_rows_sum_to_one_and_respect_causality_and_padding() -> None:
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    x = torch.randn(6, D)
    router = routelab.create_router("similarity-aware", d_model=D, num_experts=E)
    tb = batch_of(2, 4, mask)
    routing = router(x, tb)
    torch.testing.assert_close(routing.scores.sum(dim=-1), torch.ones(6))
    s = router.score_fn.similarity_matrix(x, tb)
    torch.testing.assert_close(s[0].sum(dim=-1), torch.ones(4))
    assert torch.equal(s[0].triu(1), torch.zeros(4, 4)), "causal: no weight on future tokens"
    assert torch.equal(s[1, :, 2:], torch.zeros(4, 2)), "no weight on padding"
    p_TE = torch.softmax(x @ router.scorer.weight.T, dim=-1)
    torch.testing.assert_close(routing.scores, mix_probabilities(p_TE, s, tb), atol=1e-6, rtol=1e-5)  # fused == S P
    # the first token of each sequence only sees itself: its routing is plain softmax gating
    p = torch.softmax(x @ router.scorer.weight.T, dim=-1)
    torch.testing.assert_close(routing.scores[[0, 4]], p[[0, 4]])


def test_attention_rows_are_restricted_to_real_tokens_and_renormalised() -> None:
    attention = torch.tensor([[[0.5, 0.25, 0.25], [0.2, 0.2, 0.6], [0.0, 0.0, 1.0]]])
    mask = torch.tensor([[True, True, False]])
    router = routelab.create_router("attention-aware", d_model=D, num_experts=E)
    a = router.score_fn.attention_matrix(batch_of(1, 3, mask, attention), torch.device("cpu"))
    torch.testing.assert_close(a[0, :2, :2], torch.tensor([[2 / 3, 1 / 3], [0.5, 0.5]]))
    x = torch.randn(2, D)
    routing = router(x, batch_of(1, 3, mask, attention))
    p_TE = torch.softmax(x @ router.scorer.weight.T, dim=-1)
    torch.testing.assert_close(routing.scores, mix_probabilities(p_TE, a, batch_of(1, 3, mask)))  # fused == A P
    lost = torch.tensor([[[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]])  # token 1 only attends to padding
    routing = router(x, batch_of(1, 3, mask, lost))
    torch.testing.assert_close(routing.scores[1], p_TE[1])  # ... so it keeps its own distribution
    causal = routelab.create_router("attention-aware", d_model=D, num_experts=E, attention_causal=True)
    a = causal.score_fn.attention_matrix(batch_of(1, 3, None, attention), torch.device("cpu"))
    torch.testing.assert_close(a[0], torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0, 0, 1.0]]))


def test_non_causal_similarity_is_equivariant_to_permutations_within_a_sequence() -> None:
    torch.manual_seed(0)
    router = routelab.create_router("similarity-aware", d_model=D, num_experts=E, similarity_causal=False).eval()
    x = torch.randn(9, D)
    perm = torch.randperm(9)
    a, b = router(x, batch_of(1, 9)), router(x[perm], batch_of(1, 9))
    torch.testing.assert_close(b.scores, a.scores[perm])


def test_attention_gradient_is_optional() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(4, D), torch.randn(4, E)
    for detach in (False, True):
        attention = torch.softmax(torch.randn(1, 4, 4), dim=-1).requires_grad_()
        router = routelab.create_router("attention-aware", d_model=D, num_experts=E, detach_attention=detach)
        routing = router(x, batch_of(1, 4, attention=attention))
        (routing.scores * w).sum().backward()
        assert (attention.grad is None) == detach


def test_bad_inputs_and_options_are_refused() -> None:
    router = routelab.create_router("attention-aware", d_model=D, num_experts=E)
    with pytest.raises(routelab.InputError, match="attention"):
        router(torch.randn(4, D))
    with pytest.raises(routelab.InputError, match=r"\[batch, seq, seq\]"):
        router(torch.randn(4, D), batch_of(1, 4, attention=torch.ones(1, 3, 3)))
    with pytest.raises(routelab.InputError, match="non-negative"):
        router(torch.randn(4, D), batch_of(1, 4, attention=-torch.ones(1, 4, 4)))
    layer = routelab.MoE(d_model=D, d_hidden=8, num_experts=E, router="attention-aware")
    with pytest.raises(routelab.InputError, match="attention"):
        layer(torch.randn(1, 4, D))
    with pytest.raises(routelab.ConfigError, match="similarity_temperature"):
        routelab.create_router("similarity-aware", d_model=D, num_experts=E, similarity_temperature=0.0)
    with pytest.raises(routelab.ConfigError, match="similarity_dim"):
        routelab.create_router("similarity-aware", d_model=D, num_experts=E, similarity_dim=0)


def causal_attention(batch: int, seq: int, g: torch.Generator) -> torch.Tensor:
    scores = torch.randn(batch, seq, seq, generator=g)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)


@pytest.mark.parametrize("name", ["attention-aware", "similarity-aware"])
@pytest.mark.parametrize("seed", range(4))
def test_permutation_and_padding_hold_up_to_float_rounding(name: str, seed: int) -> None:
    """The registry-wide properties, with a tolerance instead of bit-exact comparison."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    options = {"similarity_causal": False} if name == "similarity-aware" else {}
    layer = routelab.MoE(d_model=D, d_hidden=8, num_experts=E, top_k=2, router=name, **options).eval()
    batch, seq, pad = 3, 7, 3
    x = torch.randn(batch, seq, D, generator=g)
    attention = causal_attention(batch, seq + pad, g)
    base = layer(x, attention=attention[:, :seq, :seq])
    perm_s, perm_b = torch.randperm(seq, generator=g), torch.randperm(batch, generator=g)
    permuted = layer(x[perm_b][:, perm_s], attention=attention[:, :seq, :seq][perm_b][:, perm_s][:, :, perm_s])
    flat = (perm_b.view(-1, 1) * seq + perm_s.view(1, -1)).reshape(-1)
    torch.testing.assert_close(permuted.routing.scores, base.routing.scores[flat], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(permuted.y, base.y[perm_b][:, perm_s], atol=1e-5, rtol=1e-5)
    if name == "similarity-aware":
        layer = routelab.MoE(d_model=D, d_hidden=8, num_experts=E, top_k=2, router=name).eval()  # causal default
        base = layer(x)
    mask = torch.zeros(batch, seq + pad, dtype=torch.bool)
    mask[:, :seq] = True
    x_padded = torch.cat([x, 100 * torch.randn(batch, pad, D, generator=g)], dim=1)
    padded = layer(x_padded, padding_mask=mask, attention=attention)
    torch.testing.assert_close(padded.routing.scores, base.routing.scores, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(padded.y[:, :seq], base.y, atol=1e-5, rtol=1e-5)
    assert torch.equal(padded.y[:, seq:], torch.zeros_like(padded.y[:, seq:]))

