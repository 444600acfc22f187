"""The settings of ``routelab demo`` (what ``make demo`` runs).

A 4-layer TinyLM (d_model 128, 8 experts of width 256, top-2; 4.5M parameters, 2.1M
active) trained for 250 steps x 2,048 tokens with every router, one seed, on the default
corpus with a 4096-token vocabulary, in fp32.
"""

from __future__ import annotations

from typing import Any

from routelab.routers.registry import list_routers

# Std of one run's final validation loss across seeds at exactly these settings: measured by
# `routelab reproduce all --budget default`, which trains this model and schedule with three
# seeds (docs/claims.md: pooled over its 11 causal-LM arms, 22 degrees of freedom). The demo's
# leaderboard marks gaps below 2 * sigma * sqrt(2) as within seed noise (routelab.lab.seed_noise).
DEMO_SEED_NOISE_STD = 0.0367

DEMO_ROUTERS = ("mixtral", "loss-free", "expert-choice", "hash")
OPTIONAL_DEMO_ROUTERS = ("ssr",)


def demo_routers() -> list[str]:
    """The demo's routers: the four foundation ones, plus ``ssr`` when it is registered."""
    registered = {r["name"] for r in list_routers()}
    return list(DEMO_ROUTERS) + [name for name in OPTIONAL_DEMO_ROUTERS if name in registered]


# The demo's model, schedule and corpus (``routelab reproduce --budget default`` trains the same).
# fp32, not bf16 autocast: at this size bf16 autocast trained 2.0x slower on the 2-core
# AVX512-BF16 development machine (60 steps at 2 threads: 38.9 s against 19.3 s).
DEMO_MODEL: dict[str, Any] = {"d_model": 128, "n_layers": 4, "n_heads": 4, "num_experts": 8, "top_k": 2,
                              "expert_d_hidden": 256}
DEMO_TRAIN: dict[str, Any] = {"steps": 250, "batch_size": 16, "seq_len": 128, "lr": 3e-3, "warmup_steps": 25,
                              "eval_every": 50, "eval_tokens": 16384, "checkpoint_every": 100, "precision": "fp32"}
DEMO_CORPUS: dict[str, Any] = {"source": "default", "max_bytes_per_domain": 2_000_000, "vocab_size": 4096}


def demo_settings(out_dir: str = "runs") -> dict[str, Any]:
    """The demo experiment as a mapping for ``routelab.lab.experiment.load_experiment``."""
    return {
        "name": "demo",
        "out_dir": out_dir,
        "routers": demo_routers(),
        "baseline": "mixtral",
        "seeds": [0],
        "model": dict(DEMO_MODEL),
        "train": dict(DEMO_TRAIN),
        "corpus": dict(DEMO_CORPUS),
        "seed_noise_std": DEMO_SEED_NOISE_STD,
    }
