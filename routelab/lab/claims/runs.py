"""The runs behind the claims: named arms, and runs keyed by the hash of their full config.

An *arm* is a router with its options and model overrides (``objective``, shared
experts). A run is an arm trained under a budget for some steps with one seed; its folder
is ``<out>/<hash>`` where the hash covers every setting that reaches training and differs
from the library default (router, options, model, train schedule with steps and seed,
corpus settings) and the prepared corpus's content hash. Claims that need the same run therefore share it: it is trained
once, and a finished folder is never trained again. Partial runs resume from their last
checkpoint (``routelab.lab.train.train_run`` with ``resume=True``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from routelab.core.errors import ConfigError, suggest
from routelab.lab.claims.budgets import Budget
from routelab.lab.config import CorpusSettings, ModelSettings, TrainConfig, validated

RUN_INFO = "claim_run.json"


@dataclass(frozen=True)
class Arm:
    """A router setting that claims compare: preset, options and model overrides."""

    key: str
    router: str
    description: str
    options: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)


def _arms(*arms: Arm) -> dict[str, Arm]:
    return {arm.key: arm for arm in arms}


DIFFUSION = {"objective": "masked-diffusion"}

ARMS: dict[str, Arm] = _arms(
    Arm("aux", "mixtral", "token choice, softmax top-k, Switch aux loss 0.01 (the aux-loss baseline)"),
    Arm("loss-free", "loss-free", "loss-free balancing: expert bias, update rate 1e-3, no aux loss"),
    Arm("hash", "hash", "fixed token-id hash routing (a different hash per layer)"),
    Arm("random-fixed", "random-fixed", "frozen random linear router"),
    Arm("cosine", "cosine", "cosine routing in a 64-dimensional space"),
    Arm("kmeans", "kmeans", "parameter-free online k-means router"),
    Arm("ssr", "ssr", "Selective Sinkhorn Routing, no aux loss"),
    Arm("top-p", "top-p", "top-p dynamic routing (p = 0.4; 1 to E experts per token)"),
    Arm("bip", "bip", "BIP-based balancing (2 dual iterations per batch)"),
    Arm("no-aux", "mixtral", "token choice without balancing (aux loss 0): the imbalanced routing LLEP targets",
        options={"aux_loss_coef": 0.0}),
    Arm("aux-shared", "mixtral", "the aux-loss baseline plus one always-on shared expert of the same width",
        model={"num_shared_experts": 1}),
    Arm("dlm-aux", "mixtral", "masked-diffusion TinyLM, token choice with aux loss 0.01", model=DIFFUSION),
    Arm("dlm-ec", "expert-choice", "masked-diffusion TinyLM, expert choice with static capacity (k = 2)",
        model=DIFFUSION),
    Arm("dlm-ecdlm", "ec-dlm", "masked-diffusion TinyLM, EC-DLM capacity k_b = round(1 + 2 (1 - r_b)) (E[k] = 2)",
        options={"ec_schedule": "linear_reverse", "k_min": 1, "k_max": 3}, model=DIFFUSION),
)


def get_arm(key: str) -> Arm:
    if key not in ARMS:
        raise ConfigError(f"unknown arm {key!r}.{suggest(key, list(ARMS))}")
    return ARMS[key]


@dataclass(frozen=True)
class RunSpec:
    """One run: an arm trained under ``budget`` for ``steps`` with ``seed``."""

    arm: str
    steps: int
    seed: int

    @property
    def label(self) -> str:
        return f"{self.arm} {self.steps} steps s{self.seed}"


def resolved_settings(spec: RunSpec, budget: Budget, corpus_overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every setting of a run, validated (the input of its hash)."""
    arm = get_arm(spec.arm)
    model = validated(ModelSettings, {**budget.model, **arm.model}, f"model of arm {arm.key!r}")
    train = {**budget.train, "steps": spec.steps, "seed": spec.seed}
    train["eval_every"] = max(1, min(train.get("eval_every", spec.steps), spec.steps))
    train = validated(TrainConfig, train, f"training of {spec.label}")
    corpus = validated(CorpusSettings, {**budget.corpus, **(corpus_overrides or {})}, "corpus settings")
    identity = {"router": arm.router, "options": dict(arm.options), "model": model.model_dump(exclude_defaults=True),
                "train": train.model_dump(exclude_defaults=True), "corpus": corpus.model_dump(exclude_defaults=True)}
    return {"router": arm.router, "options": dict(arm.options), "model": model.model_dump(),
            "train": train.model_dump(), "corpus": corpus.model_dump(), "identity": identity}


def run_hash(settings: dict[str, Any], corpus_content_hash: str) -> str:
    """Hash of the settings that differ from the library defaults, and of the corpus content.

    Defaults stay out of the hash so that a settings field added later (with a default that
    keeps the old behaviour) does not orphan finished runs; ``train_run`` still refuses to
    resume a partial run whose full settings changed."""
    text = json.dumps({**settings["identity"], "corpus_content_hash": corpus_content_hash}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_folder(out: str | Path, settings: dict[str, Any], corpus_content_hash: str) -> Path:
    return Path(out) / run_hash(settings, corpus_content_hash)
