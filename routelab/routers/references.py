"""Which reference implementation each preset agrees with, and how closely (docs/routers.md).

One line per registered preset, saying only what the named tests check: a reference
implementation run side by side (transformers router blocks), or hand-computed cases from a
reference's own formulas where the reference cannot be installed (GShard, fairseq,
Megatron-Core, DeepSeek-V3 inference code), or the paper's equations where no public code
was compared. A test keeps this table complete.
"""

from __future__ import annotations

_ZOO = "paper equations only (no reference code compared): hand-computed cases in tests/routers/{}"

REFERENCE_AGREEMENT: dict[str, str] = {
    "switch": "Switch Transformer equations (gate = softmax probability, loss E·Σf·P): hand-computed cases, "
    "1e-6 (tests/routers/test_foundation_oracles.py)",
    "gshard": "GShard Algorithm 1 / fairseq top2gating: drops and indices exact, gates and first-choice loss "
    "within 1e-6 (tests/routers/test_reference_agreement.py); gates renormalised before drops as in the paper "
    "(fairseq's default renormalises after)",
    "mixtral": "transformers Mixtral/OLMoE/Qwen-MoE routers (norm_topk_prob): bit-exact at top-2 and top-3 "
    "(tests/models/hf/test_reference_agreement.py)",
    "topk": "Megatron-Core topk_softmax_with_capacity normalisations; transformers OLMoE/Qwen-MoE without "
    "norm_topk_prob (pre_softmax_norenorm): bit-exact; sigmoid_norm at top-1 keeps sigmoid(z) as Megatron-Core "
    "(tests/models/hf/test_reference_agreement.py, tests/routers/test_reference_agreement.py)",
    "noisy-topk": "Shazeer et al. 2017 equations: hand-computed cases (tests/routers/test_foundation_oracles.py)",
    "deepseek-v3": "transformers DeepseekV3TopkRouter: bit-exact at top-2 with top_k // group_topk = 2, gates "
    "within 2e-7 beyond (unsorted vs sorted gate sum); sequence loss = report eq. 17-20 / Megatron-Core on the "
    "unbiased top-k, within 1e-6 (tests/models/hf/test_reference_agreement.py, tests/routers/test_reference_agreement.py)",
    "loss-free": "Wang et al. 2024 sign rule and Megatron-Core bias update (loads after drops): hand-computed "
    "bias updates, 1e-6 (tests/routers/test_reference_agreement.py, tests/routers/test_loss_free_options.py)",
    "expert-choice": "Zhou et al. 2022 equations: hand-computed cases (tests/routers/test_foundation_oracles.py)",
    "hash": "Roller et al. 2021 hash routing: hand-computed cases (tests/routers/test_foundation_oracles.py)",
    "random-fixed": "frozen seeded linear router: hand-computed cases (tests/routers/test_foundation_oracles.py)",
    "top-p": _ZOO.format("test_zoo_dynamic.py"),
    "dynamoe": _ZOO.format("test_zoo_dynamic.py"),
    "rmoe": _ZOO.format("test_zoo_recurrent.py"),
    "similarity-aware": _ZOO.format("test_zoo_graph.py"),
    "attention-aware": _ZOO.format("test_zoo_graph.py"),
    "erc": _ZOO.format("test_zoo_coupling.py"),
    "rexmoe": _ZOO.format("test_zoo_reuse.py"),
    "condenser": _ZOO.format("test_zoo_reuse.py"),
    "moe-x": _ZOO.format("test_zoo_sparsity.py"),
    "dynmole": _ZOO.format("test_zoo_entropy.py"),
    "magnet": _ZOO.format("test_zoo_entropy.py"),
    "promoe": _ZOO.format("test_zoo_prototypes.py"),
    "soft-moe": _ZOO.format("test_zoo_soft.py"),
    "base": _ZOO.format("test_zoo_transport.py"),
    "sinkhorn": _ZOO.format("test_zoo_transport.py"),
    "ssr": _ZOO.format("test_zoo_transport.py"),
    "ec-dlm": _ZOO.format("test_zoo_ec_dlm.py"),
    "bip": _ZOO.format("test_zoo_balancing.py"),
    "cosine": _ZOO.format("test_zoo_geometry.py"),
    "sra": _ZOO.format("test_zoo_geometry.py"),
    "kmeans": _ZOO.format("test_zoo_geometry.py"),
    "remoe": _ZOO.format("test_zoo_relu.py"),
    "blockffn": _ZOO.format("test_zoo_relu.py"),
}


def reference_agreement(name: str) -> str:
    """The agreement line of preset ``name`` (``-`` for a preset registered outside routelab)."""
    return REFERENCE_AGREEMENT.get(name, "-")
