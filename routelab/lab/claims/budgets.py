"""Training budgets of ``routelab reproduce``: how long, how many seeds, which model.

``default`` uses the demo's TinyLM and schedule (``routelab.lab.demo``: d_model 128, 4
layers, 8 experts of width 256, top-2, 250 steps of 16 x 128 tokens) with three seeds,
so that the demo's one-seed leaderboard can be read against seed noise. ``smoke`` is a
machinery check (seconds, meaningless numbers); ``long`` is for users with more time.
``sweep_steps`` are the training lengths of the budget sweep for claims that may flip.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from routelab.core.errors import ConfigError, suggest
from routelab.lab import demo


@dataclass(frozen=True)
class Budget:
    """A training budget: steps and seeds of every run, and the shared model/train/corpus settings."""

    name: str
    steps: int
    seeds: tuple[int, ...]
    sweep_steps: tuple[int, ...]
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    corpus: dict[str, Any] = field(default_factory=dict)
    description: str = ""


DEMO_TRAIN = {**{k: v for k, v in demo.DEMO_TRAIN.items() if k != "steps"}, "checkpoint_every": 50}
DEMO_MODEL, DEMO_CORPUS = demo.DEMO_MODEL, demo.DEMO_CORPUS

BUDGETS: dict[str, Budget] = {
    "smoke": Budget(
        "smoke", steps=4, seeds=(0, 1), sweep_steps=(2, 4),
        model={"d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "top_k": 2, "expert_d_hidden": 32},
        train={"batch_size": 2, "seq_len": 32, "lr": 3e-3, "warmup_steps": 1, "eval_every": 2, "eval_tokens": 256,
               "probe_sequences": 2, "checkpoint_every": 2, "precision": "fp32"},
        corpus={"source": "default", "max_bytes_per_domain": 200_000, "vocab_size": 512},
        description="machinery check: 4 steps of a 2-layer model, 2 seeds; the numbers mean nothing",
    ),
    "default": Budget(
        "default", steps=250, seeds=(0, 1, 2), sweep_steps=(100, 250, 600),
        model=DEMO_MODEL, train=DEMO_TRAIN, corpus=DEMO_CORPUS,
        description="the demo's model and schedule (250 steps x 2,048 tokens), 3 seeds; sweep at 100/250/600 steps",
    ),
    "long": Budget(
        "long", steps=1500, seeds=(0, 1, 2, 3, 4), sweep_steps=(250, 1500, 4000),
        model=DEMO_MODEL, train={**DEMO_TRAIN, "warmup_steps": 100, "eval_every": 250, "checkpoint_every": 250},
        corpus={**DEMO_CORPUS, "max_bytes_per_domain": None, "vocab_size": 8192},
        description="the demo's model for 1,500 steps on the whole corpus, 5 seeds; sweep at 250/1,500/4,000 steps",
    ),
}


def get_budget(name: str) -> Budget:
    if name not in BUDGETS:
        raise ConfigError(f"unknown budget {name!r}.{suggest(name, list(BUDGETS))} Valid: {', '.join(BUDGETS)}.")
    return BUDGETS[name]
