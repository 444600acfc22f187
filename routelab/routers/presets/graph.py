"""Similarity-aware and attention-aware routing (Graph of Tokens, Nguyen et al. 2025; spec §11)."""

from __future__ import annotations

from routelab.routers.base import Router
from routelab.routers.presets.common import assemble_router, softmax_gate_mode
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset
from routelab.routers.token_graph import TokenGraphSoftmax

_PAPER = "Nguyen, Tran, Nguyen & Baraniuk 2025, Improving Routing in Sparse MoE with Graph of Tokens (arXiv 2505.00792)"


def graph_router(spec: RouterSpec, common: CommonOptions, score_fn: TokenGraphSoftmax, normalization: str) -> Router:
    return assemble_router(spec, common, score_fn=score_fn, gate_mode=softmax_gate_mode(normalization, spec.top_k))


@register_preset(
    "similarity-aware",
    description="softmax probabilities mixed over similar tokens of the sequence, P~ = S P with "
    "S = softmax((xW)(xW)^T / tau sqrt(d_s)) (causal); top-k on P~",
    paper=_PAPER,
    default_top_k=2,
    common_defaults={"aux_loss_coef": 1e-2},
    exemptions={
        "token_permutation": "with similarity_causal=True (the default, for decoders) a token mixes only with earlier "
        "tokens, so its routing depends on the order of its sequence; with similarity_causal=False it is "
        "equivariant to permutations within a sequence (tested in tests/test_zoo_graph.py)",
    },
)
def build_similarity_aware(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    similarity_dim: int = 64,
    similarity_temperature: float = 1.0,
    similarity_causal: bool = True,
    normalization: str = "auto",
) -> Router:
    """Similarity-Aware SMoE [recon]: ``P = softmax(x W_r^T)``; within each sequence
    ``S = softmax_row((x W_s)(x W_s)^T / (tau sqrt(d_s)))`` over the real tokens (causal by
    default), ``P~ = S P``; top-k on ``P~``; gates are ``P~`` at the selected experts,
    renormalised for ``top_k > 1`` (``normalization``). Balance losses use ``P~``.
    ``W_s`` is ``[similarity_dim, D]``.
    """
    score_fn = TokenGraphSoftmax(
        spec.d_model,
        source="similarity",
        similarity_dim=similarity_dim,
        temperature=similarity_temperature,
        causal=similarity_causal,
        init_std=common.router_init_std,
    )
    return graph_router(spec, common, score_fn, normalization)


@register_preset(
    "attention-aware",
    description="softmax probabilities mixed with the preceding attention matrix, P~ = A P (needs attention=...); "
    "top-k on P~",
    paper=_PAPER,
    default_top_k=2,
    common_defaults={"aux_loss_coef": 1e-2},
    needs_attention=True,
)
def build_attention_aware(
    spec: RouterSpec,
    common: CommonOptions,
    *,
    detach_attention: bool = False,
    attention_causal: bool = False,
    normalization: str = "auto",
) -> Router:
    """Attention-Aware SMoE [recon]: ``P~ = A P`` with ``A`` the head-averaged attention of
    the preceding attention sublayer, passed as ``MoE(..., attention=[B, S, S])`` or
    ``RoutingContext.attention``; its rows are restricted to the real tokens and
    renormalised (a row with no mass keeps the token's own ``P``). ``attention_causal``
    additionally masks future tokens (off: a decoder's attention is causal already);
    ``detach_attention`` stops gradients into the attention. Gates as in
    ``similarity-aware``.
    """
    score_fn = TokenGraphSoftmax(
        spec.d_model, source="attention", causal=attention_causal, detach_attention=detach_attention
    )
    return graph_router(spec, common, score_fn, normalization)
