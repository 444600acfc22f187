"""Fixed-assignment presets: hash layers and random-fixed routing.

Fixed token-id routing: Hash Layers (Roller et al. 2021, "Hash Layers For Large Sparse Models").

The expert of a token is a fixed function of its *input vocabulary id* (not its hidden
state): no router parameters, no aux loss, gate 1 (``1/k`` for ``k > 1``). Modes:

* ``random``: a seeded pseudo-random priority per (id, expert); the token takes the
  top-k, so every id maps to ``k`` distinct experts, uniformly at random.
* ``balanced``: ids sorted by training frequency, each greedily given to the currently
  least-loaded expert(s); call ``fit(token_counts)`` first.
* ``bigram``: the random hash of (previous id, current id) within the sequence.
"""

from __future__ import annotations

import torch

from routelab.core.errors import ConfigError, InputError
from routelab.core.validation import check_choice, check_top_k
from routelab.routers.parts.assembly import assemble_router, softmax_gate_mode
from routelab.routers.parts.router import FitsData, Router, RoutingDraft, Selector, TrainingData
from routelab.routers.parts.score_functions import Identity
from routelab.routers.parts.scorers import ConstantScorer, LinearScorer
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset

HASH_MODES = ("random", "balanced", "bigram")
_MASK31 = 0x7FFFFFFF


def mix_hash(key: torch.Tensor, seed: int) -> torch.Tensor:
    """A 31-bit integer mixing hash of a non-negative int64 tensor.

    Multiply-xorshift rounds on 31-bit lanes: every product stays below 2**62, so no
    int64 overflow happens on any backend.
    """
    high = (key >> 31) & _MASK31
    x = (key & _MASK31) ^ ((high * 0x2545F491) & _MASK31) ^ (seed & _MASK31)
    for multiplier, shift in ((0x5BD1E995, 15), (0x27D4EB2D, 13), (0x165667B1, 16)):
        x = (x * multiplier) & _MASK31
        x = x ^ (x >> shift)
    return x


