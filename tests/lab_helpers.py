"""Small corpora and settings shared by the lab tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from routelab.lab.config import ModelSettings, TrainConfig
from routelab.lab.data import CorpusOptions, PreparedCorpus, prepare_corpus

WORDS = ("the king and queen speak of love war night crown sword heart sleep dream ghost father son "
         "brother lord lady honour death life time day night fair foul sweet bitter").split()
CODE_LINES = (
    "def {name}(x, y):\n    return x + y * {num}\n",
    "class {Name}:\n    def __init__(self):\n        self.value = {num}\n",
    "for i in range({num}):\n    print(i, {name})\n",
    "if {name} is None:\n    raise ValueError('{name} is missing')\n",
    "import os\npath = os.path.join('{name}', str({num}))\n",
)


def write_corpus(root: Path, files_per_domain: int = 8, size: int = 3000, seed: int = 0) -> Path:
    """Two domains, ``prose`` and ``code``, of generated text files under ``root``."""
    rng = random.Random(seed)
    for domain in ("prose", "code"):
        (root / domain).mkdir(parents=True, exist_ok=True)
        for i in range(files_per_domain):
            parts: list[str] = []
            while sum(len(p) for p in parts) < size:
                if domain == "prose":
                    parts.append(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + ".\n")
                else:
                    name = rng.choice(WORDS)
                    parts.append(rng.choice(CODE_LINES).format(name=name, Name=name.capitalize(), num=rng.randint(0, 99)))
            suffix = ".txt" if domain == "prose" else ".py"
            (root / domain / f"file{i}{suffix}").write_text("".join(parts))
    return root


def small_corpus(tmp_path: Path, vocab_size: int = 320) -> PreparedCorpus:
    source = write_corpus(tmp_path / "text")
    options = CorpusOptions(source=str(source), max_bytes_per_domain=None, val_fraction=0.25, vocab_size=vocab_size)
    return prepare_corpus(options, cache_dir=tmp_path / "cache")


TINY_MODEL = ModelSettings(d_model=32, n_layers=2, n_heads=2, num_experts=4, top_k=2, expert_d_hidden=32)


def tiny_train(**overrides) -> TrainConfig:
    settings = dict(steps=8, batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2, eval_every=4, eval_tokens=256,
                    probe_sequences=2, checkpoint_every=4, precision="fp32")
    settings.update(overrides)
    return TrainConfig(**settings)


# Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine each
# parallel region can wait a whole scheduler slice for its second thread.
torch.set_num_threads(1)
