"""Fixed-assignment presets: hash layers and random-fixed routing (spec §6)."""

from __future__ import annotations

from routelab.core.validation import check_choice
from routelab.routers.base import Router
from routelab.routers.hashing import HashSelector
from routelab.routers.presets.common import assemble_router, softmax_gate_mode
from routelab.routers.registry import CommonOptions, RouterSpec, register_preset
from routelab.routers.score_functions import Identity
from routelab.routers.scorers import ConstantScorer, LinearScorer


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
        return hash_router(spec, common, HashSelector(spec.num_experts, spec.top_k, mode="random", seed=seed))
    scorer = LinearScorer(
        spec.d_model, spec.num_experts, init_std=common.router_init_std or 0.02,
        jitter_eps=common.jitter_eps, trainable=False, seed=seed,
    )
    return assemble_router(spec, common, scorer=scorer, gate_mode=softmax_gate_mode("auto", spec.top_k))