class HashSelector(Selector, FitsData):
    """Route each token by a fixed function of its token id (needs ``token_ids``).

    ``hash_mode='balanced'`` is fitted to the training token counts before training
    (``routelab.fit_to_data``, which the lab calls).
    """

    constant_gates = True  # every selected expert gets 1/k

    def __init__(
        self,
        num_experts: int,
        top_k: int = 1,
        *,
        mode: str,
        seed: int,
        vocab_size: int | None,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = check_top_k(top_k, num_experts)
        self.mode = check_choice("hash_mode", mode, HASH_MODES)
        self.seed = int(seed)
        self.vocab_size = vocab_size
        if self.mode == "balanced":
            if vocab_size is None:
                raise ConfigError("hash_mode='balanced' needs vocab_size=<size of the token vocabulary>.")
            self.register_buffer("table", torch.full((vocab_size, self.top_k), -1, dtype=torch.long))
        else:
            if vocab_size is not None:
                raise ConfigError(
                    f"vocab_size is used only by hash_mode='balanced' (its frequency table); hash_mode={mode!r} "
                    "hashes any id. Leave vocab_size out."
                )
            self.table = None

    def random_experts(self, key_T: torch.Tensor) -> torch.Tensor:
        experts_E = torch.arange(self.num_experts, device=key_T.device)
        priority_TE = mix_hash(key_T.unsqueeze(1) * self.num_experts + experts_E, self.seed)
        return torch.topk(priority_TE, self.top_k, dim=-1).indices

    @torch.no_grad()
    def fit(self, token_counts_V: torch.Tensor) -> None:
        """Balanced assignment: most frequent ids first, each to the least-loaded experts."""
        if self.mode != "balanced":
            raise ConfigError(f"fit() is only for hash_mode='balanced' (this router uses {self.mode!r}).")
        counts = token_counts_V.to(torch.float64).cpu()
        if counts.numel() != self.vocab_size:
            raise InputError(f"token_counts has {counts.numel()} entries but vocab_size={self.vocab_size}.")
        load = [0.0] * self.num_experts
        table = torch.empty(self.vocab_size, self.top_k, dtype=torch.long)
        order = torch.argsort(counts, descending=True, stable=True).tolist()
        for token_id in order:
            freq = float(counts[token_id])
            chosen = sorted(range(self.num_experts), key=lambda e: (load[e], e))[: self.top_k]
            for slot, e in enumerate(chosen):
                table[token_id, slot] = e
                load[e] += freq
        self.table.copy_(table.to(self.table.device))

    def fit_data(self, data: TrainingData) -> None:
        if self.mode == "balanced":
            self.fit(data.token_counts_V)

    def expert_ids(self, draft: RoutingDraft) -> torch.Tensor:
        ids_T = draft.batch.token_ids_T
        if ids_T is None:
            raise InputError(
                "this router routes by token id: pass token_ids=[batch, seq] int64 to the MoE layer "
                "(or a TokenBatch with token_ids) — hash routing cannot use hidden states."
            )
        if self.mode == "random":
            return self.random_experts(ids_T)
        if self.mode == "bigram":
            same_seq = torch.zeros_like(ids_T, dtype=torch.bool)
            same_seq[1:] = draft.batch.seq_id_T[1:] == draft.batch.seq_id_T[:-1]
            prev_T = torch.where(same_seq, torch.roll(ids_T, 1), torch.full_like(ids_T, -1))
            return self.random_experts((prev_T + 1) * 1_000_003 + ids_T)
        if int(ids_T.max()) >= self.vocab_size:
            raise InputError(f"token_ids contain id {int(ids_T.max())} >= vocab_size={self.vocab_size}.")
        experts_TK = self.table[ids_T]
        if bool((experts_TK < 0).any()):
            raise ConfigError("hash_mode='balanced' table is not fitted: call router.selector.fit(token_counts) first.")
        return experts_TK

    def forward(self, draft: RoutingDraft) -> tuple[torch.Tensor, torch.Tensor]:
        if draft.num_tokens == 0:
            device = draft.x_TD.device
            return torch.empty(0, self.top_k, dtype=torch.long, device=device), torch.empty(0, self.top_k, device=device)
        topk_idx_TK = self.expert_ids(draft)
        gate_TK = torch.full(topk_idx_TK.shape, 1.0 / self.top_k, device=topk_idx_TK.device)
        return topk_idx_TK, gate_TK


def hash_router(spec: RouterSpec, common: CommonOptions, selector: HashSelector) -> Router:
    return assemble_router(
        spec, common, scorer=ConstantScorer(spec.num_experts), score_fn=Identity(), selector=selector, gate_mode="none"
    )


@register_preset(
    "hash",
    description="expert = fixed hash of the input token id (random, frequency-balanced or bigram); no router weights",
    paper="Roller et al. 2021, Hash Layers For Large Sparse Models (arXiv 2106.04426)",
    default_top_k=1,
    needs_token_ids=True,
)
def build_hash(
    spec: RouterSpec, common: CommonOptions, *, hash_mode: str = "random", seed: int = 0, vocab_size: int | None = None
) -> Router:
    """Hash layer: needs ``token_ids`` at call time. ``hash_mode='balanced'`` needs
    ``vocab_size`` and a call to ``router.selector.fit(token_counts)``."""
    return hash_router(spec, common, HashSelector(spec.num_experts, spec.top_k, mode=hash_mode, seed=seed, vocab_size=vocab_size))


@register_preset(
    "random-fixed",
    description="routing fixed at initialisation: a frozen random router (default) or a random token-id table",
    paper="Equifinality in MoE routing (arXiv 2604.14419), random-fixed baseline",
    default_top_k=2,
)
def build_random_fixed(
    spec: RouterSpec, common: CommonOptions, *, fixed_mode: str = "frozen-linear", seed: int = 0
) -> Router:
    """Random-fixed routing [recon]: ``frozen-linear`` draws ``W_r ~ N(0, router_init_std^2)``
    from ``seed`` and never trains it (softmax top-k, renormalised for k > 1);
    ``id-table`` routes by a seeded random hash of the token id (needs ``token_ids``)."""
    check_choice("fixed_mode", fixed_mode, ("frozen-linear", "id-table"))
    if fixed_mode == "id-table":
        return hash_router(spec, common, HashSelector(spec.num_experts, spec.top_k, mode="random", seed=seed, vocab_size=None))
    scorer = LinearScorer(
        spec.d_model, spec.num_experts, init_std=common.router_init_std or 0.02,
        jitter_eps=common.jitter_eps, trainable=False, seed=seed,
    )
    return assemble_router(spec, common, scorer=scorer, gate_mode=softmax_gate_mode("auto", spec.top_k))
