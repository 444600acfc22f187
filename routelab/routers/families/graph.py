"""Similarity-aware and attention-aware routing (Graph of Tokens, Nguyen et al. 2025).

Similarity- and attention-aware routing over a graph of tokens.

Nguyen, Tran, Nguyen & Baraniuk 2025, "Improving Routing in Sparse Mixture of Experts
with Graph of Tokens" (arXiv 2505.00792). Plain softmax gating routes every token
independently; here a token's expert distribution is mixed with those of related tokens
of the same sequence, ``P~ = S P`` (``P = softmax(z)``, rows of ``S`` sum to 1), which
lowers the entropy of the choice and the late-training routing fluctuation. Top-k then
runs on ``P~``.

* ``similarity``: ``S = softmax_row((x W_s)(x W_s)^T / (tau sqrt(d_s)))`` within each
  sequence, optionally causal (a token only mixes with itself and earlier tokens).
* ``attention``: ``S`` is the head-averaged attention matrix of the preceding attention
  sublayer (``RoutingContext.attention`` / ``MoE(..., attention=...)``), restricted to
  the real tokens and renormalised per row; optionally detached.

The exact parameterisation of ``S`` and whether attention is detached are not in
material we could read: both are options [recon]. Cost ``O(L^2 (E + d_s))`` per sequence.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from routelab.core.context import TokenBatch
from routelab.core.errors import ConfigError, InputError
from routelab.core.validation import check_choice, check_positive_int
from routelab.routers.parts.assembly import assemble_router, softmax_gate_mode
from routelab.routers.parts.layout import real_token_mask, to_padded
from routelab.routers.parts.router import Router, RoutingDraft, ScoreFunction
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

GRAPH_SOURCES = ("similarity", "attention")


def allowed_pairs(batch: TokenBatch, device: torch.device, causal: bool) -> torch.Tensor:
    """``[B, S, S]`` bool: which (query, key) token pairs may be mixed."""
    real_BS = real_token_mask(batch, device)
    allowed = real_BS.unsqueeze(1) & real_BS.unsqueeze(2)
    if causal:
        allowed = allowed & torch.ones(batch.seq_len, batch.seq_len, dtype=torch.bool, device=device).tril()
    return allowed


def mix_probabilities(p_TE: torch.Tensor, s_BSS: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """``P~ = S P`` within each sequence: row t of the result is ``sum_j S[t, j] P[j]``.

    ``s_BSS`` is indexed by positions of the padded layout; entries touching padding must
    be zero (they multiply zero rows of ``P`` anyway).
    """
    p_BSE = to_padded(p_TE, batch)
    mixed_BSE = torch.bmm(s_BSS, p_BSE)
    return mixed_BSE.reshape(-1, p_TE.shape[-1]).index_select(0, batch.flat_index_T)


class TokenGraphSoftmax(ScoreFunction):
    """``logits -> S softmax(logits)``: softmax gating mixed over a graph of tokens.

    Args:
        d_model: width of the routed hidden states (for ``W_s``).
        source: ``similarity`` or ``attention``.
        similarity_dim: ``d_s``, width of the similarity projection.
        temperature: ``tau`` of the similarity softmax.
        causal: mask future tokens (similarity source; for the attention source the mask
            of the given matrix is used as is unless this is True).
        detach_attention: stop gradients into the attention matrix.
        init_std: std of ``W_s``.
    """

    probabilities = True

    def __init__(
        self,
        d_model: int,
        *,
        source: str = "similarity",
        similarity_dim: int | None,
        temperature: float,
        causal: bool,
        detach_attention: bool,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.source = check_choice("graph_source", source, GRAPH_SOURCES)
        self.temperature = float(temperature)
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"similarity_temperature must be a finite number > 0, got {temperature}.")
        self.causal = bool(causal)
        self.detach_attention = bool(detach_attention)
        self.similarity_dim = None  # the attention graph has no similarity space
        self.proj = None
        if self.source == "similarity":
            self.similarity_dim = check_positive_int("similarity_dim", similarity_dim)
            self.proj = nn.Linear(d_model, self.similarity_dim, bias=False)
            nn.init.normal_(self.proj.weight, std=init_std if init_std > 0 else 1.0 / math.sqrt(d_model))

    def extra_repr(self) -> str:
        return f"source={self.source!r}, causal={self.causal}, temperature={self.temperature}"

    def similarity_scale(self) -> float:
        return 1.0 / (self.temperature * math.sqrt(self.similarity_dim))

    def similarity_matrix(self, x_TD: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """``[B, S, S]`` row-stochastic similarity over each sequence's allowed pairs (for
        inspection; ``forward`` computes ``S P`` without materialising ``S``)."""
        assert self.proj is not None
        u_BSF = to_padded(self.proj(x_TD), batch)
        scores_BSS = torch.bmm(u_BSF, u_BSF.transpose(1, 2)) * self.similarity_scale()
        allowed_BSS = allowed_pairs(batch, x_TD.device, self.causal)
        scores_BSS = scores_BSS.masked_fill(~allowed_BSS, float("-inf"))
        s_BSS = torch.softmax(scores_BSS, dim=-1)
        return torch.nan_to_num(s_BSS, nan=0.0)  # padding rows have no allowed key

    def mix_by_similarity(self, x_TD: torch.Tensor, p_TE: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """``S P`` as one fused attention call (``q = k = x W_s``, ``v = P``)."""
        assert self.proj is not None
        u_B1SF = to_padded(self.proj(x_TD), batch).unsqueeze(1)
        p_B1SE = to_padded(p_TE, batch).unsqueeze(1)
        mask, is_causal = None, False
        if batch.has_padding:
            eye_SS = torch.eye(batch.seq_len, dtype=torch.bool, device=x_TD.device)
            mask = (allowed_pairs(batch, x_TD.device, self.causal) | eye_SS).unsqueeze(1)  # padding rows: themselves
        else:
            is_causal = self.causal
        mixed_B1SE = F.scaled_dot_product_attention(
            u_B1SF, u_B1SF, p_B1SE, attn_mask=mask, is_causal=is_causal, scale=self.similarity_scale()
        )
        return mixed_B1SE.squeeze(1).reshape(-1, p_TE.shape[-1]).index_select(0, batch.flat_index_T)

    def checked_attention(self, batch: TokenBatch, device: torch.device) -> torch.Tensor:
        """The layer's attention matrix as fp32 ``[B, S, S]``, validated (one pass)."""
        attention = batch.context.attention
        expected = (batch.batch_size, batch.seq_len, batch.seq_len)
        if attention is None:
            raise InputError(
                "attention-aware routing needs the attention matrix of the preceding attention sublayer: pass "
                f"attention=[batch, seq, seq] (head-averaged, shape {list(expected)}) to the MoE layer or set "
                "RoutingContext.attention."
            )
        if tuple(attention.shape) != expected:
            raise InputError(f"attention must have shape [batch, seq, seq] = {list(expected)}, got {list(attention.shape)}.")
        if not attention.is_floating_point():
            raise InputError(f"attention must be a floating tensor, got {attention.dtype}.")
        a_BSS = attention.to(device=device, dtype=torch.float32)
        if self.detach_attention:
            a_BSS = a_BSS.detach()
        low, high = torch.aminmax(a_BSS.detach())
        if not (float(low) >= 0 and math.isfinite(float(high))):  # NaN fails both comparisons
            raise InputError("attention must hold finite non-negative weights (softmax outputs).")
        if batch.has_padding or self.causal:
            a_BSS = a_BSS * allowed_pairs(batch, device, self.causal)
        return a_BSS

    def attention_matrix(self, batch: TokenBatch, device: torch.device) -> torch.Tensor:
        """``[B, S, S]``: the attention restricted to allowed pairs, rows renormalised (for
        inspection; ``forward`` folds the renormalisation into one product)."""
        a_BSS = self.checked_attention(batch, device)
        row_sum = a_BSS.sum(dim=-1, keepdim=True)
        # A real token whose attention has no mass on real tokens keeps its own distribution.
        eye_BSS = torch.eye(batch.seq_len, device=device).expand_as(a_BSS)
        return torch.where(row_sum > 0, a_BSS / row_sum.clamp_min(1e-30), eye_BSS)

    def mix_by_attention(self, p_TE: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
        """``A P / (A 1)`` in one batched product (the last column carries the row sums)."""
        a_BSS = self.checked_attention(batch, p_TE.device)
        ones_T1 = torch.ones_like(p_TE[:, :1])
        mixed_TE1 = mix_probabilities(torch.cat([p_TE, ones_T1], dim=1), a_BSS, batch)
        mass_T1 = mixed_TE1[:, -1:]
        # A real token whose attention has no mass on real tokens keeps its own distribution.
        return torch.where(mass_T1 > 0, mixed_TE1[:, :-1] / mass_T1.clamp_min(1e-30), p_TE)

    def forward(self, logits_TE: torch.Tensor, draft: RoutingDraft) -> torch.Tensor:
        p_TE = torch.softmax(logits_TE, dim=-1)
        draft.extras["token_probs_TE"] = p_TE
        if draft.num_tokens == 0:
            return p_TE
        if self.source == "similarity":
            return self.mix_by_similarity(draft.x_TD, p_TE, draft.batch)
        return self.mix_by_attention(p_TE, draft.batch)


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
        "equivariant to permutations within a sequence (tested in tests/routers/test_zoo_graph.py)",
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
        detach_attention=False,
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
        spec.d_model, source="attention", similarity_dim=None, temperature=1.0, causal=attention_causal,
        detach_attention=detach_attention,
    )
    return graph_router(spec, common, score_fn, normalization)
